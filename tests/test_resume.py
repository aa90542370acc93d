"""The resume journal: a run interrupted between phases goes on where it stopped; progress of other settings,
of another version or unreadable is set aside, never deleted; finished progress is discarded with .resume/."""

import json

import keras
import pytest

from bloodcell_lib.config import RunConfig
from bloodcell_lib.errors import TrainingInterrupted
from bloodcell_lib.model import base_layers, build_model
from bloodcell_lib.registry import ARCHITECTURES
from bloodcell_lib.resume import RESUME_FOLDER, Journal, discard_progress, resume_dir
from bloodcell_lib.training import fine_tune

from _fine_tune_probes import PhaseProbe, layer_weights, same, tiny_data


class _Interrupt(keras.callbacks.Callback):
    """Stand-in for a disconnect inside fit(): raise at the start of a given (1-based) epoch."""

    def __init__(self, epoch):
        super().__init__()
        self.at = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch + 1 == self.at:
            raise KeyboardInterrupt(f"interrupted in epoch {self.at}")


@pytest.mark.slow  # VGG16
def test_a_run_interrupted_between_phases_skips_the_finished_phase(tmp_path):
    spec = ARCHITECTURES["vgg16"]
    data = tiny_data(spec)
    cfg = RunConfig(arch=spec.key, epochs=2, image_size=32, weights=None, recipe="fine-tune", run_eagerly=True)
    first = build_model(spec.key, image_size=32, weights=None)
    with pytest.raises(TrainingInterrupted, match="interrupted after epoch 1; run the same command again"):
        fine_tune(first, data, data, cfg, resume_dir=tmp_path, verbose=0, callbacks=[_Interrupt(epoch=2)])
    after_phase1 = layer_weights(first)

    probe = PhaseProbe()
    fresh = build_model(spec.key, image_size=32, weights=None)
    history = fine_tune(fresh, data, data, cfg, resume_dir=tmp_path, verbose=0, callbacks=[probe])
    assert history["epoch"] == [1, 2] and history["meta"]["resumed_from_epoch"] == 1
    assert len(probe.trainable) == 1  # only phase 2 ran
    # Phase 2 started from phase 1's weights as saved, not from the fresh model's random ones.
    assert all(same(after_phase1[layer.name], probe.weights_at_end[0][layer.name])
               for layer in base_layers(fresh)[:-spec.unfreeze_layers])


@pytest.mark.slow  # VGG16
def test_resume_state_of_other_settings_is_not_used_and_is_kept_aside(tmp_path, capsys):
    spec = ARCHITECTURES["vgg16"]
    data = tiny_data(spec)
    resume = tmp_path / "resume"
    cfg = RunConfig(arch=spec.key, epochs=2, image_size=32, weights=None, recipe="fine-tune", run_eagerly=True)
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


@pytest.mark.parametrize("state,why", [
    ("{not json", "state.json is unreadable"),
    (json.dumps({"version": 0, "fingerprint": {"arch": "vgg16"}, "rows": [], "phases": {}}), "another version"),
])
def test_an_unreadable_or_foreign_state_is_set_aside_and_training_starts_afresh(tmp_path, capsys, state, why):
    folder = resume_dir(tmp_path, "VGG16")
    assert folder == tmp_path / RESUME_FOLDER / "vgg16"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(state)
    journal = Journal(folder, {"arch": "vgg16"}, verbose=0)
    assert journal.epochs_done() == 0 and journal.resumed_from is None and not folder.exists()
    aside = [p for p in folder.parent.iterdir() if p.name.startswith("vgg16.set-aside-")]
    assert len(aside) == 1 and (aside[0] / "state.json").read_text() == state
    out = capsys.readouterr().out
    assert why in out and "training starts from epoch 1" in out and f"Delete {aside[0]}" in out


def test_finished_progress_is_discarded_and_resume_folder_only_when_empty(tmp_path):
    for arch in ("vgg16", "resnet50"):
        (resume_dir(tmp_path, arch)).mkdir(parents=True)
        (resume_dir(tmp_path, arch) / "state.json").write_text("{}")
    discard_progress(resume_dir(tmp_path, "vgg16"))
    assert sorted(p.name for p in (tmp_path / RESUME_FOLDER).iterdir()) == ["resnet50"]  # another run mid-way
    discard_progress(resume_dir(tmp_path, "resnet50"))
    assert not (tmp_path / RESUME_FOLDER).exists()
