"""build_model: flat graph, head, sizes, weights sources; save_model: atomic; load_trained_model: round trip and
clear errors."""

import hashlib
import json
import time
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from bloodcell_lib.errors import ConfigError, ModelError, OutputError, WeightsError
from bloodcell_lib.model import (
    base_layers, build_model, describe_weights, head_layers, imagenet_available, load_trained_model,
    model_image_size, save_model,
)
from bloodcell_lib.registry import ARCHITECTURES

KEYS = list(ARCHITECTURES)


@pytest.fixture(scope="module")
def models():
    """Every registry network at its smallest size with random weights, built once for this file."""
    return {key: build_model(key, image_size=spec.min_size, weights=None) for key, spec in ARCHITECTURES.items()}


@pytest.mark.slow  # every registry network
@pytest.mark.parametrize("key", KEYS)
def test_graph_is_flat_and_the_gradcam_layer_is_the_last_feature_map(models, key):
    model, spec = models[key], ARCHITECTURES[key]
    assert model.name == key
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)  # no nested base
    # The registry's layer is the last image-shaped layer of the base that is not a pooling layer.
    feature_maps = [
        layer.name for layer in base_layers(model)
        if len(layer.output.shape) == 4 and "Pooling" not in type(layer).__name__
    ]
    assert feature_maps[-1] == spec.last_conv_layer
    assert model_image_size(model) == spec.min_size


@pytest.mark.slow  # every registry network
@pytest.mark.parametrize("key", KEYS)
def test_save_and_load_gives_identical_predictions_and_keeps_the_gradcam_layer(models, key, tmp_path):
    model, spec = models[key], ARCHITECTURES[key]
    path = tmp_path / f"{key}.keras"
    model.save(path)
    loaded, loaded_spec = load_trained_model(path)
    x = np.random.default_rng(0).uniform(-1, 1, (2, spec.min_size, spec.min_size, 3)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())
    assert loaded_spec is spec
    assert loaded.get_layer(spec.last_conv_layer).output.shape == model.get_layer(spec.last_conv_layer).output.shape


@pytest.mark.slow  # every registry network (the shared fixture)
def test_head_is_pooling_dropout_softmax_over_five_classes(models):
    model = models["vgg16"]
    head = head_layers(model)
    assert [type(layer).__name__ for layer in head] == ["GlobalAveragePooling2D", "Dropout", "Dense"]
    assert head[1].rate == 0.3
    assert head[-1].units == 5 and head[-1].activation.__name__ == "softmax"
    probabilities = model(np.zeros((3, 32, 32, 3), np.float32)).numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow  # VGG16
def test_optional_hidden_block_and_class_count():
    model = build_model("vgg16", num_classes=3, image_size=32, weights=None, dropout=0.5, hidden_units=16)
    assert [layer.name for layer in head_layers(model)] == [
        "head_pool", "head_dropout", "head_hidden", "head_hidden_dropout", "head_predictions",
    ]
    assert model.output.shape[-1] == 3 and model.get_layer("head_hidden").units == 16


@pytest.mark.slow  # VGG16
def test_softmax_stays_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_model("vgg16", image_size=32, weights=None)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("block5_conv3").compute_dtype == "float16"
    assert model.get_layer("head_predictions").compute_dtype == "float32"
    assert model(np.zeros((1, 32, 32, 3), np.float32)).dtype == "float32"


@pytest.mark.slow  # VGG16 at 224 px
@pytest.mark.parametrize("size", [None, "native"])
def test_native_size_by_default(size):
    assert model_image_size(build_model("vgg16", image_size=size, weights=None)) == 224


@pytest.mark.parametrize("key,size", [("xception", 70), ("vgg16", 31)])
def test_image_below_the_networks_minimum_is_refused(key, size):
    with pytest.raises(ConfigError, match=str(ARCHITECTURES[key].min_size)):
        build_model(key, image_size=size, weights=None)


def _write_legacy_notop_h5(base, path):
    """Write weights the way Keras' downloadable '*_notop.h5' files are laid out (legacy HDF5, by layer)."""
    legacy = pytest.importorskip("keras.src.legacy.saving.legacy_h5_format")
    with h5py.File(path, "w") as fh:
        legacy.save_weights_to_hdf5_group(fh, base)


@pytest.mark.slow  # VGG16
@pytest.mark.parametrize("fmt", ["notop.h5", "weights.h5"])
def test_weights_from_a_local_file_are_loaded_into_the_base(tmp_path, fmt):
    reference = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / f"vgg16.{fmt}"
    if fmt == "notop.h5":
        _write_legacy_notop_h5(reference, path)
    else:
        reference.save_weights(path)
    model = build_model("vgg16", image_size=32, weights=path)
    loaded = [w for layer in base_layers(model) for w in layer.get_weights()]
    expected = reference.get_weights()
    assert len(loaded) == len(expected) and all(np.array_equal(a, b) for a, b in zip(loaded, expected))
    assert hashlib.sha256(path.read_bytes()).hexdigest() in describe_weights(path)


@pytest.mark.slow  # VGG16 and ResNet50
def test_weights_of_another_network_or_no_file_are_weights_errors(tmp_path):
    path = tmp_path / "vgg16_notop.h5"
    _write_legacy_notop_h5(keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)), path)
    with pytest.raises(WeightsError, match="ResNet50"):
        build_model("resnet50", image_size=32, weights=path)
    with pytest.raises(WeightsError, match="does not exist"):
        build_model("vgg16", image_size=32, weights=tmp_path / "missing.h5")


def test_describe_weights_says_what_initialised_the_base():
    assert describe_weights("imagenet") == "imagenet"
    assert describe_weights(None) == "none (random init)"


@pytest.mark.slow  # EfficientNetB3 is built before the download
def test_offline_imagenet_fails_within_seconds_naming_the_alternatives():
    if imagenet_available("efficientnetb3"):
        pytest.skip("ImageNet weights are reachable here (cached or online); this test is about offline machines")
    started = time.monotonic()
    with pytest.raises(WeightsError) as info:
        build_model("efficientnetb3", image_size=32, weights="imagenet")
    assert time.monotonic() - started < 30
    message = str(info.value)
    assert "--weights none" in message and "--weights PATH" in message and "~/.keras/models" in message


def test_load_trained_model_explains_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(ModelError, match="No model file"):
        load_trained_model(tmp_path / "vgg16.keras")
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(b"PK\x03\x04 half a zip")
    with pytest.raises(ModelError, match="corrupt"):
        load_trained_model(corrupt)
    inputs = keras.Input((4,))
    foreign = tmp_path / "foreign.keras"
    keras.Model(inputs, keras.layers.Dense(2)(inputs), name="mystery").save(foreign)
    with pytest.raises(ModelError, match="mystery"):
        load_trained_model(foreign)


@pytest.mark.slow  # VGG16
def test_a_crash_while_saving_leaves_the_previous_model_intact(tmp_path, monkeypatch):
    model = build_model("vgg16", image_size=32, weights=None)
    path = save_model(model, tmp_path / "vgg16.keras")
    good = path.read_bytes()

    def crashing_save(self, filepath, *args, **kwargs):
        Path(filepath).write_bytes(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(keras.Model, "save", crashing_save)
    with pytest.raises(OutputError, match="disk full"):
        save_model(model, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["vgg16.keras"]


@pytest.mark.slow  # VGG16, one training step
def test_a_saved_model_holds_no_optimizer_state_and_loads_for_prediction(tmp_path):
    model = build_model("vgg16", image_size=32, weights=None)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).uniform(-100, 100, (4, 32, 32, 3)).astype(np.float32)
    model.fit(x, np.arange(4), epochs=1, verbose=0)  # Adam's slots now exist: two per weight
    model.save(tmp_path / "with_optimizer.keras")  # what save_model wrote before
    path = save_model(model, tmp_path / "vgg16.keras")
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
        archive.extract("model.weights.h5", tmp_path / "unzipped")
    with h5py.File(tmp_path / "unzipped" / "model.weights.h5") as weights:
        assert "optimizer" not in weights
    assert not config.get("compile_config")  # nothing rebuilds an optimizer on load
    before, after = (tmp_path / "with_optimizer.keras").stat().st_size, path.stat().st_size
    print(f"VGG16 at 32 px: .keras with optimizer {before / 1e6:.1f} MB, without {after / 1e6:.1f} MB")
    assert after < 0.4 * before  # weights, not weights + Adam's m and v
    loaded, spec = load_trained_model(path)
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)
    assert spec.key == "vgg16" and loaded.name == "vgg16" and not loaded.compiled
    model.fit(x, np.arange(4), epochs=1, verbose=0)  # the trained model itself keeps its optimizer
    assert int(model.optimizer.iterations.numpy()) == 2
