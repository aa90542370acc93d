"""Evaluation end to end on real files: two trained models, the CLI, results JSON, predictions CSV, compare."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, f1_score

from bloodcell_lib.classes import CLASSES
from bloodcell_lib.evaluation import select_gradcam_examples
from bloodcell_lib.explain import gradcam_side_by_side
from bloodcell_lib.results import PROB_COLUMNS, load_gradcam
from _smoke_study import SMOKE_STUDY_MODELS

ARCHS = SMOKE_STUDY_MODELS  # the session's smoke study (tests/conftest.py): VGG16 and ResNet50 through run_all.py


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bloodcell_lib", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def evaluated(smoke_study):
    """The smoke study's output folder: both models trained and evaluated by their notebooks."""
    run, out = smoke_study
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return None, out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.slow  # the session's smoke study
def test_numbers_recompute_from_the_predictions_csv(evaluated, arch):
    _, out = evaluated
    results = json.loads((out / f"{arch}_results.json").read_text())
    frame = pd.read_csv(out / f"{arch}_predictions.csv")
    assert list(frame.columns[:3]) == ["path", "true_label", "pred_label"]
    assert [c for c in frame.columns if c.startswith("prob_")] == PROB_COLUMNS
    assert results["metrics"]["accuracy"] == pytest.approx(accuracy_score(frame.true_label, frame.pred_label))
    assert results["metrics"]["macro_f1"] == pytest.approx(f1_score(frame.true_label, frame.pred_label,
                                                                      average="macro"))
    split = pd.read_csv(out / "split.csv")
    assert sorted(frame.path) == sorted(split.loc[split.subset == "test", "path"])


@pytest.mark.slow  # the session's smoke study
def test_results_file_holds_every_block(evaluated):
    _, out = evaluated
    results = json.loads((out / "resnet50_results.json").read_text())
    for key in ("architecture", "weights", "image_size", "epochs", "split", "metrics", "cost", "explainability",
                "versions", "config"):
        assert results.get(key) is not None, key
    assert results["image_size"] == 32 and results["weights"].startswith("none")
    assert len(results["split"]["sha256"]) == 64 and sum(results["split"]["sizes"].values()) == 80
    assert 1 <= results["epochs"]["total"] <= 2  # the smoke profile's budget; early stopping may use fewer
    for key in ("accuracy", "macro_f1", "weighted_f1", "roc_auc_macro", "log_loss", "ece", "myeloblast_recall"):
        low, high = results["metrics"][f"{key}_ci"]
        assert low is None or low <= high
    assert {"gradcam", "gradcam++"} <= set(results["explainability"])
    assert results["cost"]["params_total"] > 0 and results["cost"]["latency_ms_batch1_median"] > 0
    for name in ("confusion", "confusion_normalised", "roc", "curves", "gradcam", "samples"):
        assert (out / f"resnet50_{name}.png").stat().st_size > 1000


@pytest.mark.slow  # the session's smoke study, CLI subprocesses
def test_compare_cli_prints_both_models_baseline_and_mcnemar(evaluated):
    _, out = evaluated
    assert _cli("baseline", "--split", str(out / "split.csv"), "--output", str(out)).returncode == 0
    run = _cli("compare", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    for name in ("VGG16", "ResNet50", "Colour-only baseline", "McNemar"):
        assert name in run.stdout
    mcnemar = pd.read_csv(out / "mcnemar.csv", index_col=0)
    p = mcnemar.loc["vgg16", "resnet50"]
    assert 0.0 <= p <= 1.0
    assert len(pd.read_csv(out / "comparison.csv")) == 4  # two CNNs, their soft-vote ensemble, the baseline


def test_gradcam_examples_are_chosen_from_the_true_labels_alone():
    labels = np.tile(CLASSES, 4)  # 20 test images, 4 per class, classes interleaved as in a split file
    idx = select_gradcam_examples(labels, 10, seed=7)
    chosen = labels[idx]
    assert len(idx) == 10 and len(set(idx)) == 10
    assert all((chosen == name).sum() == 2 for name in CLASSES)  # class-stratified
    assert list(chosen) == sorted(chosen, key=CLASSES.index)  # grouped by class, in CLASSES order
    # Seeded, and no predictions involved: every model of a study is explained on these very images.
    assert np.array_equal(idx, select_gradcam_examples(list(labels), 10, seed=7))
    assert not np.array_equal(idx, select_gradcam_examples(labels, 10, seed=8))
    # A smaller n takes the first of each class: the side-by-side figure's images are among every run's.
    assert set(select_gradcam_examples(labels, 5, seed=7)) == set(idx[::2])
    # A class with few images gives what it has; the others fill up.
    scarce = np.array(["basophil"] + ["monocyte"] * 6 + ["myeloblast"] * 6)
    picked = scarce[select_gradcam_examples(scarce, 8, seed=0)]
    assert list(picked).count("basophil") == 1 and sorted(set(picked)) == ["basophil", "monocyte", "myeloblast"]
    assert len(select_gradcam_examples(scarce, 50, seed=0)) == len(scarce)
    assert len(select_gradcam_examples(scarce, 0, seed=0)) == 0


@pytest.mark.slow  # the session's smoke study
def test_every_model_is_explained_on_the_same_images_and_shown_side_by_side(evaluated):
    _, out = evaluated
    saved = [load_gradcam(out, arch) for arch in ARCHS]
    assert saved[0].paths == saved[1].paths and len(saved[0].paths) == 10
    assert {CLASSES[t] for t in saved[0].true} == set(CLASSES)
    for arch, examples in zip(ARCHS, saved):
        block = json.loads((out / f"{arch}_results.json").read_text())["explainability"]
        assert block["image_paths"] == examples.paths and block["examples_file"] == f"{arch}_gradcam.npz"
        frame = pd.read_csv(out / f"{arch}_predictions.csv").set_index("path")
        assert [CLASSES[p] for p in examples.pred] == list(frame.loc[examples.paths, "pred_label"])
        assert [CLASSES[t] for t in examples.true] == list(frame.loc[examples.paths, "true_label"])
        assert examples.heatmaps.dtype == np.float16 and examples.heatmaps.shape == (10, 32, 32)
        assert examples.heatmaps.max() <= 1.0 and examples.heatmaps.min() >= 0.0
    fig = gradcam_side_by_side(out)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == len(ARCHS) * len(CLASSES)  # a row per model, one image per class
    assert shown[0].get_title().startswith("VGG16") and shown[len(CLASSES)].get_title().startswith("ResNet50")


@pytest.mark.slow  # a CLI subprocess
def test_missing_model_file_is_a_clear_error(tmp_path):
    run = _cli("evaluate", "--model", str(tmp_path / "nope.keras"), "--split", str(tmp_path / "s.csv"))
    assert run.returncode == 2 and "nope.keras" in run.stderr


# --- One resampling for everyone; a model is evaluated on the split it was trained on -------------------------
# A tiny registry network (one convolution) keeps these tests to seconds: what they check is the bookkeeping
# around the model, which is the same for every architecture.


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """A small synthetic set, split A (the study's) and split B of the same set, and a tiny network trained for
    one epoch on A through train_from_config in the smoke profile, as a notebook would."""
    from _tinynet import TINYNET
    from bloodcell_lib.config import profile_config
    from bloodcell_lib.registry import ARCHITECTURES
    from bloodcell_lib.split import load_split, make_split, save_split
    from bloodcell_lib.synthetic import TINY_SET, make_synthetic_dataset
    from bloodcell_lib.training import train_from_config

    spec = TINYNET
    ARCHITECTURES[spec.key] = spec
    try:
        root = tmp_path_factory.mktemp("tiny_study")
        data, out = root / "data", root / "OUT"
        make_synthetic_dataset(data, seed=3, **TINY_SET)
        split_a = save_split(make_split(data, seed=1, progress=False), out / "split.csv")
        split_b = save_split(make_split(data, seed=2, progress=False), root / "other" / "split_b.csv")
        cfg = profile_config("smoke", arch=spec.key, data_dir=str(data), output_dir=str(out), epochs=1)
        split = load_split(split_a)
        result = train_from_config(cfg.replace(split_path=str(split_a)), verbose=0)
        yield {"cfg": cfg, "result": result, "split": split, "split_a": split_a, "split_b": split_b, "root": root}
    finally:
        del ARCHITECTURES[spec.key]


def _intervals(results):
    return {k: v for k, v in results["metrics"].items() if k.endswith("_ci")}


@pytest.mark.slow  # ~6 s: the evaluate command end to end
def test_cli_evaluate_gives_the_notebooks_intervals_and_records_the_resampling(tiny_study, tmp_path):
    from bloodcell_lib import study
    from bloodcell_lib.cli import main
    from bloodcell_lib.split import dataset_fingerprint, split_sha256

    cfg, result, split = tiny_study["cfg"], tiny_study["result"], tiny_study["split"]
    study.evaluate(cfg.replace(output_dir=str(tmp_path / "notebook")), result, split)
    assert main(["evaluate", "--model", str(result.model_path), "--split", str(tiny_study["split_a"]),
                 "--output", str(tmp_path / "cli")]) == 0
    # The files both paths wrote (NaN is null there, so undefined per-class intervals compare equal).
    notebook = json.loads((tmp_path / "notebook" / "tinynet_results.json").read_text())
    cli = json.loads((tmp_path / "cli" / "tinynet_results.json").read_text())
    assert _intervals(cli) == _intervals(notebook) and len(_intervals(cli)) == 8  # 7 scalars + per_class_ci
    # The smoke profile's resampling (not the paper's 1000): the CLI took it from the model's training run.
    assert notebook["metrics"]["bootstrap"]["n_boot"] == cli["metrics"]["bootstrap"]["n_boot"] == 100
    assert notebook["metrics"]["bootstrap"]["seed"] == cli["metrics"]["bootstrap"]["seed"] == cfg.seed == 42
    assert cli["config"]["bootstrap"] == 100 and cli["config"]["profile"] == "smoke"
    # Provenance: both results name the split file and the images, and say they match the training run.
    for results in (notebook, cli):
        assert results["split"]["sha256"] == split_sha256(tiny_study["split_a"])
        assert results["split"]["dataset_sha256"] == dataset_fingerprint(split)
        assert results["split"]["matches_training_split"] is True


def test_the_baseline_is_resampled_like_the_models_beside_it(tiny_study, tmp_path, capsys):
    from bloodcell_lib.baseline import ensure_shortcut_baseline
    from bloodcell_lib.cli import main
    from bloodcell_lib.config import DEFAULT_BOOTSTRAP, DEFAULT_SEED

    split_a, model = str(tiny_study["split_a"]), str(tiny_study["result"].model_path)
    # No model in the folder yet: the profile's (paper) resampling, whose seed is the networks' too.
    assert main(["baseline", "--split", split_a, "--output", str(tmp_path / "alone")]) == 0
    alone = json.loads((tmp_path / "alone" / "shortcut_baseline_results.json").read_text())
    assert alone["metrics"]["bootstrap"]["seed"] == DEFAULT_SEED
    assert alone["metrics"]["bootstrap"]["n_boot"] == DEFAULT_BOOTSTRAP

    out = tmp_path / "study"
    assert main(["evaluate", "--model", model, "--split", split_a, "--output", str(out)]) == 0
    assert main(["baseline", "--split", split_a, "--output", str(out)]) == 0
    network = json.loads((out / "tinynet_results.json").read_text())["metrics"]["bootstrap"]
    baseline = json.loads((out / "shortcut_baseline_results.json").read_text())
    assert (baseline["metrics"]["bootstrap"]["seed"], baseline["metrics"]["bootstrap"]["n_boot"]) == (
        network["seed"], network["n_boot"]) == (42, 100)
    assert baseline["split"]["sha256"] == json.loads((out / "tinynet_results.json").read_text())["split"]["sha256"]
    assert len(baseline["split"]["dataset_sha256"]) == 64

    # The Comparison notebook's step keeps a baseline that matches, and redoes one that does not.
    (tmp_path / "alone" / "tinynet_results.json").write_text(json.dumps({"metrics": {"bootstrap": network}}))
    assert ensure_shortcut_baseline(split_a, tmp_path / "alone")["metrics"]["bootstrap"]["n_boot"] == 100
    before = (out / "shortcut_baseline_results.json").stat().st_mtime_ns
    ensure_shortcut_baseline(split_a, out)
    assert (out / "shortcut_baseline_results.json").stat().st_mtime_ns == before


def test_evaluate_refuses_a_split_the_model_was_not_trained_on(tiny_study, tmp_path, capsys):
    from bloodcell_lib.cli import main
    from bloodcell_lib.split import split_sha256

    model, split_b = str(tiny_study["result"].model_path), str(tiny_study["split_b"])
    capsys.readouterr()
    assert main(["evaluate", "--model", model, "--split", split_b, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert split_sha256(tiny_study["split_a"]) in err and split_sha256(split_b) in err
    assert str(tiny_study["split_a"]) in err and "--allow-other-split" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2
    assert not list(tmp_path.iterdir())  # refused before anything was predicted or written


def test_allow_other_split_evaluates_and_labels_the_results(tiny_study, tmp_path, caplog):
    from bloodcell_lib.cli import main
    from bloodcell_lib.split import split_sha256

    model, split_b = str(tiny_study["result"].model_path), str(tiny_study["split_b"])
    assert main(["evaluate", "--model", model, "--split", split_b, "--output", str(tmp_path),
                 "--allow-other-split", "--gradcam-images", "0"]) == 0
    assert "not on" in caplog.text and "matches_training_split: false" in caplog.text
    block = json.loads((tmp_path / "tinynet_results.json").read_text())["split"]
    assert block["matches_training_split"] is False
    assert block["sha256"] == split_sha256(split_b)
    assert block["training_split_sha256"] == split_sha256(tiny_study["split_a"])


def test_a_model_without_recorded_provenance_is_evaluated_with_a_warning(tiny_study, tmp_path, caplog):
    import shutil

    from bloodcell_lib.cli import main

    old = tmp_path / "old" / "tinynet.keras"  # an older run: the model file, no training history beside it
    old.parent.mkdir()
    shutil.copy(tiny_study["result"].model_path, old)
    assert main(["evaluate", "--model", str(old), "--split", str(tiny_study["split_b"]), "--profile", "smoke",
                 "--gradcam-images", "0"]) == 0
    assert "records no training split" in caplog.text
    results = json.loads((old.parent / "tinynet_results.json").read_text())
    assert results["split"]["matches_training_split"] is None
    assert results["metrics"]["bootstrap"]["n_boot"] == 100  # --profile smoke


def test_the_training_history_records_the_split_the_images_and_the_configuration(tiny_study):
    from bloodcell_lib.split import dataset_fingerprint, split_sha256

    saved = json.loads(tiny_study["result"].history_path.read_text())["meta"]  # plain JSON: no TensorFlow needed
    assert saved["split_sha256"] == split_sha256(tiny_study["split_a"])
    assert saved["dataset_sha256"] == dataset_fingerprint(tiny_study["split"])
    assert saved["config"]["bootstrap"] == 100 and saved["config"]["seed"] == 42


# --- One test pass; calibration, test-time augmentation and the shortcut test beside it -----------------------


def test_the_test_subset_gets_exactly_one_prediction_pass(tiny_study, tmp_path, monkeypatch):
    from bloodcell_lib import evaluation

    subsets = []
    original = evaluation.predict_subset
    monkeypatch.setattr(evaluation, "predict_subset", lambda model, split, subset, **k: subsets.append(subset)
                        or original(model, split, subset, **k))
    results = evaluation.evaluate(tiny_study["result"].model, tiny_study["split"], "test", tmp_path,
                                  gradcam_images=0, n_boot=10, make_figures=False, cost_repeats=1, tta=True)
    # The plain test images once (the predictions CSV), the validation subset once (the temperature); TTA and
    # the shortcut test show the model other images, in files of their own.
    assert sorted(subsets) == ["test", "val"]
    assert results["predictions_file"] == "tinynet_predictions.csv"
    assert results["tta"]["predictions_file"] == "tinynet_tta_predictions.csv"
    assert results["calibration"]["val_predictions_file"] == "tinynet_val_predictions.csv"


@pytest.fixture(scope="module")
def tiny_evaluated(tiny_study, tmp_path_factory):
    from bloodcell_lib.evaluation import evaluate

    out = tmp_path_factory.mktemp("tiny_evaluated")
    results = evaluate(tiny_study["result"].model, tiny_study["split"], "test", out, gradcam_images=0, n_boot=50,
                       seed=5, make_figures=True, cost_repeats=1, tta=True, config={"profile": "smoke"})
    return results, out


def test_the_temperature_is_fitted_on_the_validation_predictions_file(tiny_study, tiny_evaluated):
    from bloodcell_lib.calibration import calibration_report

    results, out = tiny_evaluated
    val = pd.read_csv(out / "tinynet_val_predictions.csv")
    test = pd.read_csv(out / "tinynet_predictions.csv")
    split = tiny_study["split"]
    assert sorted(val.path) == sorted(split.loc[split.subset == "val", "path"])
    block = results["calibration"]
    again = calibration_report(val.true_label, val[PROB_COLUMNS].to_numpy(), test.true_label,
                               test[PROB_COLUMNS].to_numpy(), groups=test.group.to_numpy(), n_boot=50, seed=5)
    assert block["temperature"] == pytest.approx(again["temperature"]) and block["temperature"] > 0
    for key in ("ece", "classwise_ece", "brier", "log_loss"):
        assert block["before"][key] == pytest.approx(again["before"][key])
        assert block["after"][key] == pytest.approx(again["after"][key])
    assert block["before"]["ece"] == pytest.approx(results["metrics"]["ece"])  # the test pass, uncalibrated
    assert (out / "tinynet_reliability.png").stat().st_size > 1000
    assert str(out / "tinynet_reliability.png") in results["figures"]


def test_tta_is_scored_from_its_own_file_beside_the_plain_pass(tiny_evaluated):
    from bloodcell_lib.metrics import paired_comparison

    results, out = tiny_evaluated
    plain = pd.read_csv(out / "tinynet_predictions.csv")
    tta = pd.read_csv(out / "tinynet_tta_predictions.csv")
    assert list(tta.path) == list(plain.path) and list(tta.group) == list(plain.group)
    block = results["tta"]
    assert block["enabled"] is True and block["views"] == 8 and block["why"] == "given explicitly"
    assert block["macro_f1"] == pytest.approx(f1_score(tta.true_label, tta.pred_label, average="macro"))
    assert block["accuracy"] == pytest.approx(accuracy_score(tta.true_label, tta.pred_label))
    assert block["accuracy_plain"] == pytest.approx(results["metrics"]["accuracy"])
    paired = paired_comparison(tta.true_label, tta[PROB_COLUMNS].to_numpy(), plain[PROB_COLUMNS].to_numpy(),
                               groups=plain.group.to_numpy(), metric="macro_f1", n_boot=50, seed=5)
    assert block["macro_f1_delta"] == pytest.approx(paired["delta"])
    assert block["macro_f1_delta_ci"] == pytest.approx(paired["ci"], nan_ok=True)
    assert len(block["macro_f1_ci"]) == 2


def test_the_shortcut_test_is_recorded_with_the_test_pass_as_original(tiny_evaluated):
    results, _ = tiny_evaluated
    block = results["shortcut_test"]
    assert block["original"]["accuracy"] == pytest.approx(results["metrics"]["accuracy"])
    assert block["original"]["accuracy_ci"] == pytest.approx(results["metrics"]["accuracy_ci"], nan_ok=True)
    for variant in ("background_only", "cell_only"):
        assert 0.0 <= block[variant]["accuracy"] <= 1.0 and len(block[variant]["accuracy_ci"]) == 2
    assert block["mask_source"] == "synthetic manifest ellipses" and block["empty_masks"] == 0
    assert 0.0 < block["cell_share_mean"] < 0.6 and block["chance"] >= 0.2
    assert isinstance(block["flagged"], bool)


def test_tta_follows_the_profile_unless_told():
    from bloodcell_lib.evaluation import TTA_BY_PROFILE, tta_setting

    # smoke: tiny images, so CI scores TTA (and the cross-validation's out-of-fold TTA) on every run.
    assert TTA_BY_PROFILE == {"paper": True, "demo": False, "smoke": True}
    assert tta_setting(None, "paper")[0] is True and tta_setting(None, "demo")[0] is False
    assert "demo profile" in tta_setting(None, "demo")[1]
    assert tta_setting(False, "paper") == (False, "given explicitly")
    assert tta_setting(None, None)[0] is True  # no profile recorded: the default one, paper


def test_tta_averages_the_eight_orientations():
    from bloodcell_lib.evaluation import dihedral_views, tta_proba

    image = np.random.default_rng(0).integers(0, 255, (1, 6, 6, 3), dtype=np.uint8)
    views = list(dihedral_views(image))
    assert len(views) == 8 and np.array_equal(views[0], image)
    assert len({v.tobytes() for v in views}) == 8  # eight different orientations of an asymmetric image
    def corner(x):  # reads one corner pixel: its view of the image depends on the orientation
        return np.stack([x[:, 0, 0, 0] / 255.0, 1 - x[:, 0, 0, 0] / 255.0, *np.zeros((3, len(x)))], 1)

    expected = np.mean([corner(v) for v in views], axis=0)
    assert np.allclose(tta_proba(corner, image), expected)
    def blind(x):  # the mean of all pixels: the same in every orientation
        return np.tile(x.reshape(len(x), -1).mean(axis=1, keepdims=True), (1, 5)) / 255.0

    assert np.allclose(tta_proba(blind, image), blind(image))  # orientation-blind: TTA changes nothing


def test_a_failure_after_the_test_pass_leaves_no_file_behind(tiny_study, tmp_path, monkeypatch):
    from bloodcell_lib import evaluation

    def broken(*_, **__):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(evaluation, "shortcut_test", broken)
    with pytest.raises(RuntimeError, match="disk gone"):
        evaluation.evaluate(tiny_study["result"].model, tiny_study["split"], "test", tmp_path, gradcam_images=0,
                            n_boot=10, make_figures=False, cost_repeats=1, tta=True)
    assert list(tmp_path.iterdir()) == []


def test_the_image_predictor_through_the_shared_traced_pass_equals_predict_on_batch(monkeypatch):
    # TTA and the shortcut test run the forward pass evaluate() traced once for cost and deletion; same numbers.
    import keras

    from bloodcell_lib.cost import compiled_forward
    from bloodcell_lib.evaluation import image_predictor
    from bloodcell_lib.model import build_model
    from bloodcell_lib.registry import ARCHITECTURES
    from _tinynet import TINYNET

    monkeypatch.setitem(ARCHITECTURES, TINYNET.key, TINYNET)
    keras.utils.set_random_seed(0)
    model = build_model("tinynet", image_size=16, weights=None)
    images = np.random.default_rng(0).integers(0, 255, (37, 16, 16, 3), dtype=np.uint8)  # two batches, one short
    plain = image_predictor(model, batch_size=32)(images)
    shared = image_predictor(model, batch_size=32, forward=compiled_forward(model))(images)
    assert shared.shape == (37, len(CLASSES)) and np.allclose(shared, plain, atol=1e-6)
    assert image_predictor(model, forward=compiled_forward(model))(images[:0]).shape == (0, len(CLASSES))
