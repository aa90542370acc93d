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
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any, Iterator

from bloodcell_lib.quiet import native_stderr_to

# Importing TensorFlow (through the registry and the leakage run) prints its C++ start-up lines on descriptor 2,
# past any Python setting: they are kept here and written to logs/run_all.log once the output folder is known.
_STARTUP_LOG = tempfile.TemporaryFile()
with native_stderr_to(_STARTUP_LOG):
    import papermill
    from jupyter_client.manager import AsyncKernelManager

    from bloodcell_lib.atomic import write_text
    from bloodcell_lib.config import AUTO, DEFAULT_OUTPUT, PROFILES, RunConfig, resolve
    from bloodcell_lib.dataset import find_data_root
    from bloodcell_lib.errors import BloodcellError
    from bloodcell_lib.leakage import measure_leakage
    from bloodcell_lib.progress import HEADLESS_ENV, PROGRESS_ENV, RunClock, clock_time, progress_line, timing
    from bloodcell_lib.registry import ARCHITECTURES

HERE = Path(__file__).resolve().parent
NOTEBOOKS = HERE / "notebooks"
LOGS = "logs"  # inside the output folder: one log per notebook of what its kernel wrote outside the notebook
PROGRESS_FILE = "progress.jsonl"
# ipykernel copies what C code writes on descriptors 1 and 2 into the cell's outputs (and onto its own stderr);
# without that copy, TensorFlow's C++ lines stay on the kernel's stderr, which goes to the log.
KERNEL_ARGUMENTS = ["--IPKernelApp.capture_fd_output=False"]


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


def logged_kernel_manager(log_path: Path, env: dict[str, str]) -> type[AsyncKernelManager]:
    """A kernel manager class whose kernels write their stdout and stderr to log_path and get `env` added to
    the environment (papermill takes a kernel manager class, not a log file)."""

    class LoggedKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw: Any) -> None:
            kw["env"] = {**kw.get("env", os.environ), **env}
            with open(log_path, "ab") as log:  # the kernel holds its own copy of the descriptor
                await super().start_kernel(**kw, stdout=log, stderr=log)

    return LoggedKernelManager


def run_notebook(source: Path, target: Path, parameters: dict, log_path: Path | None = None,
                 env: dict[str, str] | None = None) -> tuple[bool, float, str]:
    """Execute one notebook with papermill, its kernel's own output going to log_path; return (ok, seconds,
    error text)."""
    start = time.perf_counter()
    log_path = log_path or target.with_suffix(".log")
    try:
        papermill.execute_notebook(str(source), str(target), parameters=parameters, cwd=str(source.parent),
                                   kernel_name="python3", progress_bar=False, log_output=False,
                                   kernel_manager_class=logged_kernel_manager(log_path, env or {}),
                                   extra_arguments=KERNEL_ARGUMENTS)
        return True, time.perf_counter() - start, ""
    except Exception as exc:  # noqa: BLE001 — one failing notebook must not stop the others
        message = str(exc).strip().splitlines()
        return False, time.perf_counter() - start, message[-1] if message else exc.__class__.__name__


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
            self.poll()  # the step's last events, before the next step's label
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
                self.clock.update(self.label, event)
                line = progress_line(self.label, event, self.clock)
                if line:
                    print(line, file=self.out, flush=True)


def run_step(i: int, total: int, source: Path, executed: Path, parameters: dict, printer: ProgressPrinter,
             env: dict[str, str]) -> tuple[str, bool, float, str]:
    """Run one notebook with a line before, progress lines while it runs, and a line after; return its summary
    row."""
    log_path = executed.parent / LOGS / f"{source.stem}.log"
    print(f"[{i}/{total}] {source.name} ...", flush=True)
    with printer.running(source.stem):
        ok, seconds, error = run_notebook(source, executed / source.name, parameters, log_path, env)
    result = "ok" if ok else f"FAILED: {error} (executed notebook {executed / source.name}, kernel log {log_path})"
    print(f"[{i}/{total}] {source.name} {result} ({seconds:.0f} s) — {timing(printer.clock)}", flush=True)
    return source.name, ok, seconds, error


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


def check_arguments(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    """Refuse arguments that would fail inside every notebook, before any kernel starts; return the run's
    configuration (config.resolve: --profile and --output over the environment over the defaults) and its output
    folder made absolute.

    Raises BloodcellError (DatasetError, ConfigError, OutputError) with a message saying what to fix.
    """
    cfg = resolve(args.profile, stand_in=True, default_output=str(HERE / DEFAULT_OUTPUT), data_dir=args.data_dir,
                  epochs=args.epochs, output_dir=args.output)  # ConfigError: epochs < 1, paper without data
    if args.data_dir is not None:
        find_data_root(args.data_dir)  # DatasetError: missing, a file, or no class folders in it
    output = cfg.output_path.expanduser().resolve()
    probe = write_text(output / "executed_notebooks" / ".writable", "")  # OutputError: a file, read-only, full
    probe.unlink()
    return cfg, output


def comparison_row(row: tuple[str, bool, float, str], output: Path, since: float) -> tuple[str, bool, float, str]:
    """The Comparison's summary row: a comparison without any model results of this run is a failure of the run."""
    name, ok, seconds, error = row
    models = [p for p in output.glob("*_results.json")
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
    print(f"Profile {cfg.profile} ({cfg.why('profile')}); output {output}; {len(models)} model notebook(s)"
          f"{', a leakage run' if args.leakage else ''} then Comparison.")
    for line in cfg.note_lines():
        print(line)
    logs = output / LOGS
    logs.mkdir(exist_ok=True)
    _STARTUP_LOG.seek(0)
    (logs / "run_all.log").write_bytes(_STARTUP_LOG.read())
    print(f"Progress below; what the kernels print outside the notebooks (TensorFlow's start-up lines, Jupyter's "
          f"warnings) is in {logs}.", flush=True)

    total = len(models) + 1
    started = time.time()
    env = kernel_environment(output)
    planned = {source.stem: cfg.epochs for source in models.values()}
    if args.leakage:
        planned[f"leakage ({args.leakage})"] = cfg.epochs
    with ProgressPrinter(output / PROGRESS_FILE, RunClock(planned, started)) as printer:
        results = [run_step(i, total, source, executed, parameters, printer, env)
                   for i, source in enumerate(models.values(), 1)]
        if args.leakage:
            results.append(run_leakage(output, args.leakage, cfg.profile, args.epochs, printer, env))
        results.append(comparison_row(run_step(total, total, NOTEBOOKS / "Comparison.ipynb", executed,
                                               {"OUTPUT_DIR": str(output)}, printer, env), output, started))

    failed = [r for r in results if not r[1]]
    print(f"\nSummary (total {clock_time(time.time() - started)})")
    for name, ok, seconds, error in results:
        print(f"  {'ok    ' if ok else 'FAILED'} {name:24s} {seconds:7.0f} s {error}")
    print(f"Executed notebooks in {executed}; comparison table in {output / 'comparison.md'}; "
          f"report in {output / 'comparison.html'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
