"""The training recipe follows the weights: from scratch every layer (BatchNorm in training mode) trains from epoch 1
in one phase; pretrained weights are fine-tuned in two. Also the notebook steps that show the network
(study.model_summary) and explain one image (study.explain_image). All on a one-block registry network."""

from __future__ import annotations

import json

import keras
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from bloodcell_lib import study
from bloodcell_lib.classes import CLASSES
from bloodcell_lib.config import RunConfig
from bloodcell_lib.errors import ConfigError
from bloodcell_lib.evaluation import evaluate
from bloodcell_lib.explain import explain_image
from bloodcell_lib.history import load_history
from bloodcell_lib.model import build_model
from bloodcell_lib.registry import ARCHITECTURES, ArchSpec
from bloodcell_lib.split import load_split
from bloodcell_lib.training import fine_tune, train_from_config

from _fine_tune_probes import PhaseProbe, layer_weights, same, tiny_data

SIZE = 16


def _tiny_base(include_top=False, weights=None, input_tensor=None, **_):
    x = keras.layers.Conv2D(4, 3, padding="same", name="tiny_conv")(input_tensor)
    x = keras.layers.BatchNormalization(name="tiny_bn")(x)
    x = keras.layers.Activation("relu", name="tiny_relu")(x)
    return keras.Model(input_tensor, x)


@pytest.fixture
def tinynet(monkeypatch):
    """A registry entry for a conv → BatchNorm → ReLU base; phase 2 unfreezes all three."""
    spec = ArchSpec(key="tinynet", display_name="TinyNet", constructor=_tiny_base,
                    preprocess=keras.applications.efficientnet.preprocess_input, native_size=SIZE, min_size=SIZE,
                    last_conv_layer="tiny_relu", unfreeze_layers=3, notebook="TinyNet")
    monkeypatch.setitem(ARCHITECTURES, spec.key, spec)
    return spec


def _run(spec, cfg):
    model = build_model(spec.key, image_size=SIZE, weights=None)
    before = layer_weights(model)
    probe = PhaseProbe()
    history = fine_tune(model, tiny_data(spec, n=8), None, cfg, verbose=0, callbacks=[probe])
    return model, before, probe, history


def test_from_scratch_every_layer_trains_from_the_first_epoch_in_one_phase(tinynet):
    cfg = RunConfig(arch="tinynet", epochs=2, image_size=SIZE, weights=None, run_eagerly=True)
    model, before, probe, history = _run(tinynet, cfg)
    assert history["phase"] == [1, 1] and history["lr"][0] == cfg.scratch_learning_rate == 1e-3
    everything = int(sum(np.prod(w.shape) for w in model.weights if w.trainable))
    assert probe.trainable == [everything]  # conv, BatchNorm's gamma and beta, and the head: all from epoch 1
    assert history["meta"]["trainable_params"] == {"phase1": everything}
    assert history["meta"]["recipe"] == "from scratch (1 phase)"
    assert history["meta"]["epochs"] == {"phase1": 2, "phase2": 0, "total": 2}
    after = probe.weights_at_end[0]
    assert not same(after["tiny_conv"], before["tiny_conv"])
    # BatchNorm in training mode: its moving statistics follow the data, not their initial 0 and 1.
    gamma, beta, moving_mean, moving_var = after["tiny_bn"]
    assert not np.allclose(moving_mean, 0.0) and not np.allclose(moving_var, 1.0)


def test_from_scratch_batchnorm_momentum_comes_from_the_configuration(tinynet):
    # Momentum 0: after each step the moving statistics are the last batch's, far from their initial 0 and 1;
    # left unset (None), the network keeps its own 0.99.
    model, *_ = _run(tinynet, RunConfig(arch="tinynet", epochs=1, image_size=SIZE, weights=None, run_eagerly=True,
                                        scratch_bn_momentum=0.0))
    assert model.get_layer("tiny_bn").momentum == 0.0
    unset, *_ = _run(tinynet, RunConfig(arch="tinynet", epochs=1, image_size=SIZE, weights=None, run_eagerly=True))
    assert unset.get_layer("tiny_bn").momentum == 0.99
    # Only from scratch: fine-tuning keeps BatchNorm frozen with its pretrained statistics and momentum.
    tuned = build_model("tinynet", image_size=SIZE, weights=None)
    fine_tune(tuned, tiny_data(tinynet, n=8), None, RunConfig(arch="tinynet", epochs=2, image_size=SIZE,
              weights=None, recipe="fine-tune", run_eagerly=True, scratch_bn_momentum=0.0), verbose=0)
    assert tuned.get_layer("tiny_bn").momentum == 0.99
    with pytest.raises(ConfigError, match="scratch_bn_momentum"):
        RunConfig(scratch_bn_momentum=1.0)


def test_pretrained_weights_are_fine_tuned_in_two_phases_with_batchnorm_frozen(tinynet, tmp_path):
    weights = tmp_path / "tinynet_notop.weights.h5"
    _tiny_base(input_tensor=keras.Input((SIZE, SIZE, 3))).save_weights(weights)  # a local "imagenet-like" file
    cfg = RunConfig(arch="tinynet", epochs=2, image_size=SIZE, weights=str(weights), run_eagerly=True)
    assert cfg.training_recipe == "fine-tune"
    model, before, probe, history = _run(tinynet, cfg)
    head = sum(layer.count_params() for layer in model.layers if layer.name.startswith("head_"))
    conv = model.get_layer("tiny_conv").count_params()
    assert history["phase"] == [1, 2] and history["lr"] == [cfg.head_lr, cfg.finetune_lr]
    assert probe.trainable == [head, head + conv]
    assert history["meta"]["recipe"] == "fine-tune (2 phases)"
    assert same(probe.weights_at_end[1]["tiny_bn"], before["tiny_bn"])  # frozen BatchNorm: statistics kept


def test_the_schedule_comes_from_the_configuration(tinynet):
    # A learning rate of 1e-9 keeps the training loss flat (BatchNorm uses batch statistics while training), so the
    # plateau callback cuts the rate by lr_factor after lr_patience epochs.
    cfg = RunConfig(arch="tinynet", epochs=3, image_size=SIZE, weights=None, run_eagerly=True, patience=10,
                    scratch_learning_rate=1e-9, lr_factor=0.5, lr_patience=1, min_lr=0.0)
    model = build_model("tinynet", image_size=SIZE, weights=None, dropout=0.0)
    history = fine_tune(model, tiny_data(tinynet, n=8), None, cfg, verbose=0)
    assert history["lr"] == pytest.approx([1e-9, 1e-9, 5e-10], rel=1e-6)


@pytest.mark.slow  # trains and evaluates tinynet end to end
def test_the_history_and_the_results_say_which_recipe_ran(tinynet, tiny_set, tmp_path):
    cfg = RunConfig(arch="tinynet", data_dir=str(tiny_set), output_dir=str(tmp_path), epochs=1, image_size=SIZE,
                    batch_size=8, weights=None, run_eagerly=True, augment_brightness=0.05)
    result = train_from_config(cfg, verbose=0)
    meta = load_history(result.history_path)["meta"]
    assert meta["recipe"] == "from scratch (1 phase)" and meta["config"]["augment_brightness"] == 0.05
    split = load_split(result.split_path)
    split.attrs["split_path"] = str(result.split_path)
    evaluate(result.model, split, "test", tmp_path, history=result.history, config=cfg.to_dict(),
             model_path=result.model_path, gradcam_images=2, n_boot=10, cost_repeats=1, make_figures=False)
    results = json.loads((tmp_path / "tinynet_results.json").read_text())
    assert results["recipe"] == "from scratch (1 phase)"

    figure = study.explain_image(cfg, result, split, 0)
    assert isinstance(figure, Figure) and len(figure.axes) == 3  # the image, Grad-CAM, Grad-CAM++
    test_file = tiny_set / split.loc[split["subset"] == "test", "path"].iloc[0]
    assert isinstance(study.explain_image(cfg, result, split, str(test_file)), Figure)
    with pytest.raises(ConfigError, match="test subset has"):
        study.explain_image(cfg, result, split, 10_000)


def test_model_summary_counts_layers_and_parameters_per_block_and_phase(tinynet):
    scratch = study.model_summary(RunConfig(arch="tinynet", image_size=SIZE, weights=None))
    assert list(scratch.index) == ["tiny", "head", "total"]
    assert list(scratch.columns) == ["layers", "parameters", "phase 1 trained", "phase 1 fixed"]
    assert scratch.loc["tiny", "layers"] == 3 and scratch.loc["head", "layers"] == 3
    assert scratch.loc["tiny", "phase 1 fixed"] == 8  # only BatchNorm's moving mean and variance
    tuned = study.model_summary(RunConfig(arch="tinynet", image_size=SIZE, weights="imagenet", epochs=4))
    assert list(tuned.columns) == ["layers", "parameters", "phase 1 trained", "phase 1 fixed", "phase 2 trained",
                                   "phase 2 fixed"]
    assert tuned.loc["tiny", "phase 1 trained"] == 0
    assert tuned.loc["tiny", "phase 2 trained"] == 3 * 3 * 3 * 4 + 4  # the conv; BatchNorm stays frozen
    assert tuned.loc["total", "parameters"] == scratch.loc["total", "parameters"]
    assert (tuned["phase 2 trained"] + tuned["phase 2 fixed"] == tuned["parameters"]).all()


def test_explain_image_gives_top_classes_and_a_heatmap_per_method(tinynet):
    model = build_model("tinynet", image_size=SIZE, weights=None)
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    explanation = explain_image(model, image, true_label="monocyte")
    assert explanation.probabilities.shape == (len(CLASSES),)
    assert explanation.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
    assert set(explanation.heatmaps) == {"gradcam", "gradcam++"}
    assert all(h.shape == (SIZE, SIZE) and h.min() >= 0 and h.max() <= 1 for h in explanation.heatmaps.values())
    top = explanation.top(3)
    assert len(top) == 3 and [p for _, p in top] == sorted((p for _, p in top), reverse=True)
    assert top[0][0] == CLASSES[int(np.argmax(explanation.probabilities))]
    assert isinstance(pd.DataFrame(top), pd.DataFrame)
