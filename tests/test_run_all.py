"""run_all.py: real papermill runs of the notebooks, a failing notebook does not stop the others."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from bloodcell_lib.classes import CLASSES

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import run_all  # noqa: E402
from bloodcell_lib.progress import RunClock  # noqa: E402

# What must not reach the console: TensorFlow's C++ and absl lines, Jupyter's transport warning.
NOISE = re.compile(r"I0000|E0000|W0000|absl|oneDNN|cuda|cuInit|without encryption|IPKernelApp")


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run_all.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_models_are_chosen_by_key_or_notebook_name():
    available = run_all.model_notebooks()
    assert list(available) == ["vgg16", "resnet50", "xception", "densenet201", "efficientnetb3"]
    assert list(run_all.choose_models(["DenseNet201", "vgg16"], available)) == ["densenet201", "vgg16"]
    with pytest.raises(SystemExit, match="lenet"):
        run_all.choose_models(["lenet"], available)


def _too_small_dataset(root: Path) -> Path:
    """Class folders with one image each: a dataset by its layout, too small to split."""
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        Image.new("RGB", (32, 32), (200, 100, 150)).save(root / name / "a.png")
    return root


@pytest.mark.slow  # the Comparison's papermill kernel
def test_a_failing_notebook_does_not_stop_the_comparison_which_fails_without_model_results(tmp_path, capsys,
                                                                                          monkeypatch):
    # The model notebook fails (as a notebook run does: a result, no exception); the real Comparison still runs.
    monkeypatch.setattr(run_all, "run_jobs", lambda jobs, **kw: [
        run_all.JobResult(job.label, False, 1.0, "ValueError: boom") for job in jobs])
    assert run_all.main(["--profile", "smoke", "--models", "vgg16", "--output", str(tmp_path / "OUT")]) == 1
    out = capsys.readouterr().out
    assert (tmp_path / "OUT" / "executed_notebooks" / "Comparison.ipynb").exists()
    summary = out.split("Summary", 1)[1]
    assert re.search(r"FAILED VGG16 .* boom", summary)
    # The Comparison ran, but a comparison of no model is a failure of the run, not "ok".
    assert "FAILED Comparison" in summary and "no model results" in summary


@pytest.mark.parametrize("args, fragment", [
    (["--data-dir", "{tmp}/no such folder"], "does not exist"),
    (["--data-dir", "{tmp}"], "No class folders found"),
    (["--epochs", "0", "--profile", "smoke"], "epochs must be at least 1"),
    (["--output", "{tmp}/a file", "--profile", "smoke"], "is a file, not a folder"),
    (["--profile", "paper"], "pass --data-dir"),
    (["--data-dir", "{tmp}/small", "--profile", "smoke"], "Add images of those classes"),  # the shared data check
    (["--jobs", "0", "--profile", "smoke"], "--jobs takes auto or a number"),
    (["--jobs", "two", "--profile", "smoke"], "got 'two'"),
])
def test_bad_arguments_are_refused_before_any_kernel_starts(tmp_path, capsys, monkeypatch, args, fragment):
    (tmp_path / "a file").write_text("x")
    if "{tmp}/small" in args:
        _too_small_dataset(tmp_path / "small")
    monkeypatch.setattr(run_all, "run_jobs", lambda *a, **k: pytest.fail("a kernel was started"))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--output" not in argv:
        argv += ["--output", str(tmp_path / "OUT")]
    assert run_all.main(argv + ["--models", "vgg16"]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


@pytest.mark.slow  # the session's smoke study: a papermill kernel per notebook
def test_smoke_run_writes_everything_with_our_lines_only(smoke_study):
    run, out = smoke_study
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for name in ("vgg16.keras", "vgg16_training_history.json", "vgg16_training_history.pkl", "vgg16_results.json",
                 "vgg16_predictions.csv", "resnet50_results.json", "shortcut_baseline_results.json", "comparison.csv",
                 "comparison.md", "comparison.html", "learning_curve.csv", "learning_curve.png",
                 "executed_notebooks/VGG16.ipynb", "executed_notebooks/VGG16-frac0.5.ipynb",
                 "executed_notebooks/Comparison.ipynb"):
        assert (out / name).exists(), name
    executed = json.loads((out / "executed_notebooks" / "VGG16.ipynb").read_text())
    images = [o for c in executed["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 6  # examples, preprocessing, augmentation, curves, confusion, ROC, Grad-CAM
    for line in ("[1/5] VGG16 ok", "[2/5] ResNet50 ok", "[3/5] VGG16-frac0.5 ok", "[5/5] Comparison ok"):
        assert line in run.stdout
    # Our lines only: TensorFlow's C++ start-up lines and Jupyter's warnings go to the kernels' logs.
    console = run.stdout + run.stderr
    assert [line for line in console.splitlines() if NOISE.search(line)] == []
    assert "oneDNN" in (out / "logs" / "VGG16.log").read_text()
    # Progress while the notebook runs: its steps and every epoch, with the time.
    assert re.search(r"\[VGG16\] training phase 1, epoch 1/\d+: val_accuracy [\d.]+.* — elapsed \d+:\d\d", run.stdout)
    assert "[VGG16] data check — elapsed" in run.stdout and "[VGG16] evaluation" in run.stdout
    assert "[Comparison] comparison" in run.stdout
    # Nor in the executed notebooks: no C++ lines, no per-step progress bar.
    for name in ("VGG16.ipynb", "Comparison.ipynb"):
        notebook = json.loads((out / "executed_notebooks" / name).read_text())
        texts = ["".join(o.get("text", "")) for c in notebook["cells"] for o in c.get("outputs", [])]
        assert [t for t in texts if NOISE.search(t) or "\x1b[" in t] == [], name


@pytest.mark.slow  # the session's smoke study
def test_the_learning_curve_point_trains_on_half_the_cells_and_tests_on_the_studys_test_cells(smoke_study):
    _, out = smoke_study
    curve = pd.read_csv(out / "learning_curve.csv")
    assert sorted(zip(curve["architecture"], curve["train_fraction"])) == [
        ("resnet50", 0.5), ("resnet50", 1.0), ("vgg16", 0.5), ("vgg16", 1.0)]
    half, full = (curve[(curve["architecture"] == "vgg16") & (curve["train_fraction"] == f)].iloc[0] for f in (0.5, 1))
    assert half["train_cells"] < full["train_cells"] and half["n_test"] == full["n_test"]
    study = pd.read_csv(out / "split.csv")
    point = pd.read_csv(out / "learning_curve" / "scratch-frac0.5" / "split.csv")
    assert point.loc[point["subset"] == "test", "path"].tolist() == study.loc[study["subset"] == "test", "path"].tolist()
    assert "learning curve" in (out / "comparison.html").read_text(encoding="utf-8")


@pytest.mark.slow  # a papermill kernel per notebook: VGG16 in two folds, then the Comparison
def test_a_two_fold_cross_validation_writes_out_of_fold_results_and_their_comparison(tmp_path):
    out = tmp_path / "OUT"
    run = _run("--profile", "smoke", "--models", "vgg16", "--folds", "2", "--output", str(out))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "[1/3] VGG16-seed42-fold1of2 ok" in run.stdout and "[2/3] VGG16-seed42-fold2of2 ok" in run.stdout
    cv = out / "cv"
    oof = pd.read_csv(cv / "vgg16_oof_predictions.csv")
    study = pd.read_csv(cv / "seed42-fold1of2" / "split.csv")
    assert sorted(oof["path"]) == sorted(study["path"]) and set(oof["fold"]) == {1, 2}  # every image, once
    results = json.loads((cv / "vgg16_results.json").read_text())
    assert results["cv"]["folds"] == 2 and len(results["cv"]["per_fold"]) == 2
    assert results["tta"]["enabled"] and results["calibration"]["temperature"] > 0
    assert results["shortcut_test"]["background_only"]["accuracy"] is not None
    table = (cv / "comparison.md").read_text()
    for text in ("folds mean ± sd", "Colour-only baseline", "background only", "T-scaled"):
        assert text in table, text
    assert (cv / "comparison.html").is_file() and (cv / "shortcut_baseline_oof_predictions.csv").is_file()
    # A rerun skips the folds already done and compares again.
    again = _run("--profile", "smoke", "--models", "vgg16", "--folds", "2", "--output", str(out))
    assert again.returncode == 0 and again.stdout.count("already done") == 2


def test_the_output_folder_is_the_option_else_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOODCELL_OUTPUT", str(tmp_path / "env"))
    cfg, output = run_all.check_arguments(run_all.parse_args(["--profile", "smoke"]))
    assert output == (tmp_path / "env").resolve() and "BLOODCELL_OUTPUT" in cfg.why("output_dir")
    cfg, output = run_all.check_arguments(run_all.parse_args(["--profile", "smoke", "--output", str(tmp_path / "mine")]))
    assert output == (tmp_path / "mine").resolve() and cfg.profile == "smoke"


def test_the_progress_printer_prints_a_line_per_event_of_the_running_notebook(tmp_path):
    path = tmp_path / "progress.jsonl"
    path.write_text('{"event": "step", "step": "from an earlier run"}\n')
    out = io.StringIO()
    printer = run_all.ProgressPrinter(path, RunClock({"VGG16": 4}), out=out, interval=0.05)
    with printer, printer.running("VGG16"):
        with open(path, "a") as f:
            f.write('{"event": "step", "step": "data check"}\n')
            for k in (1, 2, 3):
                f.write(f'{{"event": "epoch", "phase": 1, "epoch": {k}, "epochs": 4, "seconds": 3, '
                        f'"val_accuracy": 0.5}}\n')
            f.write('{"event": "step", "step": "eval')  # half-written: waits for its end
            f.flush()
            printer.poll()
            assert "evaluation" not in out.getvalue()
            f.write('uation"}\n')
    lines = out.getvalue().splitlines()
    assert [line.split(" — ")[0] for line in lines] == [
        "  [VGG16] data check", *[f"  [VGG16] training phase 1, epoch {k}/4: val_accuracy 0.500 (3 s/epoch)"
                                  for k in (1, 2, 3)], "  [VGG16] evaluation"]
    # an estimate once three epochs gave a rate (the first carries the set-up and the graph tracing)
    assert "about" not in lines[1] and "about" in lines[3] and "earlier run" not in out.getvalue()
    assert printer.clock.finished == {"VGG16"}


def _jobs(tmp_path, *argv):
    args = run_all.parse_args(["--profile", "smoke", "--output", str(tmp_path), *argv])
    cfg, output = run_all.check_arguments(args)
    models = run_all.choose_models(args.models, run_all.model_notebooks())
    return run_all.study_jobs(args, cfg, models, output / "executed_notebooks", {"OUTPUT_DIR": str(output)}, {})


def test_cross_validation_plans_one_run_per_seed_fold_and_model(tmp_path):
    jobs = _jobs(tmp_path, "--models", "vgg16", "resnet50", "--folds", "3", "--seeds", "1", "2")
    assert len(jobs) == 2 * 3 * 2
    assert jobs[0].label == "VGG16-seed1-fold1of3" and jobs[-1].label == "ResNet50-seed2-fold3of3"
    assert jobs[-1].parameters == {"OUTPUT_DIR": str(tmp_path), "SEED": 2, "FOLDS": 3, "FOLD": 3}
    assert len({job.target for job in jobs}) == len(jobs)  # every run its own executed notebook


def test_a_learning_curve_plans_the_study_then_one_run_per_extra_point(tmp_path):
    # The smoke profile trains from scratch, so --ablation scratch adds no second curve; 1.0 is the study itself.
    jobs = _jobs(tmp_path, "--models", "vgg16", "--train-fractions", "0.5", "1.0", "--ablation", "scratch")
    assert [job.label for job in jobs] == ["VGG16", "VGG16-frac0.5"]
    assert jobs[1].parameters["TRAIN_FRACTION"] == 0.5 and jobs[1].parameters["CURVE_POINT"] is True
    # With pretrained weights the ablation trains every fraction from scratch too.
    args = run_all.parse_args(["--profile", "demo", "--output", str(tmp_path), "--models", "vgg16", "--ablation",
                               "scratch", "--train-fractions", "0.5", "1.0"])
    cfg, output = run_all.check_arguments(args)
    jobs = run_all.study_jobs(args, cfg, {"vgg16": run_all.model_notebooks()["vgg16"]}, output, {}, {})
    assert [job.label for job in jobs] == ["VGG16", "VGG16-frac0.5", "VGG16-scratch-frac0.5", "VGG16-scratch-frac1"]
    assert jobs[-1].parameters["WEIGHTS"] == "none"


@pytest.mark.parametrize("argv, fragment", [
    (["--folds", "1"], "at least 2 folds"),
    (["--seeds", "1", "2"], "give --folds"),
    (["--folds", "2", "--train-fractions", "0.5"], "one at a time"),
    (["--train-fractions", "0"], "(0, 1]"),
])
def test_bad_study_designs_are_refused_before_any_kernel_starts(tmp_path, capsys, monkeypatch, argv, fragment):
    monkeypatch.setattr(run_all, "run_jobs", lambda *a, **k: pytest.fail("a kernel was started"))
    assert run_all.main(["--profile", "smoke", "--output", str(tmp_path / "OUT"), *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_an_event_that_names_its_run_is_printed_as_that_runs_whatever_runs_now(tmp_path):
    # Under --executor ray several notebooks run at once: each event carries its run's label (BLOODCELL_RUN).
    path = tmp_path / "progress.jsonl"
    out = io.StringIO()
    printer = run_all.ProgressPrinter(path, RunClock({"VGG16-seed1-fold1of2": 2, "VGG16-seed1-fold2of2": 2}), out=out,
                                      interval=0.05)
    with printer:
        path.write_text('{"event": "step", "step": "data check", "run": "VGG16-seed1-fold2of2"}\n')
    assert out.getvalue().startswith("  [VGG16-seed1-fold2of2] data check")
    job = run_all.notebook_job("VGG16-seed1-fold2of2", run_all.model_notebooks()["vgg16"], tmp_path, {}, {"A": "1"})
    assert job.env == {"A": "1", "BLOODCELL_RUN": "VGG16-seed1-fold2of2"}


def test_the_stand_in_cache_and_splits_are_made_once_before_any_notebook_starts(tmp_path, monkeypatch):
    # Notebooks running at once (--jobs 2, --executor ray) must not race to write what they share: the synthetic set
    # (they raced and one read a half-made set), the study's image cache, the splits. The stand-in's seed is
    # synth_seed, not the run's: --seeds 1 2 train on one dataset.
    out = tmp_path / "OUT"
    stamp = out / "synthetic_data" / "synth_params.json"
    seen = {}

    def fake_run_jobs(jobs, **kw):
        seen["stamp"] = json.loads(stamp.read_text())
        seen["splits"] = sorted(str(p.relative_to(out)) for p in out.glob("cv/*/split.csv"))
        index = json.loads(next(out.glob(".image_cache/*px/index.json")).read_text())
        seen["cached"] = len(index["entries"])
        seen["at_once"] = kw["at_once"]
        return [run_all.JobResult(job.label, True, 0.0) for job in jobs]

    monkeypatch.setattr(run_all, "run_jobs", fake_run_jobs)
    monkeypatch.setattr(run_all, "run_step", lambda i, total, job, printer: (job.label, True, 0.0, ""))
    run_all.main(["--profile", "smoke", "--models", "vgg16", "--folds", "2", "--seeds", "1", "2", "--output",
                  str(out), "--jobs", "2"])
    assert seen["stamp"]["seed"] == 42 and seen["stamp"]["per_class"] == 8
    assert seen["splits"] == [f"cv/seed{s}-fold{k}of2/split.csv" for s in (1, 2) for k in (1, 2)]
    assert seen["cached"] == len(pd.read_csv(out / "cv" / "seed1-fold1of2" / "split.csv")) and seen["at_once"] == 2


@pytest.mark.parametrize("gpu, cores, memory, profile, expected", [
    (False, 2, 22.0, "demo", 2),
    (False, 2, 22.0, "smoke", 2),
    (True, 2, 22.0, "demo", 1),  # a GPU is not shared between kernels
    (False, 2, 22.0, "paper", 1),
    (False, 1, 22.0, "demo", 1),
    (False, 8, 4.0, "demo", 1),
])
def test_jobs_auto_runs_two_notebooks_at_once_only_on_a_cpu_machine_with_room(monkeypatch, gpu, cores, memory,
                                                                             profile, expected):
    monkeypatch.setattr(run_all, "gpu_visible", lambda: gpu)
    monkeypatch.setattr(run_all, "available_memory_gb", lambda: memory)
    monkeypatch.setattr(run_all.os, "cpu_count", lambda: cores)
    n, why = run_all.notebooks_at_once("auto", profile, "local")
    assert n == expected and why
    assert run_all.notebooks_at_once("3", profile, "local") == (3, "--jobs")
    assert run_all.notebooks_at_once("auto", profile, "ray")[0] == 1


def test_the_data_check_line_counts_problems_of_the_data_not_the_files_beside_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run_all, "run_jobs", lambda jobs, **kw: [run_all.JobResult(j.label, True, 0.0) for j in jobs])
    monkeypatch.setattr(run_all, "run_step", lambda i, total, job, printer: (job.label, True, 0.0, ""))
    run_all.main(["--profile", "smoke", "--models", "vgg16", "--output", str(tmp_path / "OUT")])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("Data check:"))
    assert "problem" not in line  # the stand-in's manifest beside its class folders is no problem of the data
    data = tmp_path / "OUT" / "synthetic_data"
    (data / "basophil" / "broken.jpg").write_bytes(b"not a jpeg")
    run_all.main(["--profile", "smoke", "--models", "vgg16", "--data-dir", str(data), "--output", str(tmp_path / "B")])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("Data check:"))
    assert "1 problem(s)" in line
