"""Subprocess helper for tests/test_training.py (things that need a fresh process).

  train    — train_from_config(RunConfig(**--config)) on --data; --pause-epoch N writes --marker after the
             first batch of epoch N and then sleeps, so the test can SIGKILL it mid-epoch at a known point.
  mirrored — split the CPU into two logical devices before TensorFlow starts, then let choose_strategy
             pick MirroredStrategy and fine-tune a small model on it; prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _train(args: argparse.Namespace) -> None:
    import keras

    from bloodcell_lib.config import RunConfig
    from bloodcell_lib.training import train_from_config

    class PauseMidEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch + 1

        def on_train_batch_end(self, batch, logs=None):
            if self.epoch == args.pause_epoch:
                Path(args.marker).write_text(f"epoch {self.epoch} batch {batch}\n")
                time.sleep(600)  # the test kills us here

    cfg = RunConfig(data_dir=args.data, output_dir=args.out, **json.loads(args.config))
    train_from_config(cfg, verbose=0, callbacks=[PauseMidEpoch()] if args.pause_epoch else [])


def _mirrored(args: argparse.Namespace) -> None:
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    from bloodcell_lib.config import RunConfig
    from bloodcell_lib.devices import choose_strategy
    from bloodcell_lib.model import build_model
    from bloodcell_lib.registry import get_arch
    from bloodcell_lib.training import fine_tune

    strategy = choose_strategy(device_type="CPU")
    spec = get_arch(args.arch)
    with strategy.scope():
        model = build_model(spec.key, image_size=args.image_size, weights=None)
    before = model.get_layer("head_predictions").get_weights()[0].copy()
    rng = np.random.default_rng(0)
    x = spec.preprocess(rng.uniform(0, 255, (8, args.image_size, args.image_size, 3)).astype(np.float32))
    data = tf.data.Dataset.from_tensor_slices((x, np.arange(8) % 5)).batch(4)
    # Traced, not eager: eager MirroredStrategy steps are slow, and VGG16's graph traces in seconds.
    cfg = RunConfig(arch=spec.key, epochs=2, image_size=args.image_size, weights=None, run_eagerly=False)
    started = time.monotonic()
    history = fine_tune(model, data, data, cfg, verbose=0, resume_dir=args.out)  # snapshots of mirrored variables
    seconds = time.monotonic() - started
    after = model.get_layer("head_predictions").get_weights()[0]
    print(json.dumps({
        "strategy": type(strategy).__name__,
        "replicas": strategy.num_replicas_in_sync,
        "model_strategy": type(model.distribute_strategy).__name__,
        "epochs": history["epoch"],
        "loss_finite": bool(np.all(np.isfinite(history["loss"]))),
        "head_changed": bool(not np.array_equal(before, after)),
        "seconds": seconds,
    }))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("train", "mirrored"))
    parser.add_argument("--config", default="{}", help="RunConfig fields as JSON (train)")
    parser.add_argument("--arch", default="vgg16", help="(mirrored)")
    parser.add_argument("--image-size", type=int, default=32, help="(mirrored)")
    parser.add_argument("--data")
    parser.add_argument("--out")
    parser.add_argument("--pause-epoch", type=int, default=0)
    parser.add_argument("--marker")
    args = parser.parse_args(argv)
    {"train": _train, "mirrored": _mirrored}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
