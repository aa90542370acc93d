"""Shared helpers of the benchmark scripts: synthetic data in a work folder, waiting for a quiet machine,
the machine description and the one RATIO line each script ends with.

Import this before TensorFlow: it quiets TensorFlow's C++ logging, which must be set before the import.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pandas as pd  # noqa: E402

# The machine is shared with other jobs: a figure taken while they run measures them, not us.
DEFAULT_MAX_LOAD = 1.5
DEFAULT_MAX_WAIT_S = 600.0
_STARTED = time.monotonic()
_WAITED = [0.0]  # seconds spent in wait_for_quiet, kept out of the script's own running time


def parse_args(description: str, add_arguments=None, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the options every benchmark takes (--workdir, --max-load, --max-wait, --no-wait) plus its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the synthetic data here and reuse it on the next run (default: a temporary "
                             "folder, deleted at the end)")
    parser.add_argument("--max-load", type=float, default=DEFAULT_MAX_LOAD,
                        help="wait until the 1-minute load average is below this before measuring")
    parser.add_argument("--max-wait", type=float, default=DEFAULT_MAX_WAIT_S,
                        help="seconds to wait at most for that load; then measure anyway and say so")
    parser.add_argument("--no-wait", action="store_true", help="measure at once, whatever the load")
    if add_arguments is not None:
        add_arguments(parser)
    return parser.parse_args(argv)


@contextlib.contextmanager
def work_folder(args: argparse.Namespace, name: str) -> Iterator[Path]:
    """Yield --workdir/<name> (kept) or a temporary folder (deleted afterwards)."""
    if args.workdir is not None:
        folder = Path(args.workdir).expanduser() / name
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    folder = Path(tempfile.mkdtemp(prefix=f"bloodcell-bench-{name}-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def synthetic_split(folder: Path, per_class: int, size: int, duplicates: int, seed: int = 0) -> pd.DataFrame:
    """Return a split frame (path, label, group, subset='train') over a synthetic set, made once per parameter set.

    The split skips check_dataset (hashing every file is not what we measure); groups are the manifest's cells.
    """
    from bloodcell_lib.synthetic import load_manifest, make_synthetic_dataset

    stamp = folder / "bench_params.json"
    params = {"per_class": per_class, "size": size, "duplicates": duplicates, "seed": seed}
    data = folder / "data"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == params and (data / "synth_manifest.csv").is_file()):
        started = time.perf_counter()
        if data.exists():
            shutil.rmtree(data)
        make_synthetic_dataset(data, per_class=per_class, size=size, duplicates=duplicates, seed=seed)
        stamp.write_text(json.dumps(params))
        n = per_class * (1 + duplicates) * 5
        print(f"made {n} synthetic {size}-px JPEGs in {time.perf_counter() - started:.0f} s")
    manifest = load_manifest(data)
    frame = pd.DataFrame({"path": manifest["file"], "label": manifest["class"], "group": manifest["cell_id"],
                          "subset": "train"})
    frame.attrs["data_root"] = str(data)
    return frame


def load1() -> float:
    """Return the 1-minute load average."""
    return os.getloadavg()[0]


def wait_for_quiet(args: argparse.Namespace, what: str = "measuring") -> float:
    """Sleep until the 1-minute load average is below --max-load (at most --max-wait s); return the load then."""
    if args.no_wait:
        return load1()
    deadline = time.monotonic() + args.max_wait
    load = load1()
    if load >= args.max_load:
        print(f"load average {load:.2f} >= {args.max_load}: waiting (up to {args.max_wait:.0f} s) before {what}",
              flush=True)
    started = time.monotonic()
    while load >= args.max_load and time.monotonic() < deadline:
        time.sleep(10)
        load = load1()
    _WAITED[0] += time.monotonic() - started
    if load >= args.max_load:
        print(f"WARNING: load average still {load:.2f} after {args.max_wait:.0f} s; the figures below are "
              "disturbed by other jobs", flush=True)
    return load


def machine() -> dict[str, str]:
    """Return cores, CPU model, RAM, Python and TensorFlow versions and the date, for the report."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines()
                      if ln.startswith("MemTotal")).split()[1])
        ram = f"{kb / 2**20:.1f} GiB"
    info = {"cores": str(os.cpu_count()), "cpu": cpu, "ram": ram, "python": platform.python_version(),
            "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}
    if "tensorflow" in sys.modules:
        info["tensorflow"] = sys.modules["tensorflow"].__version__
    if "keras" in sys.modules:
        info["keras"] = sys.modules["keras"].__version__
    return info


def print_header(title: str) -> None:
    """Print the benchmark's title and the machine it runs on."""
    import keras  # noqa: F401 - so machine() can report its version
    import tensorflow  # noqa: F401

    import bloodcell_lib

    print(f"== {title}")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine().items()))
    print(f"bloodcell_lib from {Path(bloodcell_lib.__file__).parent}", flush=True)


def print_running_time() -> None:
    """Print how long the script ran, without the time it waited for a quiet machine."""
    total = time.monotonic() - _STARTED
    print(f"running time {total - _WAITED[0]:.0f} s (plus {_WAITED[0]:.0f} s waiting for the load to drop)", flush=True)


def ratio_line(name: str, what: str, value: float, target: float, at_least: bool = True) -> str:
    """Print the running time, then the final line: RATIO <name> <what> = <value>x (target >= t) PASS|FAIL."""
    print_running_time()
    ok = value >= target if at_least else value <= target
    sign = ">=" if at_least else "<="
    line = f"RATIO {name} {what} = {value:.2f}x (target {sign} {target:g}) {'PASS' if ok else 'FAIL'}"
    print(line, flush=True)
    return line
