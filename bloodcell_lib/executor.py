"""How the study's notebook runs are executed: here, one or a few at a time, or as Ray tasks on a cluster.

run_all.py builds one NotebookJob per notebook run (model, fold, seed) and hands the list to run_jobs():

    results = run_jobs(jobs)                                 # here, one after another (the default)
    results = run_jobs(jobs, at_once=2)                      # here, two kernels at a time
    results = run_jobs(jobs, executor="ray")                 # a local Ray instance, one task per job
    results = run_jobs(jobs, executor="ray", address="auto") # an existing cluster (`ray start --head` on one node)

Every job runs through run_notebook(): papermill with a kernel whose own output goes to the job's log. A notebook
that fails is a result (ok=False), never an exception and never a retry; a Ray task whose *worker process* died
(killed, out of memory, its node lost) is run again, up to max_retries times.

Ray writes nothing back: each task writes its executed notebook, kernel log and whatever the notebook saves (models,
results JSON) straight to the paths in its job, i.e. into the run's output folder. On one machine that is simply the
local disk; on a cluster of several machines every node must see the output folder (and the data and the notebooks)
at the same path — a shared filesystem (NFS, a mounted bucket, Colab's Drive) — and have bloodcell_lib installed.
Ray is an optional extra (`pip install -e .[ray]`); nothing here needs it unless executor="ray" is asked for.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping, Sequence

import papermill
from jupyter_client.manager import AsyncKernelManager

from .errors import ExecutorError

EXECUTORS = ("local", "ray")
# ipykernel copies what C code writes on descriptors 1 and 2 into the cell's outputs (and onto its own stderr);
# without that copy, TensorFlow's C++ lines stay on the kernel's stderr, which goes to the log.
KERNEL_ARGUMENTS = ["--IPKernelApp.capture_fd_output=False"]
RAY_MISSING = "Ray is an optional extra: pip install -e .[ray]"


@dataclass(frozen=True)
class NotebookJob:
    """One notebook run: execute `source` with `parameters` into `target`, the kernel's own output going to `log`
    (default: beside the target) and `env` added to the kernel's environment."""

    label: str
    source: Path
    target: Path
    parameters: Mapping[str, Any] = field(default_factory=dict)
    log: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def log_path(self) -> Path:
        return self.log or self.target.with_suffix(".log")

    @property
    def attempts_path(self) -> Path:
        """One line per attempt (time, host, process) of a Ray task: how the driver learns the attempt count."""
        return self.log_path.with_suffix(".attempts")


@dataclass(frozen=True)
class JobResult:
    """What became of one job: ok, how long its (last) attempt took, the error's last line, attempts made."""

    label: str
    ok: bool
    seconds: float
    error: str = ""
    attempts: int = 1


OnStart = Callable[[NotebookJob], None]
OnDone = Callable[[NotebookJob, JobResult], None]


def run_jobs(jobs: Sequence[NotebookJob], executor: str = "local", address: str | None = None,
             on_start: OnStart | None = None, on_done: OnDone | None = None, max_retries: int = 2,
             at_once: int = 1) -> list[JobResult]:
    """Run every job and return their results in job order; a failing notebook never stops the others.

    executor: "local" runs the jobs on this machine, `at_once` kernels at a time in job order, calling on_start as
        each starts and on_done as each finishes (from the thread that ran it when at_once > 1). "ray" submits one
        Ray task per job (one GPU each when the cluster has GPUs, else one CPU slot), calls on_start as each is
        submitted and on_done as each finishes, in the order they finish.
    address: the Ray cluster to join ("auto", "ray://host:10001", "host:6379"); None starts a local instance —
        unless Ray is already initialised in this process, which is then used as it is.
    max_retries: how often Ray runs a task again whose worker process died (not used by "local").

    Raises ExecutorError for an unknown executor, at_once below 1, Ray not installed or a cluster that cannot be
    reached.
    """
    check_executor(executor)
    if at_once < 1:
        raise ExecutorError(f"Notebooks at a time must be at least 1, got {at_once}.")
    if executor == "ray":
        return _run_on_ray(jobs, address, on_start, on_done, max_retries)

    def run(job: NotebookJob) -> JobResult:
        if on_start:
            on_start(job)
        result = run_notebook(job)
        if on_done:
            on_done(job, result)
        return result

    if at_once == 1:
        return [run(job) for job in jobs]
    # Threads are enough: each job's work happens in its own kernel process; the thread only waits on it.
    with ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="notebook") as pool:
        return list(pool.map(run, jobs))


def check_executor(executor: str) -> None:
    """Refuse an executor that cannot run here (unknown name, Ray not installed) before any notebook starts."""
    if executor not in EXECUTORS:
        raise ExecutorError(f"Unknown executor {executor!r}. Choose from: {', '.join(EXECUTORS)}.")
    if executor == "ray":
        _import_ray()


def run_notebook(job: NotebookJob) -> JobResult:
    """Execute one notebook with papermill, its kernel's own output going to the job's log; never raises for a
    failing notebook (ok=False and the error's last line instead)."""
    start = time.perf_counter()
    try:
        papermill.execute_notebook(str(job.source), str(job.target), parameters=dict(job.parameters),
                                   cwd=str(job.source.parent), kernel_name="python3", progress_bar=False,
                                   log_output=False,
                                   kernel_manager_class=logged_kernel_manager(job.log_path, dict(job.env)),
                                   extra_arguments=KERNEL_ARGUMENTS)
        return JobResult(job.label, True, time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 — one failing notebook must not stop the others
        message = str(exc).strip().splitlines()
        return JobResult(job.label, False, time.perf_counter() - start,
                         message[-1] if message else exc.__class__.__name__)


def logged_kernel_manager(log_path: Path, env: dict[str, str]) -> type[AsyncKernelManager]:
    """A kernel manager class whose kernels write their stdout and stderr to log_path and get `env` added to
    the environment (papermill takes a kernel manager class, not a log file)."""

    class LoggedKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw: Any) -> None:
            # os.environ of this process: on a Ray worker it holds CUDA_VISIBLE_DEVICES = the task's GPU.
            kw["env"] = {**kw.get("env", os.environ), **env}
            with open(log_path, "ab") as log:  # the kernel holds its own copy of the descriptor
                await super().start_kernel(**kw, stdout=log, stderr=log)

    return LoggedKernelManager


def task_resources(cluster: Mapping[str, float]) -> dict[str, float]:
    """What one notebook task asks Ray for: a GPU when the cluster has any (a notebook trains one network), else
    one CPU slot."""
    return {"num_gpus": 1} if cluster.get("GPU", 0) >= 1 else {"num_cpus": 1}


def _import_ray() -> ModuleType:
    """The ray module, or ExecutorError saying how to install it."""
    try:
        # The one import inside a function: Ray is an optional extra, and the local path (the default, and
        # every test without Ray) must not need it installed.
        import ray
    except ImportError as exc:
        raise ExecutorError(f"--executor ray: Ray is not installed in {sys.prefix}. {RAY_MISSING}") from exc
    return ray


def _notebook_attempt(job: NotebookJob) -> JobResult:
    """One attempt of a job on a Ray worker: record it in the shared folder, then run the notebook."""
    job.log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(job.attempts_path, "a", encoding="utf-8") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} host {socket.gethostname()} pid {os.getpid()}\n")
    return replace(run_notebook(job), attempts=_attempts_made(job))


def _attempts_made(job: NotebookJob) -> int:
    """Attempts recorded so far: Ray does not tell a task which attempt it is, so each one leaves a line."""
    try:
        return len(job.attempts_path.read_text(encoding="utf-8").splitlines())
    except OSError:
        return 0


def _run_on_ray(jobs: Sequence[NotebookJob], address: str | None, on_start: OnStart | None,
                on_done: OnDone | None, max_retries: int) -> list[JobResult]:
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        # Our console lines only: Ray's own logs stay in its session folder (/tmp/ray/session_*/logs).
        local = {} if address else {"include_dashboard": False}
        try:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, **local)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ExecutorError(f"Cannot start or join the Ray cluster at {address or 'a new local instance'}: "
                                f"{exc}. Start one with `ray start --head` and pass its address, or leave "
                                f"--address out for a local instance.") from exc
    try:
        # retry_exceptions=False: only a dead worker is retried; run_notebook returns a failing notebook as a result.
        task = ray.remote(_notebook_attempt)
        options = {"max_retries": max_retries, "retry_exceptions": False, **task_resources(ray.cluster_resources())}
        pending = {}
        for index, job in enumerate(jobs):
            job.attempts_path.unlink(missing_ok=True)  # an earlier run's attempts are not this run's
            if on_start:
                on_start(job)
            pending[task.options(name=job.label, **options).remote(job)] = index  # named in Ray's logs
        results: list[JobResult | None] = [None] * len(jobs)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ref)
            results[index] = _collect(ray, ref, jobs[index], max_retries)
            if on_done:
                on_done(jobs[index], results[index])
        return results  # type: ignore[return-value]  # every slot is filled once pending is empty
    finally:
        if started_here:
            ray.shutdown()


def _collect(ray: ModuleType, ref: Any, job: NotebookJob, max_retries: int) -> JobResult:
    """A finished task's result; a task that could not finish (its worker died on every attempt, or bloodcell_lib
    is missing on the worker) becomes a failed result with Ray's reason."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        reason = str(exc).strip().splitlines()
        return JobResult(job.label, False, 0.0,
                         f"{exc.__class__.__name__}: {reason[0] if reason else ''} (attempts file {job.attempts_path})",
                         attempts=_attempts_made(job) or max_retries + 1)
