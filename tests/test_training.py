"""fine_tune's two phases, resume after a kill, atomic saving, strategy and precision choice, train_from_config."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from bloodcell_lib.config import RunConfig
from bloodcell_lib.errors import ConfigError, OutputError, SplitError, TrainingInterrupted
from bloodcell_lib.model import base_layers, build_model, head_layers, load_trained_model
from bloodcell_lib.registry import ARCHITECTURES
from bloodcell_lib.synthetic import make_synthetic_dataset
from bloodcell_lib.training import (
    _tpu_address, choose_strategy, configure_precision, fine_tune, load_history, resume_dir, save_history,
    save_model, train_from_config,
)

CHILD = Path(__file__).with_name("_train_child.py")


RESUME_RUN = dict(arch="vgg16", epochs=3, image_size=32, batch_size=16, weights=None, run_eagerly=True, patience=10,
                  class_weights=True)


@pytest.fixture(scope="module", autouse=True)
def children(tmp_path_factory):
    """Start this file's two subprocesses before anything else, so they run alongside the eager in-process
    tests (which leave the second core mostly idle): MirroredStrategy needs a fresh TensorFlow, and the
    training to be SIGKILLed pauses after the first batch of epoch 2 until the resume test kills it."""
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


def _tiny_data(spec, n=4, seed=0):
    """One batch of n random images (already preprocessed) with labels 0..4, as a tf.data.Dataset."""
    size = spec.min_size
    x = spec.preprocess(np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32))
    return tf.data.Dataset.from_tensor_slices((x, np.arange(n) % 5)).batch(n)


def _layer_weights(model):
    return {layer.name: [w.copy() for w in layer.get_weights()] for layer in model.layers}


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


class _PhaseProbe(keras.callbacks.Callback):
    """Record, per phase, how many parameters are trainable and all weights when training ends (before
    EarlyStopping puts the best ones back)."""

    def __init__(self):
        super().__init__()
        self.trainable, self.weights_at_end = [], []

    def on_train_begin(self, logs=None):
        self.trainable.append(int(sum(np.prod(w.shape) for w in self.model.trainable_weights)))

    def on_train_end(self, logs=None):
        self.weights_at_end.append(_layer_weights(self.model))


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def trained(request):
    """Each registry network at its smallest size, fine-tuned one step per phase (eager: no graph tracing)."""
    spec = ARCHITECTURES[request.param]
    model = build_model(spec.key, image_size=spec.min_size, weights=None)
    before = _layer_weights(model)
    probe = _PhaseProbe()
    cfg = RunConfig(arch=spec.key, epochs=2, image_size=spec.min_size, weights=None, run_eagerly=True)
    started = time.monotonic()
    history = fine_tune(model, _tiny_data(spec), None, cfg, verbose=0, callbacks=[probe])
    return spec, model, before, probe, history, time.monotonic() - started


def test_every_network_trains_one_step_per_phase(trained):
    spec, model, before, probe, history, seconds = trained
    print(f"{spec.key}: fine_tune 1+1 steps in {seconds:.1f} s")
    assert history["epoch"] == [1, 2] and history["phase"] == [1, 2]
    assert np.all(np.isfinite(history["loss"]))
    assert history["lr"] == [1e-3, 5e-5]


def test_phase_one_trains_only_the_head_and_phase_two_the_top_layers_but_batchnorm(trained):
    spec, model, before, probe, history, _ = trained
    head = sum(layer.count_params() for layer in head_layers(model))
    top = base_layers(model)[-spec.unfreeze_layers:]
    unfrozen = sum(layer.count_params() for layer in top if not isinstance(layer, keras.layers.BatchNormalization))
    assert probe.trainable == [head, head + unfrozen]
    assert history["meta"]["trainable_params"] == {"phase1": head, "phase2": head + unfrozen}


def test_phase_one_leaves_the_base_and_its_batchnorm_statistics_untouched(trained):
    spec, model, before, probe, history, _ = trained
    after_phase1 = probe.weights_at_end[0]
    assert all(_same(after_phase1[layer.name], before[layer.name]) for layer in base_layers(model))
    assert not _same(after_phase1["head_predictions"], before["head_predictions"])


def test_phase_two_changes_only_the_unfrozen_layers(trained):
    spec, model, before, probe, history, _ = trained
    start, end = probe.weights_at_end
    base = base_layers(model)
    frozen = base[:-spec.unfreeze_layers] + [
        layer for layer in base if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert all(_same(end[layer.name], start[layer.name]) for layer in frozen)
    assert any(not _same(end[layer.name], start[layer.name]) for layer in base[-spec.unfreeze_layers:])


def test_early_stopping_keeps_phase_one_when_fine_tuning_only_hurts():
    spec = ARCHITECTURES["vgg16"]
    model = build_model(spec.key, image_size=32, weights=None)
    data = _tiny_data(spec, n=8)
    probe = _PhaseProbe()
    # A learning rate of 10 wrecks the unfrozen layers in one step: validation loss can only get worse.
    cfg = RunConfig(arch=spec.key, epochs=2, image_size=32, weights=None, run_eagerly=True, finetune_lr=10.0)
    history = fine_tune(model, data, data, cfg, verbose=0, callbacks=[probe])
    assert history["val_loss"][1] > history["val_loss"][0]
    assert history["meta"]["best_epoch"] == 1
    assert all(_same(w, probe.weights_at_end[0][name]) for name, w in _layer_weights(model).items())


def test_epochs_that_phase_one_leaves_unused_go_to_phase_two():
    spec = ARCHITECTURES["vgg16"]
    data = _tiny_data(spec)
    # head_lr=0 keeps the validation loss exactly constant, so EarlyStopping (patience 1) ends phase 1 after epoch 2.
    cfg = RunConfig(arch=spec.key, epochs=4, head_epochs=3, head_lr=0.0, patience=1, image_size=32, weights=None,
                    run_eagerly=True)
    history = fine_tune(build_model(spec.key, image_size=32, weights=None), data, data, cfg, verbose=0)
    assert history["epoch"] == [1, 2, 3, 4] and history["phase"] == [1, 1, 2, 2]


def test_phase_two_can_be_switched_off():
    spec = ARCHITECTURES["vgg16"]
    cfg = RunConfig(arch=spec.key, epochs=2, head_epochs=2, image_size=32, weights=None, run_eagerly=True)
    history = fine_tune(build_model(spec.key, image_size=32, weights=None), _tiny_data(spec), None, cfg, verbose=0)
    assert history["phase"] == [1, 1] and history["meta"]["epochs"] == {"phase1": 2, "phase2": 0, "total": 2}


class _Interrupt(keras.callbacks.Callback):
    """Stand-in for a disconnect inside fit(): raise at the start of a given (1-based) epoch."""

    def __init__(self, epoch):
        super().__init__()
        self.at = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch + 1 == self.at:
            raise KeyboardInterrupt(f"interrupted in epoch {self.at}")


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


def test_models_in_one_folder_share_its_split(resumed_run):
    _, _, result, cfg = resumed_run
    with pytest.raises(SplitError, match="--split"):  # refused before any model is built
        train_from_config(cfg.replace(arch="resnet50", seed=7), verbose=0)


def test_a_run_interrupted_between_phases_skips_the_finished_phase(tmp_path):
    spec = ARCHITECTURES["vgg16"]
    data = _tiny_data(spec)
    cfg = RunConfig(arch=spec.key, epochs=2, image_size=32, weights=None, run_eagerly=True)
    first = build_model(spec.key, image_size=32, weights=None)
    with pytest.raises(TrainingInterrupted, match="interrupted after epoch 1; run the same command again"):
        fine_tune(first, data, data, cfg, resume_dir=tmp_path, verbose=0, callbacks=[_Interrupt(epoch=2)])
    after_phase1 = _layer_weights(first)

    probe = _PhaseProbe()
    fresh = build_model(spec.key, image_size=32, weights=None)
    history = fine_tune(fresh, data, data, cfg, resume_dir=tmp_path, verbose=0, callbacks=[probe])
    assert history["epoch"] == [1, 2] and history["meta"]["resumed_from_epoch"] == 1
    assert len(probe.trainable) == 1  # only phase 2 ran
    # Phase 2 started from phase 1's weights as saved, not from the fresh model's random ones.
    assert all(_same(after_phase1[layer.name], probe.weights_at_end[0][layer.name])
               for layer in base_layers(fresh)[:-spec.unfreeze_layers])


def test_resume_state_of_other_settings_is_not_used_and_is_kept_aside(tmp_path, capsys):
    spec = ARCHITECTURES["vgg16"]
    data = _tiny_data(spec)
    resume = tmp_path / "resume"
    cfg = RunConfig(arch=spec.key, epochs=2, image_size=32, weights=None, run_eagerly=True)
    with pytest.raises(TrainingInterrupted, match="interrupted after epoch 1; run the same command again"):
        fine_tune(build_model(spec.key, image_size=32, weights=None), data, None, cfg, resume_dir=resume,
                  verbose=0, callbacks=[_Interrupt(epoch=2)])
    saved = sorted(p.name for p in resume.iterdir())
    history = fine_tune(build_model(spec.key, image_size=32, weights=None), data, None, cfg.replace(batch_size=8),
                        resume_dir=resume, verbose=0)
    assert history["meta"]["resumed_from_epoch"] is None and history["epoch"] == [1, 2]
    # Saved progress is never deleted implicitly: it is kept aside, and the notice says what differs and where.
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("resume.set-aside-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == saved
    out = capsys.readouterr().out
    assert "batch_size 32 → 8" in out and str(aside[0]) in out and f"Delete {aside[0]}" in out


def test_mirrored_strategy_on_two_logical_cpus(children):
    child = children["mirrored"]
    stdout, stderr = child.communicate(timeout=300)
    assert child.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["strategy"] == summary["model_strategy"] == "MirroredStrategy" and summary["replicas"] == 2
    assert summary["epochs"] == [1, 2] and summary["loss_finite"] and summary["head_changed"]


def test_this_cpu_machine_gets_the_default_strategy_and_float32():
    assert configure_precision() == "float32"
    assert keras.mixed_precision.global_policy().name == "float32"
    strategy = choose_strategy()
    assert not isinstance(strategy, (tf.distribute.MirroredStrategy, tf.distribute.TPUStrategy))
    assert strategy.num_replicas_in_sync == 1


def test_tpu_is_looked_for_only_where_a_runtime_announces_one():
    assert _tpu_address({}, []) is None
    assert _tpu_address({"COLAB_TPU_ADDR": "10.0.0.2:8470"}, []) == "grpc://10.0.0.2:8470"
    assert _tpu_address({}, ["/dev/accel0"]) == "local"


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


def test_history_json_is_read_by_default_and_pickle_only_on_request(tmp_path):
    history = {"epoch": [1, 2], "phase": [1, 2], "loss": [1.5, np.float32(1.25)], "meta": {"weights_used": "imagenet"}}
    path = save_history(history, tmp_path / "vgg16_training_history.json", meta={"image_size": 224})
    saved = load_history(path)
    assert saved["loss"] == [1.5, 1.25] and saved["meta"] == {"weights_used": "imagenet", "image_size": 224}
    pkl = path.with_suffix(".pkl")
    with pytest.raises(ConfigError, match="allow_pickle=True"):
        load_history(pkl)
    assert load_history(pkl, allow_pickle=True) == {"epoch": [1, 2], "phase": [1, 2], "loss": [1.5, 1.25]}
    assert pickle.loads(pkl.read_bytes()) == load_history(pkl, allow_pickle=True)  # the seed's plain dict of lists
