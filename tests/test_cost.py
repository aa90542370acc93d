import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from bloodcell_lib.cost import analytic_flops, compiled_forward, device_name, graph_flops, measure_cost
from bloodcell_lib.errors import ModelError

# Conv 3×3, 3→8 channels on 16×16 ('same'), global average pooling, Dense 8→2: counted by hand,
# a multiply-add as two FLOPs, plus one per bias add.
CONV_FLOPS = 2 * 16 * 16 * 8 * (3 * 3 * 3) + 16 * 16 * 8
DENSE_FLOPS = 2 * 8 * 2 + 2


def tiny_net():
    inp = keras.Input((16, 16, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inp)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inp, keras.layers.Dense(2, activation="softmax")(h), name="tiny")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    model = tiny_net()
    model.get_layer("conv").trainable = False
    path = tmp_path_factory.mktemp("cost") / "tiny.keras"
    model.save(path)
    return model, path, measure_cost(model, model_path=path, training_seconds=12.5, epochs=3, repeats=5)


def test_cost_keys_types_and_parameter_counts(measured):
    model, path, cost = measured
    assert cost["params_total"] == model.count_params() == (3 * 3 * 3 * 8 + 8) + (8 * 2 + 2)
    assert cost["params_trainable"] == 8 * 2 + 2  # the frozen convolution is not trainable
    assert cost["keras_file_mb"] == pytest.approx(path.stat().st_size / 1e6, abs=1e-3)
    assert cost["training_seconds"] == 12.5 and cost["epochs"] == 3
    assert cost["latency_ms_batch1_median"] > 0 and cost["latency_ms_batch1_p90"] >= cost["latency_ms_batch1_median"]
    assert cost["throughput_batch32"] > 0 and cost["throughput_batch_size"] == 32
    assert cost["image_size"] == [16, 16, 3]
    assert cost["tensorflow"] == tf.__version__
    assert isinstance(cost["device"], str) and cost["device"] == device_name()
    if not tf.config.list_physical_devices("GPU"):
        assert "cores" in cost["device"]
    json.dumps(cost)


def test_graph_flops_match_the_hand_count(measured):
    _, _, cost = measured
    assert cost["flops_method"] == "tf_profiler"
    # The profiler also counts the pooling mean and the softmax, a few percent more than the layers.
    assert cost["flops_per_image"] == pytest.approx(CONV_FLOPS + DENSE_FLOPS, rel=0.05)
    assert cost["flops_analytic_per_image"] == CONV_FLOPS + DENSE_FLOPS


def test_analytic_flops_of_depthwise_separable_and_grouped_layers():
    inp = keras.Input((8, 8, 4))
    h = keras.layers.DepthwiseConv2D(3, padding="same")(inp)
    h = keras.layers.SeparableConv2D(6, 3, padding="same")(h)
    separable_only = keras.Model(inp, h)
    grouped = keras.Model(inp, keras.layers.Conv2D(6, 1, groups=2, use_bias=False)(h))
    depthwise_flops = 2 * 64 * 4 * 9 + 64 * 4
    separable_flops = 2 * 64 * 4 * 9 + 2 * 64 * 4 * 6 + 64 * 6
    grouped_flops = 2 * 64 * 6 * 3
    assert analytic_flops(separable_only) == depthwise_flops + separable_flops
    assert analytic_flops(grouped) == depthwise_flops + separable_flops + grouped_flops
    assert graph_flops(separable_only) == (depthwise_flops + separable_flops, "tf_profiler")
    # Whichever way it is counted, no layer may be left out (the profiler misses nested function calls).
    assert graph_flops(grouped)[0] >= analytic_flops(grouped)


def frozen_batch1_flops(model):
    """The count before the shared graph: the profiler on a separately traced batch-1 graph, variables frozen."""
    freezer = pytest.importorskip("tensorflow.python.framework.convert_to_constants")
    size = tuple(model.inputs[0].shape[1:])
    concrete = tf.function(lambda x: model(x, training=False), autograph=False).get_concrete_function(
        tf.TensorSpec([1, *size], tf.float32))
    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    options = builder(builder.float_operation()).with_empty_output().build()
    frozen = freezer.convert_variables_to_constants_v2(concrete)
    return tf.compat.v1.profiler.profile(graph=frozen.graph, run_meta=tf.compat.v1.RunMetadata(), cmd="op",
                                         options=options).total_float_ops


def test_flops_counted_on_the_shared_traced_graph_equal_the_frozen_batch1_count():
    inp = keras.Input((12, 12, 3))
    h = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inp)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.SeparableConv2D(6, 3, padding="same")(h)
    h = keras.layers.DepthwiseConv2D(3, padding="same")(h)
    h = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(h))
    for model in (tiny_net(), keras.Model(inp, keras.layers.Activation("softmax")(h), name="mixed")):
        forward = compiled_forward(model)
        cost = measure_cost(model, repeats=2, forward=forward)
        assert (cost["flops_per_image"], cost["flops_method"]) == (frozen_batch1_flops(model), "tf_profiler")
        assert graph_flops(model, forward=forward) == graph_flops(model) == (cost["flops_per_image"], "tf_profiler")
        assert forward.experimental_get_tracing_count() == 1  # FLOPs, latency and throughput: one trace
        np.testing.assert_allclose(np.asarray(forward(np.ones((3, *model.inputs[0].shape[1:]), np.float32))),
                                   np.asarray(model(np.ones((3, *model.inputs[0].shape[1:]), np.float32))), atol=1e-6)


def test_model_without_a_fixed_size_is_a_clear_error():
    inp = keras.Input((None, None, 3))
    model = keras.Model(inp, keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(2, 3)(inp)))
    with pytest.raises(ModelError, match="fixed image size"):
        measure_cost(model, repeats=1)


def test_latency_grows_with_model_work():
    small = tiny_net()
    inp = keras.Input((16, 16, 3))
    h = inp
    for _ in range(6):
        h = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(h)
    big = keras.Model(inp, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(h)))
    fast, slow = measure_cost(small, repeats=5), measure_cost(big, repeats=5)
    assert slow["flops_per_image"] > 100 * fast["flops_per_image"]
    assert slow["latency_ms_batch1_median"] > fast["latency_ms_batch1_median"]
    assert slow["throughput_batch32"] < fast["throughput_batch32"]
    assert np.isfinite(slow["latency_ms_batch1_median"])
