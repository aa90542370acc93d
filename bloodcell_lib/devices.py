"""What the runtime offers training: the precision policy and the distribution strategy (TPU, GPUs, or default).

Nothing is probed over the network: a TPU is used only where the runtime announces one (Colab's variables or
local accelerator devices), mixed precision only where a GPU is present.
"""

from __future__ import annotations

import glob
import os
from typing import Mapping

import keras
import tensorflow as tf


def configure_precision() -> str:
    """Switch Keras to mixed_float16 when a GPU is present (float32 otherwise) and return the policy's name."""
    policy = "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def choose_strategy(device_type: str = "GPU") -> tf.distribute.Strategy:
    """Return TPUStrategy on a Colab TPU runtime, MirroredStrategy over >1 devices of `device_type`, else the default.

    device_type="CPU" (after splitting the CPU into logical devices) exists for testing MirroredStrategy.
    """
    address = _tpu_address(os.environ, glob.glob("/dev/accel*"))
    if address is not None:
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=address)
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
            return tf.distribute.TPUStrategy(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as exc:
            print(f"A TPU was announced ({address!r}) but could not be initialised ({exc}); not using it.")
    devices = tf.config.list_logical_devices(device_type)
    if len(devices) > 1:
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    return tf.distribute.get_strategy()


def describe_strategy(strategy: tf.distribute.Strategy) -> str:
    """Return e.g. "MirroredStrategy (2 replica(s))" for the results."""
    return f"{type(strategy).__name__.lstrip('_')} ({strategy.num_replicas_in_sync} replica(s))"


# ---------------------------------------------------------------------------------------------------------
# Internals


def _tpu_address(environ: Mapping[str, str], accel_devices: list[str]) -> str | None:
    """Return the TPU to connect to on a Colab TPU runtime, or None (no probing of the network or metadata server)."""
    if environ.get("COLAB_TPU_ADDR"):  # the older TPU-node runtime
        return f"grpc://{environ['COLAB_TPU_ADDR']}"
    if environ.get("TPU_NAME"):
        return environ["TPU_NAME"]
    if environ.get("TPU_ACCELERATOR_TYPE") or accel_devices:  # a TPU VM: the chips are local devices
        return "local"
    return None
