"""executor: notebook jobs run here (one or a few at a time) or as Ray tasks; a failing notebook is a result, a dead
worker a retry."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest

from bloodcell_lib.errors import ExecutorError
from bloodcell_lib.executor import NotebookJob, run_jobs, task_resources

# Each tiny notebook appends "<label> start|end <time>" to EVENTS; no TensorFlow, a kernel start is the cost.
PARAMETERS = 'LABEL = ""\nEVENTS = ""\nSLEEP = 0.0\nMARKER = ""'
RECORD = ("import time\n"
          "def record(what):\n"
          "    with open(EVENTS, 'a') as f:\n"
          "        f.write(f'{LABEL} {what} {time.time()}\\n')\n"
          "record('start')\n"
          "time.sleep(SLEEP)\n"
          "record('end')")
FAIL = "raise ValueError('boom: this notebook fails on purpose')"
# First attempt only (no marker yet): SIGKILL the kernel's parent — the process papermill runs in, i.e. the Ray
# worker executing the task — so that Ray sees a dead worker, then the orphaned kernel itself.
KILL_WORKER = ("import os, signal, pathlib\n"
               "marker = pathlib.Path(MARKER)\n"
               "if not marker.exists():\n"
               "    parent = os.getppid()\n"
               "    title = open(f'/proc/{parent}/cmdline', 'rb').read().replace(b'\\0', b' ').decode()\n"
               "    marker.write_text(f'{parent} {title}')\n"
               "    os.kill(parent, signal.SIGKILL)\n"
               "    os.kill(os.getpid(), signal.SIGKILL)")


def _notebook(folder: Path, name: str, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(PARAMETERS, metadata={"tags": ["parameters"]}),
                *(nbformat.v4.new_code_cell(c) for c in cells)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = folder / f"{name}.ipynb"
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def _job(tmp_path: Path, label: str, *cells: str, sleep: float = 0.0) -> NotebookJob:
    source = _notebook(tmp_path / "notebooks", label, *cells)
    out = tmp_path / "OUT" / "executed_notebooks"
    out.mkdir(parents=True, exist_ok=True)
    return NotebookJob(label, source, out / source.name,
                       {"LABEL": label, "EVENTS": str(tmp_path / "events.txt"), "SLEEP": sleep,
                        "MARKER": str(tmp_path / f"{label}.marker")},
                       log=tmp_path / "OUT" / "logs" / f"{label}.log")


def _events(tmp_path: Path) -> list[tuple[str, str, float]]:
    lines = (tmp_path / "events.txt").read_text().split("\n")
    return [(label, what, float(t)) for label, what, t in (line.split() for line in lines if line)]


@pytest.mark.slow  # starts two kernels
def test_local_runs_jobs_in_order_and_a_failing_notebook_does_not_stop_the_rest(tmp_path):
    (tmp_path / "OUT" / "logs").mkdir(parents=True)
    jobs = [_job(tmp_path, "first", RECORD), _job(tmp_path, "failing", RECORD, FAIL), _job(tmp_path, "third", RECORD)]
    calls = []
    results = run_jobs(jobs, on_start=lambda job: calls.append(("start", job.label)),
                       on_done=lambda job, result: calls.append(("done", result.label)))
    assert [(r.label, r.ok, r.attempts) for r in results] == [("first", True, 1), ("failing", False, 1),
                                                              ("third", True, 1)]
    assert "boom" in results[1].error and results[0].error == ""
    assert [label for label, what, _ in _events(tmp_path) if what == "start"] == ["first", "failing", "third"]
    assert calls == [(w, label) for label in ("first", "failing", "third") for w in ("start", "done")]
    for job in jobs:  # executed notebooks (the failing one too, with its error) and kernel logs where the job says
        assert job.target.exists() and job.log_path.exists()
    assert "boom" in json.dumps(json.loads(jobs[1].target.read_text())["cells"])


def test_ray_asked_for_but_not_installed_is_our_error_with_the_install_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    job = _job(tmp_path, "never", RECORD)
    with pytest.raises(ExecutorError, match=re.escape("Ray is an optional extra: pip install -e .[ray]")):
        run_jobs([job], executor="ray")
    assert not job.target.exists()
    with pytest.raises(ExecutorError, match="Choose from: local, ray"):
        run_jobs([job], executor="dask")
    with pytest.raises(ExecutorError, match="at least 1, got 0"):
        run_jobs([job], at_once=0)
    assert not job.target.exists()


@pytest.mark.slow  # starts three kernels
def test_local_runs_two_at_a_time_in_job_order_and_returns_results_in_job_order(tmp_path):
    (tmp_path / "OUT" / "logs").mkdir(parents=True)
    jobs = [_job(tmp_path, "a", RECORD, sleep=3), _job(tmp_path, "b", RECORD, FAIL, sleep=1),
            _job(tmp_path, "c", RECORD)]
    calls = []
    results = run_jobs(jobs, at_once=2, on_start=lambda job: calls.append(("start", job.label)),
                       on_done=lambda job, result: calls.append(("done", result.label)))
    assert [(r.label, r.ok) for r in results] == [("a", True), ("b", False), ("c", True)]
    assert "boom" in results[1].error
    times = {(label, what): t for label, what, t in _events(tmp_path)}
    assert times["b", "start"] < times["a", "end"]  # a and b ran at once
    assert times["c", "start"] > times["b", "end"]  # c waited for a free slot: b's (a sleeps longer)
    assert times["c", "start"] < times["a", "end"]
    assert sorted(calls[:2]) == [("start", "a"), ("start", "b")] and ("done", "b") in calls[:calls.index(("start", "c"))]
    for job in jobs:
        assert job.target.exists() and job.log_path.exists()


def test_a_task_asks_for_a_gpu_when_the_cluster_has_one_else_a_cpu_slot():
    assert task_resources({"CPU": 8.0, "GPU": 2.0}) == {"num_gpus": 1}
    assert task_resources({"CPU": 2.0}) == {"num_cpus": 1}


@pytest.fixture(scope="module")
def local_ray():
    """A small local Ray instance on CPU (two slots) for this module's Ray tests; run_jobs uses it as it is."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow  # a Ray instance and kernels on its workers
def test_ray_runs_two_tasks_at_once_into_the_shared_output_folder(tmp_path, local_ray):
    (tmp_path / "OUT" / "logs").mkdir(parents=True)
    jobs = [_job(tmp_path, "a", RECORD, sleep=4), _job(tmp_path, "b", RECORD, sleep=4)]
    finished = []
    results = run_jobs(jobs, executor="ray", on_done=lambda job, result: finished.append(result.label))
    assert [(r.label, r.ok, r.attempts) for r in results] == [("a", True, 1), ("b", True, 1)]
    assert sorted(finished) == ["a", "b"]
    times = {(label, what): t for label, what, t in _events(tmp_path)}
    # Overlap: each notebook started before the other one ended.
    assert max(times["a", "start"], times["b", "start"]) < min(times["a", "end"], times["b", "end"])
    for job in jobs:
        assert job.target.exists() and job.log_path.exists()


@pytest.mark.slow  # a Ray instance and kernels on its workers
def test_ray_retries_a_task_whose_worker_died_but_not_a_failing_notebook(tmp_path, local_ray):
    (tmp_path / "OUT" / "logs").mkdir(parents=True)
    killed, failing = _job(tmp_path, "killed", KILL_WORKER, RECORD), _job(tmp_path, "failing", FAIL)
    results = run_jobs([killed, failing], executor="ray", max_retries=2)
    assert (results[0].label, results[0].ok, results[0].attempts) == ("killed", True, 2), results[0]
    # The first attempt killed a Ray worker process (its title "ray::..."), the second one ran the notebook.
    assert "ray::" in (tmp_path / "killed.marker").read_text()
    assert [what for label, what, _ in _events(tmp_path) if label == "killed"] == ["start", "end"]
    assert len(killed.attempts_path.read_text().splitlines()) == 2
    # A notebook that fails is a result, not a retry.
    assert (results[1].ok, results[1].attempts) == (False, 1) and "boom" in results[1].error
