"""Checking a dataset at the real set's scale: decode every file once, fingerprint it and group the copies.

    python benchmarks/bench_dedupe.py [--workdir DIR]

Three copy sets (bloodcell_lib.copyset: whole smears, copies with any rotation, flips, zoom 0.85-1.2,
shifts, gain/offset with clipping, defocus and JPEG 70-95) are made once (--workdir keeps them):
5,000 and 20,000 JPEGs of 1024 px, like the Kaggle set, and 50,000 of 128 px for memory (the fingerprint
is the same size whatever the image's; only decoding depends on it). Each check_dataset runs in its own child
process, which reports wall time, peak resident memory and the pair precision/recall of the groups.

Targets (issue "Honest comparison", point 2): 5,000 × 1024 px in ≤ 180 s; 50,000 images under 4 GB;
near-linear time: seconds per 1,000 images at 20,000 over those at 5,000 ≤ 1.5 (the RATIO line).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import _common

SETS = {  # name: (images wanted, side in px)
    "5k_1024": (5_000, 1024),
    "20k_1024": (20_000, 1024),
    "50k_128": (50_000, 128),
}
MEAN_IMAGES_PER_CELL = 3.0  # the copy set draws 1-5 images per cell
TARGET_SECONDS_5K = 180.0
TARGET_GB_50K = 4.0
TARGET_RATIO = 1.5


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)


def make_set(folder: Path, n: int, side: int) -> Path:
    """Return a copy set of about n images of side px in folder, made once (a stamp records its parameters)."""
    from bloodcell_lib.copyset import make_copy_set

    stamp = folder / "bench_params.json"
    cells = max(1, round(n / MEAN_IMAGES_PER_CELL / 5))
    params = {"cells_per_class": cells, "size": side, "seed": 11}
    data = folder / "data"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == params):
        started = time.perf_counter()
        make_copy_set(data, cells_per_class=cells, size=side, seed=11)
        stamp.write_text(json.dumps(params))
        print(f"made {sum(1 for _ in data.rglob('*.jpg'))} copy-set JPEGs of {side} px in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    return data


def child(data: Path) -> None:
    """Check one set and print a JSON line: images, seconds, peak RSS, pair precision/recall, largest group."""
    from bloodcell_lib.copyset import load_copy_manifest, pair_precision_recall
    from bloodcell_lib.dataset import check_dataset

    started = time.perf_counter()
    report = check_dataset(data, progress=False)
    seconds = time.perf_counter() - started
    frame = report.to_frame()
    truth = load_copy_manifest(data).set_index("file").loc[frame["path"], "cell_id"].to_numpy()
    scores = pair_precision_recall(frame["group"].to_numpy(), truth)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"images": len(frame), "seconds": seconds, "peak_rss_mb": peak_mb,
                      "precision": scores["precision"], "recall": scores["recall"],
                      "largest_group": scores["largest_group"]}))


def measure(args: argparse.Namespace, name: str, data: Path) -> dict:
    load = _common.wait_for_quiet(args, f"checking {name}")
    out = subprocess.run([sys.executable, __file__, "--child", str(data)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["load"] = load
    print(f"{name}: {result['images']} images checked in {result['seconds']:.1f} s "
          f"({1000 * result['seconds'] / result['images']:.2f} s per 1,000), peak RSS {result['peak_rss_mb']:.0f} MB, "
          f"pair precision {result['precision']:.3f}, recall {result['recall']:.3f}, largest group "
          f"{result['largest_group']} (load before {load:.2f})", flush=True)
    return result


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0], _arguments)
    if args.child:
        child(args.child)
        return
    print("== check_dataset at scale: decode once, fingerprint, group copies")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in _common.machine().items()), flush=True)
    results = {}
    for name in args.sets:
        n, side = SETS[name]
        with _common.work_folder(args, f"dedupe_{name}") as folder:
            results[name] = measure(args, name, make_set(folder, n, side))
    if "5k_1024" in results:
        s = results["5k_1024"]["seconds"]
        print(f"5,000 × 1024 px: {s:.0f} s (target ≤ {TARGET_SECONDS_5K:.0f} s) {'PASS' if s <= TARGET_SECONDS_5K else 'FAIL'}")
    if "50k_128" in results:
        gb = results["50k_128"]["peak_rss_mb"] / 1024
        print(f"50,000 images: peak RSS {gb:.2f} GB (target < {TARGET_GB_50K:g} GB) {'PASS' if gb < TARGET_GB_50K else 'FAIL'}")
    if "5k_1024" in results and "20k_1024" in results:
        per_k = {k: 1000 * results[k]["seconds"] / results[k]["images"] for k in ("5k_1024", "20k_1024")}
        _common.ratio_line("dedupe", "s/1000 images at 20,000 over at 5,000", per_k["20k_1024"] / per_k["5k_1024"],
                           TARGET_RATIO, at_least=False)
    else:
        _common.print_running_time()


if __name__ == "__main__":
    main()
