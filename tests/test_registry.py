"""The registry is the only place that knows about individual networks."""

import re
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import bloodcell_lib
from bloodcell_lib.config import RunConfig
from bloodcell_lib.errors import ConfigError
from bloodcell_lib.model import build_model, load_trained_model, save_model
from bloodcell_lib.registry import ARCHITECTURES, ArchSpec, get_arch
from bloodcell_lib.training import fine_tune

PAPER = {"vgg16": 224, "resnet50": 224, "xception": 299, "densenet201": 224, "efficientnetb3": 300}


def test_the_five_networks_of_the_paper_with_their_native_sizes():
    assert {key: spec.native_size for key, spec in ARCHITECTURES.items()} == PAPER
    assert all(spec.key == key for key, spec in ARCHITECTURES.items())


def test_get_arch_ignores_case_and_spaces():
    assert get_arch(" EfficientNetB3 ") is ARCHITECTURES["efficientnetb3"]


def test_unknown_arch_is_a_config_error_listing_the_choices():
    with pytest.raises(ConfigError) as info:
        get_arch("alexnet")
    assert "alexnet" in str(info.value)
    assert all(key in str(info.value) for key in PAPER)


@pytest.mark.parametrize("key", list(PAPER))
def test_min_size_is_where_keras_starts_refusing(key):
    spec = ARCHITECTURES[key]
    below = spec.min_size - 1
    # Keras checks the shape before it builds a layer, so this costs nothing when the registry is right.
    with pytest.raises(ValueError):
        spec.constructor(include_top=False, weights=None, input_shape=(below, below, 3))


@pytest.mark.parametrize("key", list(PAPER))
def test_each_network_gets_its_own_preprocessing(key):
    # One white pixel through each family's preprocess_input: caffe (BGR minus mean), tf ([-1, 1]),
    # torch (ImageNet mean/std) or EfficientNet's pass-through. A swapped entry gives other numbers.
    expected = {
        "vgg16": [255 - 103.939, 255 - 116.779, 255 - 123.68],
        "resnet50": [255 - 103.939, 255 - 116.779, 255 - 123.68],
        "xception": [1.0, 1.0, 1.0],
        "densenet201": [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225],
        "efficientnetb3": [255.0, 255.0, 255.0],
    }[key]
    white = np.full((1, 1, 1, 3), 255.0, np.float32)
    out = np.asarray(ARCHITECTURES[key].preprocess(white)).reshape(3)
    np.testing.assert_allclose(out, expected, rtol=1e-5)


def test_no_module_but_the_registry_branches_on_an_architecture_name():
    pattern = re.compile(
        r"""(==|!=)\s*['"](%s)['"]|['"](%s)['"]\s*(==|!=)""" % ("|".join(PAPER), "|".join(PAPER)), re.IGNORECASE
    )
    package = Path(bloodcell_lib.__file__).parent
    offenders = [
        f"{path.name}:{n}" for path in sorted(package.glob("*.py")) if path.name != "registry.py"
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)
    ]
    assert offenders == []


@pytest.mark.slow  # EfficientNetV2B0, built and fine-tuned
def test_a_sixth_network_is_one_registry_entry(monkeypatch, tmp_path):
    spec = ArchSpec(
        key="efficientnetv2b0", display_name="EfficientNetV2B0",
        constructor=keras.applications.EfficientNetV2B0, preprocess=keras.applications.efficientnet_v2.preprocess_input,
        native_size=224, min_size=32, last_conv_layer="top_activation", unfreeze_layers=18,
        notebook="EfficientNetV2B0",
    )
    monkeypatch.setitem(ARCHITECTURES, spec.key, spec)

    model = build_model("EfficientNetV2B0", image_size=32, weights=None)
    assert model.name == spec.key
    assert len(model.get_layer(spec.last_conv_layer).output.shape) == 4
    rng = np.random.default_rng(0)
    x = spec.preprocess(rng.uniform(0, 255, (4, 32, 32, 3)).astype(np.float32))
    data = tf.data.Dataset.from_tensor_slices((x, np.arange(4) % 5)).batch(4)
    cfg = RunConfig(arch=spec.key, epochs=1, image_size=32, weights=None, run_eagerly=True)
    history = fine_tune(model, data, data, cfg, verbose=0)
    assert history["epoch"] == [1] and np.isfinite(history["loss"][0])
    assert history["meta"]["unfreeze_layers"] == 18  # the default came from the new entry

    loaded, loaded_spec = load_trained_model(save_model(model, tmp_path / "efficientnetv2b0.keras"))
    assert loaded_spec is spec
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=1e-6)
