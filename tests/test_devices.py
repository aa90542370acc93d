"""Precision and strategy choice: float32 and the default strategy on a CPU machine; a TPU only where announced.

MirroredStrategy over two logical CPUs needs a fresh TensorFlow: tests/test_training.py runs it in a subprocess.
"""

import keras
import tensorflow as tf

from bloodcell_lib.devices import _tpu_address, choose_strategy, configure_precision, describe_strategy


def test_this_cpu_machine_gets_the_default_strategy_and_float32():
    assert configure_precision() == "float32"
    assert keras.mixed_precision.global_policy().name == "float32"
    strategy = choose_strategy()
    assert not isinstance(strategy, (tf.distribute.MirroredStrategy, tf.distribute.TPUStrategy))
    assert strategy.num_replicas_in_sync == 1
    assert describe_strategy(strategy).endswith("(1 replica(s))")


def test_tpu_is_looked_for_only_where_a_runtime_announces_one():
    assert _tpu_address({}, []) is None
    assert _tpu_address({"COLAB_TPU_ADDR": "10.0.0.2:8470"}, []) == "grpc://10.0.0.2:8470"
    assert _tpu_address({}, ["/dev/accel0"]) == "local"
