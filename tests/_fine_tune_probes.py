"""Helpers shared by tests/test_training.py and tests/test_resume.py: tiny data, weight snapshots, a phase probe."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


def tiny_data(spec, n=4, seed=0):
    """One batch of n random images (already preprocessed) with labels 0..4, as a tf.data.Dataset."""
    size = spec.min_size
    x = spec.preprocess(np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32))
    return tf.data.Dataset.from_tensor_slices((x, np.arange(n) % 5)).batch(n)


def layer_weights(model):
    return {layer.name: [w.copy() for w in layer.get_weights()] for layer in model.layers}


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


class PhaseProbe(keras.callbacks.Callback):
    """Record, per phase, how many parameters are trainable and all weights when training ends (before
    EarlyStopping puts the best ones back)."""

    def __init__(self):
        super().__init__()
        self.trainable, self.weights_at_end = [], []

    def on_train_begin(self, logs=None):
        self.trainable.append(int(sum(np.prod(w.shape) for w in self.model.trainable_weights)))

    def on_train_end(self, logs=None):
        self.weights_at_end.append(layer_weights(self.model))

