"""Run the whole study headlessly: every model notebook with papermill, then the Comparison notebook.

    python run_all.py                                   # demo profile on the synthetic set (no data needed)
    python run_all.py --data-dir "Blood Cell Images"    # the study on the Kaggle folder (paper profile)
    python run_all.py --profile smoke --output OUT      # tiny run, as in CI

Everything the run writes — models, histories, results, figures, executed notebooks — goes to --output.
One failing notebook does not stop the others; the summary at the end names it and the exit code is 1.

The console gets our lines only: while a notebook runs, one line per step and per epoch (from the events the
library appends to --output/progress.jsonl, see bloodcell_lib/progress.py) with the elapsed time and an estimate of
what remains. What the kernels write outside the notebook — TensorFlow's C++ start-up lines, Jupyter's warnings —
goes to --output/logs/<notebook>.log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Iterator

from bloodcell_lib.quiet import native_stderr_to

# Importing TensorFlow (through the registry and the leakage run) prints its C++ start-up lines on descriptor 2,
# past any Python setting: they are kept here and written to logs/run_all.log once the output folder is known.
_STARTUP_LOG = tempfile.TemporaryFile()
with native_stderr_to(_STARTUP_LOG):
    from bloodcell_lib.atomic import write_text
    from bloodcell_lib.config import AUTO, CV_FOLDER, DEFAULT_OUTPUT, PROFILES, RunConfig, resolve
    from bloodcell_lib.cache import StudyCache
    from bloodcell_lib.dataset import IGNORED_KINDS, check_dataset, find_data_root
    from bloodcell_lib.errors import BloodcellError, ConfigError
    from bloodcell_lib.executor import EXECUTORS, JobResult, NotebookJob, check_executor, run_jobs, run_notebook
    from bloodcell_lib.leakage import measure_leakage
    from bloodcell_lib.progress import HEADLESS_ENV, PROGRESS_ENV, RUN_ENV, RunClock, clock_time, progress_line, timing
    from bloodcell_lib.registry import ARCHITECTURES
    from bloodcell_lib.split import resolve_split
    from bloodcell_lib.synthetic import make_stand_in

HERE = Path(__file__).resolve().parent
NOTEBOOKS = HERE / "notebooks"
# Notebooks at a time on a machine without a GPU (--jobs auto): two, so that one computes while the other traces its
# training graph, starts its kernel or runs Python (a single notebook leaves a core idle then). More would only
# split the cores; the memory asked for is a guess of what two demo-profile kernels hold, with room to spare.
AUTO_JOBS = 2
AUTO_JOBS_MIN_MEMORY_GB = 8.0
LOGS = "logs"  # inside the output folder: one log per notebook of what its kernel wrote outside the notebook
PROGRESS_FILE = "progress.jsonl"


def model_notebooks() -> dict[str, Path]:
    """Registry key → model notebook path, in the registry's order."""
    return {spec.key: NOTEBOOKS / f"{spec.notebook}.ipynb" for spec in ARCHITECTURES.values()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the main job."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="the Kaggle folder; omitted → a synthetic stand-in is generated")
    parser.add_argument("--profile", default=AUTO, choices=(AUTO, *PROFILES),
                        help="auto (default): $BLOODCELL_PROFILE, else paper with --data-dir and demo without")
    parser.add_argument("--models", nargs="+", help="registry keys or notebook names (default: all five)")
    parser.add_argument("--epochs", type=int, help="total epochs over both phases (default: the profile's)")
    parser.add_argument("--output", help=f"where everything of the run goes (default: $BLOODCELL_OUTPUT, else "
                                         f"{DEFAULT_OUTPUT} beside run_all.py)")
    parser.add_argument("--leakage", metavar="ARCH",
                        help="also train ARCH on an image-level split to measure how much leakage inflates accuracy")
    parser.add_argument("--folds", type=int, metavar="K",
                        help="grouped, stratified K-fold cross-validation instead of the single hold-out: every "
                             "model once per fold (and seed), out-of-fold results in OUTPUT/cv/")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="S",
                        help="with --folds: repeat the cross-validation with these seeds (other folds, other "
                             "initialisations); default: the profile's seed")
    parser.add_argument("--train-fractions", type=float, nargs="+", metavar="F",
                        help="learning curve: also train on these shares (0 < F ≤ 1) of the training cells, each "
                             "tested on the study's test cells (OUTPUT/learning_curve/)")
    parser.add_argument("--ablation", choices=("scratch",),
                        help="scratch: also train every model from random initialisation with the same budget, at "
                             "every --train-fractions share (default 1.0): does transfer learning help?")
    parser.add_argument("--executor", default="local", choices=EXECUTORS,
                        help="local (default): the notebooks run here, --jobs at a time; ray: one Ray task per "
                             "notebook run (pip install -e .[ray]), retried when its worker dies")
    parser.add_argument("--jobs", default=AUTO, metavar="N",
                        help=f"with the local executor: notebooks at a time. auto (default): {AUTO_JOBS} on a "
                             f"machine without a GPU, for the demo and smoke profiles; else 1")
    parser.add_argument("--address", help="with --executor ray: the cluster to join (e.g. auto); default: a local "
                                          "Ray instance on this machine")
    return parser.parse_args(argv)


def choose_models(requested: list[str] | None, available: dict[str, Path]) -> dict[str, Path]:
    """The notebooks to run; names are matched case-insensitively against keys and notebook stems."""
    if not requested:
        return available
    by_name = {**{k: k for k in available}, **{p.stem.casefold(): k for k, p in available.items()}}
    chosen, unknown = {}, []
    for name in requested:
        key = by_name.get(name.casefold())
        if key is None:
            unknown.append(name)
        else:
            chosen[key] = available[key]
    if unknown:
        raise SystemExit(f"Unknown model(s): {', '.join(unknown)}. Choose from: {', '.join(available)}.")
    return chosen


def kernel_environment(output: Path) -> dict[str, str]:
    """The environment of the kernels: progress events to the output folder, Keras' per-epoch lines instead of its
    live bar (progress.fit_verbose), and TensorFlow's C++ logging without INFO and WARNING lines."""
    return {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"), HEADLESS_ENV: "1",
            PROGRESS_ENV: str(output / PROGRESS_FILE)}


class ProgressPrinter:
    """Tails the run's progress file in a thread and prints a line per event for the notebook that runs now."""

    def __init__(self, path: Path, clock: RunClock, out: IO[str] | None = None, interval: float = 0.5) -> None:
        self.path, self.clock, self.out, self.interval = path, clock, out or sys.stdout, interval
        self.label = ""
        self._offset = path.stat().st_size if path.exists() else 0  # earlier runs' events are not ours
        self._partial = b""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="progress", daemon=True)

    def __enter__(self) -> "ProgressPrinter":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    @contextlib.contextmanager
    def running(self, label: str) -> Iterator[None]:
        """Attribute the events written inside the block to `label`; afterwards it trains no more."""
        self.poll()
        self.label = label
        try:
            yield
        finally:
            self.finish(label)  # the step's last events, before the next step's label

    def finish(self, label: str) -> None:
        """Print the run's last events, then count it as training no more (done, stopped early, or failed)."""
        self.poll()
        self.clock.finish(label)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        """Print the lines of the events appended since the last poll (a half-written line waits)."""
        with self._lock:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self._offset)
                    data = f.read()
            except OSError:
                return
            self._offset += len(data)
            *lines, self._partial = (self._partial + data).split(b"\n")
            for raw in lines:
                try:
                    event = json.loads(raw)
                except ValueError:
                    continue
                label = event.get("run") or self.label  # run_all's runs say whose event it is
                self.clock.update(label, event)
                line = progress_line(label, event, self.clock)
                if line:
                    self._write(line)

    def say(self, line: str) -> None:
        """Print one line whole, whichever thread asks (notebooks finishing at once print from their threads)."""
        with self._lock:
            self._write(line)

    def _write(self, line: str) -> None:
        self.out.write(line + "\n")  # one write: print() writes the newline apart, so threads' lines could merge
        self.out.flush()


def notebooks_at_once(requested: str, profile: str, executor: str) -> tuple[int, str]:
    """How many notebooks run here at a time, and why: --jobs N as given; auto → AUTO_JOBS for the demo and smoke
    profiles on a machine with no GPU, at least two cores and AUTO_JOBS_MIN_MEMORY_GB available, else 1 (a GPU is
    not shared between kernels; the paper profile's kernels want the memory). Ray schedules its own tasks.

    Raises ConfigError for a --jobs that is neither auto nor a whole number ≥ 1.
    """
    if requested != AUTO:
        try:
            n = int(requested)
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(f"--jobs takes auto or a number of notebooks at a time (1 or more), got {requested!r}.")
        return n, "--jobs"
    if executor != "local":
        return 1, f"the {executor} executor schedules its own tasks"
    if gpu_visible():
        return 1, "a GPU is not shared between notebooks"
    if profile not in ("demo", "smoke"):
        return 1, f"the {profile} profile's notebooks each want the machine's memory"
    cores, memory = os.cpu_count() or 1, available_memory_gb()
    if cores < 2 or (memory is not None and memory < AUTO_JOBS_MIN_MEMORY_GB):
        return 1, f"{cores} core(s), {memory or 0:.0f} GB available"
    return AUTO_JOBS, (f"no GPU and {cores} cores: one notebook computes while the other traces its graph or runs "
                       f"Python; --jobs 1 for one at a time")


def gpu_visible() -> bool:
    """True when an NVIDIA GPU is visible to this machine's processes (no TensorFlow needed to ask)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or shutil.which("nvidia-smi") is not None


def available_memory_gb() -> float | None:
    """MemAvailable of /proc/meminfo in GB, or None where there is no such file."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024 ** 2
    except (OSError, ValueError, IndexError):
        pass
    return None


def prepare_shared_inputs(args: argparse.Namespace, cfg: RunConfig) -> str:
    """Check the dataset (which fills the study's image cache) and make every split the notebooks will read: the
    study's, or each seed's and fold's. Made here, once, before any notebook starts, so that notebooks running at
    once never race to write what they share; each then reads the cache and loads its split. Return a line saying
    what was made. Raises DatasetError / SplitError / ProvenanceError (a dataset that changed since its split)."""
    report = check_dataset(cfg.data_dir, progress=False, cache=StudyCache.in_output(cfg.study_path, cfg.image_size))
    runs = [cfg]
    if args.folds:
        runs = [resolve_run(args, seed=seed, folds=args.folds, fold=fold)
                for seed in args.seeds or [cfg.seed] for fold in range(1, args.folds + 1)]
    paths = [resolve_split(run, verbose=0, report=report)[1] for run in runs]
    where = paths[0] if len(paths) == 1 else f"{len(paths)} fold splits under {paths[0].parent.parent}"
    found = [p for p in report.problems if p.kind not in IGNORED_KINDS]  # not the files beside the class folders
    problems = f", {len(found)} problem(s) (listed in each notebook's data check)" if found else ""
    return (f"Data check: {len(report.records)} images, {len({r.group for r in report.records})} cells "
            f"({report.seconds:.0f} s){problems}; split {where}")


def notebook_job(label: str, source: Path, executed: Path, parameters: dict, env: dict[str, str]) -> NotebookJob:
    """One notebook run: executed into executed/<label>.ipynb, its kernel's own output in OUTPUT/logs/<label>.log;
    its progress events carry the label (several run at once under Ray)."""
    return NotebookJob(label, source, executed / f"{label}.ipynb", parameters, executed.parent / LOGS / f"{label}.log",
                       {**env, RUN_ENV: label})


def study_jobs(args: argparse.Namespace, cfg: RunConfig, models: dict[str, Path], executed: Path,
               parameters: dict, env: dict[str, str]) -> list[NotebookJob]:
    """The model notebook runs of the study, in order: the hold-out run of every model (or, with --folds, one run
    per seed, fold and model), then the learning-curve points (--train-fractions, --ablation scratch)."""
    jobs = []
    if args.folds:
        for seed in args.seeds or [cfg.seed]:
            for fold in range(1, args.folds + 1):
                for source in models.values():
                    jobs.append(notebook_job(f"{source.stem}-seed{seed}-fold{fold}of{args.folds}", source, executed,
                                             {**parameters, "SEED": seed, "FOLDS": args.folds, "FOLD": fold}, env))
        return jobs
    jobs += [notebook_job(source.stem, source, executed, parameters, env) for source in models.values()]
    fractions = args.train_fractions or ([1.0] if args.ablation else [])
    points = [(f, None) for f in fractions if f != 1.0]  # the study's own weights; at 1.0 that is the study itself
    if args.ablation == "scratch" and cfg.weights is not None:
        points += [(f, "none") for f in fractions]
    elif args.ablation == "scratch":
        print("NOTE: --ablation scratch: this profile already trains from random initialisation, so the study's own "
              "runs are the scratch curve.")
    for fraction, weights in points:
        for source in models.values():
            extra = {"TRAIN_FRACTION": fraction, "CURVE_POINT": True, **({"WEIGHTS": weights} if weights else {})}
            jobs.append(notebook_job(f"{source.stem}{'-scratch' if weights else ''}-frac{fraction:g}", source, executed,
                                     {**parameters, **extra}, env))
    return jobs


def done_before(job: NotebookJob, output: Path) -> bool:
    """A fold or learning-curve run whose results are already in its folder (a rerun resumes the study there)."""
    params = job.parameters
    if params.get("FOLDS"):
        folder = output / CV_FOLDER / f"seed{params['SEED']}-fold{params['FOLD']}of{params['FOLDS']}"
    else:
        return False
    key = next((k for k, p in model_notebooks().items() if p == job.source), None)
    return key is not None and (folder / f"{key}_results.json").is_file()


def run_study(jobs: list[NotebookJob], printer: ProgressPrinter, executor: str, address: str | None,
              output: Path, at_once: int = 1) -> list[tuple[str, bool, float, str]]:
    """Run the jobs with the executor (local: `at_once` at a time): a line before and after each, progress lines
    while they run; a fold already done (its results in its folder) is skipped with a line. Return their summary
    rows."""
    total = len(jobs) + 1
    index = {job.label: i for i, job in enumerate(jobs, 1)}
    skipped = [job for job in jobs if done_before(job, output)]
    for job in skipped:
        print(f"[{index[job.label]}/{total}] {job.label}: already done (its results are in its folder); skipped",
              flush=True)
        printer.clock.finish(job.label)
    todo = [job for job in jobs if job not in skipped]
    running: dict[str, contextlib.ExitStack] = {}

    def started(job: NotebookJob) -> None:
        printer.say(f"[{index[job.label]}/{total}] {job.label} ...")
        if executor == "local" and at_once == 1:  # one at a time: the progress events belong to this job
            running[job.label] = contextlib.ExitStack()
            running[job.label].enter_context(printer.running(job.label))

    def finished(job: NotebookJob, run: JobResult) -> None:
        if job.label in running:
            running.pop(job.label).close()
        else:
            printer.finish(job.label)
        printer.say(done_line(index[job.label], total, job, run, printer.clock))

    runs = {run.label: run for run in run_jobs(todo, executor=executor, address=address, on_start=started,
                                               on_done=finished, at_once=at_once)}
    return [(job.label, True, 0.0, "skipped: done before") if job in skipped else
            (job.label, runs[job.label].ok, runs[job.label].seconds, runs[job.label].error) for job in jobs]


def run_step(i: int, total: int, job: NotebookJob, printer: ProgressPrinter) -> tuple[str, bool, float, str]:
    """Run one notebook here with a line before, progress lines while it runs, and a line after; return its summary
    row."""
    print(f"[{i}/{total}] {job.label} ...", flush=True)
    with printer.running(job.label):
        run = run_notebook(job)
    print(done_line(i, total, job, run, printer.clock), flush=True)
    return job.label, run.ok, run.seconds, run.error


def done_line(i: int, total: int, job: NotebookJob, run: JobResult, clock: RunClock) -> str:
    """The line after a notebook run: ok, or FAILED with its error and where to look; seconds, attempts, timing."""
    result = "ok" if run.ok else f"FAILED: {run.error} (executed notebook {job.target}, kernel log {job.log_path})"
    retried = f", {run.attempts} attempts" if run.attempts > 1 else ""
    return f"[{i}/{total}] {job.label} {result} ({run.seconds:.0f} s{retried}) — {timing(clock)}"


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` set inside the block, as before afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_leakage(output: Path, arch: str, profile: str, epochs: int | None, printer: ProgressPrinter,
                env: dict[str, str]) -> tuple[str, bool, float, str]:
    """Train one architecture on an image-level split of the same data in this process, its printed output and
    TensorFlow's lines going to logs/leakage.log; return a summary row."""
    name, log_path = f"leakage ({arch})", output / LOGS / "leakage.log"
    print(f"Leakage: training {arch} on an image-level split (its output: {log_path}) ...", flush=True)
    start = time.perf_counter()
    try:
        with open(log_path, "ab") as log, printer.running(name), environment(env), native_stderr_to(log), \
                open(log_path, "a", encoding="utf-8") as text, contextlib.redirect_stdout(text):
            measure_leakage(output, arch, profile=profile, epochs=epochs)
        return name, True, time.perf_counter() - start, ""
    except Exception as exc:  # noqa: BLE001 — the comparison still runs without it
        return name, False, time.perf_counter() - start, f"{exc.__class__.__name__}: {exc}"


def resolve_run(args: argparse.Namespace, **params: object) -> RunConfig:
    """The run's configuration from its options (config.resolve: --profile and --output over the environment over
    the defaults; the stand-in without --data-dir), with `params` (a fold's seed, folds, fold) on top."""
    return resolve(args.profile, stand_in=True, default_output=str(HERE / DEFAULT_OUTPUT), data_dir=args.data_dir,
                   epochs=args.epochs, output_dir=args.output, **params)


def check_arguments(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    """Refuse arguments that would fail inside every notebook, before any kernel starts; return the run's
    configuration (config.resolve: --profile and --output over the environment over the defaults) and its output
    folder made absolute.

    Raises BloodcellError (DatasetError, ConfigError, OutputError) with a message saying what to fix.
    """
    cfg = resolve_run(args)  # ConfigError: epochs < 1, paper without data
    if args.folds is not None and args.folds < 2:
        raise ConfigError(f"--folds needs at least 2 folds, got {args.folds}.")
    if args.seeds and not args.folds:
        raise ConfigError("--seeds repeats a cross-validation: give --folds K with it.")
    if args.folds and (args.train_fractions or args.ablation):
        raise ConfigError("--folds and --train-fractions/--ablation are separate studies: run them one at a time "
                          "(into different --output folders).")
    bad = [f for f in args.train_fractions or [] if not 0.0 < f <= 1.0]
    if bad:
        raise ConfigError(f"--train-fractions are shares of the training cells in (0, 1], got {bad}.")
    check_executor(args.executor)  # ExecutorError: Ray asked for but not installed
    if args.data_dir is not None:
        find_data_root(args.data_dir)  # DatasetError: missing, a file, or no class folders in it
    output = cfg.output_path.expanduser().resolve()
    probe = write_text(output / "executed_notebooks" / ".writable", "")  # OutputError: a file, read-only, full
    probe.unlink()
    return cfg, output


def comparison_row(row: tuple[str, bool, float, str], output: Path, since: float) -> tuple[str, bool, float, str]:
    """The Comparison's summary row: a comparison without any model results of this run is a failure of the run."""
    name, ok, seconds, error = row
    models = [p for p in [*output.glob("*_results.json"), *(output / CV_FOLDER).glob("*_results.json")]
              if not p.name.startswith("shortcut_baseline") and p.stat().st_mtime >= since - 2]
    if ok and not models:
        error = f"no model results: no model notebook of this run wrote its results to {output}"
        print(f"  {name}: {error}", flush=True)
        return name, False, seconds, error
    return row


def main(argv: list[str] | None = None) -> int:
    """Run the chosen model notebooks, then the Comparison; return 0 only when all succeeded (2: bad arguments)."""
    args = parse_args(argv)
    models = choose_models(args.models, model_notebooks())
    try:
        cfg, output = check_arguments(args)
        at_once, why_at_once = notebooks_at_once(args.jobs, cfg.profile, args.executor)
    except BloodcellError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    executed = output / "executed_notebooks"
    if args.data_dir is None and len(sys.argv if argv is None else argv) <= 1:
        print("No arguments: running the main job on the embedded default — the demo profile on a generated "
              "synthetic set. Pass --data-dir with the Kaggle folder for the real study.")
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
    # The notebooks get what was resolved here as explicit parameters; EPOCHS None keeps their profile's.
    parameters = {"DATA_DIR": data_dir, "PROFILE": cfg.profile, "EPOCHS": args.epochs, "OUTPUT_DIR": str(output)}
    plan = (f"{args.folds}-fold cross-validation × {len(args.seeds or [cfg.seed])} seed(s) of " if args.folds else "")
    print(f"Profile {cfg.profile} ({cfg.why('profile')}); output {output}; {plan}{len(models)} model notebook(s)"
          f"{', learning-curve runs' if args.train_fractions or args.ablation else ''}"
          f"{', a leakage run' if args.leakage else ''} then Comparison"
          f"{f' ({at_once} at a time: {why_at_once})' if at_once > 1 else ''}"
          f"{'' if args.executor == 'local' else f' (executor {args.executor})'}.")
    for line in cfg.note_lines():
        print(line)
    logs = output / LOGS
    logs.mkdir(exist_ok=True)
    _STARTUP_LOG.seek(0)
    (logs / "run_all.log").write_bytes(_STARTUP_LOG.read())
    print(f"Progress below; what the kernels print outside the notebooks (TensorFlow's start-up lines, Jupyter's "
          f"warnings) is in {logs}.", flush=True)

    started = time.time()
    if args.data_dir is None:
        # Made here, once, before any notebook starts: notebooks running at once (--jobs, --executor ray) must not
        # race to write it; each notebook then finds it made (study.configure).
        print(f"Synthetic stand-in: {make_stand_in(cfg)}", flush=True)
    try:
        print(prepare_shared_inputs(args, cfg), flush=True)
    except BloodcellError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    env = kernel_environment(output)
    jobs = study_jobs(args, cfg, models, executed, parameters, env)
    planned = {job.label: cfg.epochs for job in jobs}
    if args.leakage:
        planned[f"leakage ({args.leakage})"] = cfg.epochs
    with ProgressPrinter(output / PROGRESS_FILE, RunClock(planned, started)) as printer:
        results = run_study(jobs, printer, args.executor, args.address, output, at_once)
        if args.leakage:
            results.append(run_leakage(output, args.leakage, cfg.profile, args.epochs, printer, env))
        total = len(jobs) + 1
        comparison = notebook_job("Comparison", NOTEBOOKS / "Comparison.ipynb", executed, {"OUTPUT_DIR": str(output)},
                                  env)
        results.append(comparison_row(run_step(total, total, comparison, printer), output, started))

    failed = [r for r in results if not r[1]]
    print(f"\nSummary (total {clock_time(time.time() - started)})")
    for name, ok, seconds, error in results:
        print(f"  {'ok    ' if ok else 'FAILED'} {name:24s} {seconds:7.0f} s {error}")
    shown = output / CV_FOLDER if args.folds else output
    print(f"Executed notebooks in {executed}; comparison table in {shown / 'comparison.md'}; "
          f"report in {shown / 'comparison.html'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
