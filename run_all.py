"""Run the whole study headlessly: every model notebook with papermill, then the Comparison notebook.

    python run_all.py                                   # demo profile on the synthetic set (no data needed)
    python run_all.py --data-dir "Blood Cell Images"    # the study on the Kaggle folder (paper profile)
    python run_all.py --profile smoke --output OUT      # tiny run, as in CI

Everything the run writes — models, histories, results, figures, executed notebooks — goes to --output.
One failing notebook does not stop the others; the summary at the end names it and the exit code is 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import papermill

from bloodcell_lib.atomic import write_text
from bloodcell_lib.config import AUTO, DEFAULT_OUTPUT, PROFILES, RunConfig, resolve
from bloodcell_lib.dataset import find_data_root
from bloodcell_lib.errors import BloodcellError
from bloodcell_lib.leakage import measure_leakage
from bloodcell_lib.registry import ARCHITECTURES

HERE = Path(__file__).resolve().parent
NOTEBOOKS = HERE / "notebooks"


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


def run_notebook(source: Path, target: Path, parameters: dict) -> tuple[bool, float, str]:
    """Execute one notebook with papermill; return (ok, seconds, error text)."""
    start = time.perf_counter()
    try:
        papermill.execute_notebook(str(source), str(target), parameters=parameters, cwd=str(source.parent),
                                   kernel_name="python3", progress_bar=False, log_output=False)
        return True, time.perf_counter() - start, ""
    except Exception as exc:  # noqa: BLE001 — one failing notebook must not stop the others
        message = str(exc).strip().splitlines()
        return False, time.perf_counter() - start, message[-1] if message else exc.__class__.__name__


def run_step(i: int, total: int, source: Path, executed: Path, parameters: dict) -> tuple[str, bool, float, str]:
    """Run one notebook with a progress line before and after; return its summary row."""
    print(f"[{i}/{total}] {source.name} ...", flush=True)
    ok, seconds, error = run_notebook(source, executed / source.name, parameters)
    print(f"[{i}/{total}] {source.name} {'ok' if ok else 'FAILED: ' + error} ({seconds:.0f} s)", flush=True)
    return source.name, ok, seconds, error


def run_leakage(output: Path, arch: str, profile: str, epochs: int | None) -> tuple[str, bool, float, str]:
    """Train one architecture on an image-level split of the same data; return a summary row."""
    print(f"Leakage: training {arch} on an image-level split ...", flush=True)
    start = time.perf_counter()
    try:
        measure_leakage(output, arch, profile=profile, epochs=epochs)
        return f"leakage ({arch})", True, time.perf_counter() - start, ""
    except Exception as exc:  # noqa: BLE001 — the comparison still runs without it
        return f"leakage ({arch})", False, time.perf_counter() - start, f"{exc.__class__.__name__}: {exc}"


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

    total = len(models) + 1
    started = time.time()
    results = [run_step(i, total, source, executed, parameters) for i, source in enumerate(models.values(), 1)]
    if args.leakage:
        results.append(run_leakage(output, args.leakage, cfg.profile, args.epochs))
    results.append(comparison_row(
        run_step(total, total, NOTEBOOKS / "Comparison.ipynb", executed, {"OUTPUT_DIR": str(output)}), output, started))

    failed = [r for r in results if not r[1]]
    print("\nSummary")
    for name, ok, seconds, error in results:
        print(f"  {'ok    ' if ok else 'FAILED'} {name:24s} {seconds:7.0f} s {error}")
    print(f"Executed notebooks in {executed}; comparison table in {output / 'comparison.md'}; "
          f"report in {output / 'comparison.html'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
