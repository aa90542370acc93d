"""fine_tune's two phases, class weights, train_from_config end to end (resumed after a SIGKILL), MirroredStrategy."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from sklearn.utils.class_weight import compute_class_weight

from bloodcell_lib.config import RunConfig
from bloodcell_lib.errors import DatasetError, SplitError
from bloodcell_lib.history import load_history
from bloodcell_lib.model import base_layers, build_model, head_layers, load_trained_model
from bloodcell_lib.registry import ARCHITECTURES
from bloodcell_lib.resume import resume_dir
from bloodcell_lib.synthetic import make_synthetic_dataset
from bloodcell_lib.training import build_training_state, class_weights, fine_tune, train_from_config

from _fine_tune_probes import PhaseProbe, layer_weights, same, tiny_data

CHILD = Path(__file__).with_name("_train_child.py")


# recipe "fine-tune": the two phases without downloading ImageNet weights (weights None alone trains from scratch)
RESUME_RUN = dict(arch="vgg16", epochs=3, image_size=32, batch_size=16, weights=None, recipe="fine-tune",
                  run_eagerly=True, patience=10, class_weights=True)


def test_class_weights_are_balanced():
    y = np.array([0] * 10 + [1] * 30 + [3] * 5)
    weights = class_weights(y)
    expected = compute_class_weight("balanced", classes=np.array([0, 1, 3]), y=y)
    assert [weights[k] for k in (0, 1, 3)] == pytest.approx(expected)
    assert weights[2] == 0.0 and weights[4] == 0.0 and sorted(weights) == [0, 1, 2, 3, 4]
    assert sum(weights[k] * n for k, n in ((0, 10), (1, 30), (3, 5))) == pytest.approx(len(y))
    with pytest.raises(DatasetError):
        class_weights([0, 5])
    with pytest.raises(DatasetError):
        class_weights([])


class CountingModel(keras.Sequential):
    """A small model that counts how often Keras traces its training step (a Python call per trace)."""

    traces = 0

    def train_step(self, data):
        self.traces += 1
        return super().train_step(data)


@pytest.mark.parametrize("built_first, traces", [(False, 2), (True, 1)])
def test_the_training_step_is_traced_once_when_its_state_is_built_first(built_first, traces):
    model = CountingModel([keras.Input((6,)), keras.layers.Dense(4), keras.layers.BatchNormalization(),
                            keras.layers.Dense(5, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    if built_first:
        build_training_state(model)
        assert all(float(np.sum(np.abs(v.numpy()))) == 0.0 for v in model.metrics_variables)  # nothing counted
    x, y = np.random.default_rng(0).random((16, 6), "float32"), np.arange(16) % 5
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert model.traces == traces  # without: Keras creates the Adam slots inside the first trace, so TF traces again
    assert len(history.history["loss"]) == 2


@pytest.fixture(scope="module")
def children(tmp_path_factory):
    """Start this file's two subprocesses with its first training test (the `trained` fixture asks for them),
    so they run alongside the eager in-process tests (which leave the second core mostly idle): MirroredStrategy
    needs a fresh TensorFlow, and the training to be SIGKILLed pauses after the first batch of epoch 2 until the
    resume test kills it. Not autouse, so a run of the fast tests alone (-m "not slow") starts no subprocess."""
    root = tmp_path_factory.mktemp("resume")
    data, out, marker, log = root / "data", root / "out", root / "paused", root / "child.log"
    make_synthetic_dataset(data, per_class=6, size=32, duplicates=1, seed=0)
    mirrored = subprocess.Popen([sys.executable, str(CHILD), "mirrored", "--out", str(root / "mirrored")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with open(log, "w") as fh:
        to_kill = subprocess.Popen(
            [sys.executable, str(CHILD), "train", "--data", str(data), "--out", str(out),
             "--config", json.dumps(RESUME_RUN), "--pause-epoch", "2", "--marker", str(marker)],
            stdout=fh, stderr=fh,
        )
    yield {"mirrored": mirrored, "to_kill": to_kill, "data": data, "out": out, "marker": marker, "log": log}
    for child in (mirrored, to_kill):
        if child.poll() is None:
            child.kill()
            child.communicate()


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def trained(request, children):
    """Each registry network at its smallest size, fine-tuned one step per phase (eager: no graph tracing)."""
    spec = ARCHITECTURES[request.param]
    model = build_model(spec.key, image_size=spec.min_size, weights=None)
    before = layer_weights(model)
    probe = PhaseProbe()
    cfg = RunConfig(arch=spec.key, epochs=2, image_size=spec.min_size, weights=None, recipe="fine-tune",
                    run_eagerly=True)
    started = time.monotonic()
    history = fine_tune(model, tiny_data(spec), None, cfg, verbose=0, callbacks=[probe])
    return spec, model, before, probe, history, time.monotonic() - started


@pytest.mark.slow  # every registry network
def test_every_network_trains_one_step_per_phase(trained):
    spec, model, before, probe, history, seconds = trained
    print(f"{spec.key}: fine_tune 1+1 steps in {seconds:.1f} s")
    assert history["epoch"] == [1, 2] and history["phase"] == [1, 2]
    assert np.all(np.isfinite(history["loss"]))
    assert history["lr"] == [1e-3, 5e-5]


@pytest.mark.slow
def test_phase_one_trains_only_the_head_and_phase_two_the_top_layers_but_batchnorm(trained):
    spec, model, before, probe, history, _ = trained
    head = sum(layer.count_params() for layer in head_layers(model))
    top = base_layers(model)[-spec.unfreeze_layers:]
    unfrozen = sum(layer.count_params() for layer in top if not isinstance(layer, keras.layers.BatchNormalization))
    assert probe.trainable == [head, head + unfrozen]
    assert history["meta"]["trainable_params"] == {"phase1": head, "phase2": head + unfrozen}


@pytest.mark.slow
def test_phase_one_leaves_the_base_and_its_batchnorm_statistics_untouched(trained):
    spec, model, before, probe, history, _ = trained
    after_phase1 = probe.weights_at_end[0]
    assert all(same(after_phase1[layer.name], before[layer.name]) for layer in base_layers(model))
    assert not same(after_phase1["head_predictions"], before["head_predictions"])


@pytest.mark.slow
def test_phase_two_changes_only_the_unfrozen_layers(trained):
    spec, model, before, probe, history, _ = trained
    start, end = probe.weights_at_end
    base = base_layers(model)
    frozen = base[:-spec.unfreeze_layers] + [
        layer for layer in base if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert all(same(end[layer.name], start[layer.name]) for layer in frozen)
    assert any(not same(end[layer.name], start[layer.name]) for layer in base[-spec.unfreeze_layers:])


@pytest.mark.slow  # VGG16
def test_early_stopping_keeps_phase_one_when_fine_tuning_only_hurts():
    spec = ARCHITECTURES["vgg16"]
    model = build_model(spec.key, image_size=32, weights=None)
    data = tiny_data(spec, n=8)
    probe = PhaseProbe()
    # A learning rate of 10 wrecks the unfrozen layers in one step: validation loss can only get worse.
    cfg = RunConfig(arch=spec.key, epochs=2, image_size=32, weights=None, recipe="fine-tune", run_eagerly=True,
                    finetune_lr=10.0)
    history = fine_tune(model, data, data, cfg, verbose=0, callbacks=[probe])
    assert history["val_loss"][1] > history["val_loss"][0]
    assert history["meta"]["best_epoch"] == 1
    assert all(same(w, probe.weights_at_end[0][name]) for name, w in layer_weights(model).items())


@pytest.mark.slow
def test_epochs_that_phase_one_leaves_unused_go_to_phase_two():
    spec = ARCHITECTURES["vgg16"]
    data = tiny_data(spec)
    # head_lr=0 keeps the validation loss exactly constant, so EarlyStopping (patience 1) ends phase 1 after epoch 2.
    cfg = RunConfig(arch=spec.key, epochs=4, head_epochs=3, head_lr=0.0, patience=1, image_size=32, weights=None,
                    recipe="fine-tune", run_eagerly=True)
    history = fine_tune(build_model(spec.key, image_size=32, weights=None), data, data, cfg, verbose=0)
    assert history["epoch"] == [1, 2, 3, 4] and history["phase"] == [1, 1, 2, 2]


@pytest.mark.slow
def test_phase_two_can_be_switched_off():
    spec = ARCHITECTURES["vgg16"]
    cfg = RunConfig(arch=spec.key, epochs=2, head_epochs=2, image_size=32, weights=None, recipe="fine-tune",
                    run_eagerly=True)
    history = fine_tune(build_model(spec.key, image_size=32, weights=None), tiny_data(spec), None, cfg, verbose=0)
    assert history["phase"] == [1, 1] and history["meta"]["epochs"] == {"phase1": 2, "phase2": 0, "total": 2}


@pytest.fixture(scope="module")
def resumed_run(children):
    """SIGKILL the paused training mid-epoch 2 of 3, then start it again (in-process: a fresh model that
    knows only what is on disk). Returns the state the kill left, the rerun's TrainResult and its config."""
    child, marker = children["to_kill"], children["marker"]
    deadline = time.monotonic() + 300
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), children["log"].read_text()[-3000:]
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    out = children["out"]
    state = json.loads((resume_dir(out, "vgg16") / "state.json").read_text())
    killed_outputs = sorted(p.name for p in out.iterdir())
    cfg = RunConfig(data_dir=str(children["data"]), output_dir=str(out), **RESUME_RUN)
    return state, killed_outputs, train_from_config(cfg, verbose=0), cfg


@pytest.mark.slow  # a training subprocess, SIGKILLed, then VGG16 trained in-process
def test_sigkill_mid_epoch_then_rerun_completes_every_epoch_once(resumed_run):
    state, killed_outputs, result, cfg = resumed_run
    assert [row["epoch"] for row in state["rows"]] == [1]  # the kill came during epoch 2
    assert "vgg16.keras" not in killed_outputs
    history = result.history
    assert history["epoch"] == [1, 2, 3] and history["phase"] == [1, 1, 2]
    assert history["loss"][0] == state["rows"][0]["loss"]  # epoch 1 came from the killed run, not a rerun
    assert history["epoch_seconds"][0] == state["rows"][0]["epoch_seconds"]
    assert history["meta"]["resumed_from_epoch"] == 1 and history["meta"]["epochs"]["total"] == 3
    assert not (cfg.output_path / ".resume").exists()  # cleaned up once the model was saved


@pytest.mark.slow
def test_train_from_config_writes_model_histories_and_the_split_next_to_them(resumed_run):
    _, _, result, cfg = resumed_run
    out = cfg.output_path
    assert result.model_path == out / "vgg16.keras" and result.split_path == out / "split.csv"
    assert result.history_path == out / "vgg16_training_history.json" and result.image_size == 32
    assert result.weights_used == result.history["meta"]["weights_used"] == "none (random init)"
    assert set(result.history["meta"]["class_weights"]) == set(range(5))
    saved = load_history(result.history_path)
    assert saved["epoch"] == [1, 2, 3] and saved["meta"]["split_sha256"] == result.history["meta"]["split_sha256"]
    assert load_history(out / "vgg16_training_history.pkl", allow_pickle=True)["loss"] == saved["loss"]
    loaded, spec = load_trained_model(result.model_path)
    x = np.random.default_rng(1).uniform(-120, 140, (3, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x).numpy(), result.model(x).numpy())


@pytest.mark.slow
def test_models_in_one_folder_share_its_split(resumed_run):
    _, _, result, cfg = resumed_run
    with pytest.raises(SplitError, match="--split"):  # refused before any training
        train_from_config(cfg.replace(arch="resnet50", seed=7), verbose=0)


@pytest.mark.slow  # a training subprocess
def test_mirrored_strategy_on_two_logical_cpus(children):
    child = children["mirrored"]
    stdout, stderr = child.communicate(timeout=300)
    assert child.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["strategy"] == summary["model_strategy"] == "MirroredStrategy" and summary["replicas"] == 2
    assert summary["epochs"] == [1, 2] and summary["loss_finite"] and summary["head_changed"]
