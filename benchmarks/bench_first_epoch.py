"""First epoch: images per second make_dataset delivers in its first (cold) epoch when the study cache that the
data check filled feeds it, versus one epoch of the seed notebooks' loop (full OpenCV decode + resize +
preprocess_input per image), on large JPEGs.

Also printed: the pipeline's first epoch without the study cache (every file decoded by tf.data, as before),
and what the data check costs without and with filling the cache (its one decode per file serves both).

    python benchmarks/bench_first_epoch.py            # 2,000 synthetic 1024-px JPEGs → 224 px
"""

from __future__ import annotations

import statistics
import time

import _common
from bench_data_delivery import seed_loop_epochs


def _arguments(parser) -> None:
    parser.add_argument("--per-class", type=int, default=80, help="original cells per class")
    parser.add_argument("--duplicates", type=int, default=4, help="augmented copies per cell")
    parser.add_argument("--source-size", type=int, default=1024, help="side of the synthetic JPEGs")
    parser.add_argument("--image-size", type=int, default=224, help="side the network takes")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed-epochs", type=int, default=2, help="epochs of the seed loop (median taken)")
    parser.add_argument("--arch", default="resnet50", help="whose preprocess_input both methods apply")


def first_epoch(split, image_size: int, preprocess, batch_size: int, image_cache) -> float:
    """Seconds of make_dataset's first epoch in the training configuration (building the dataset included)."""
    from bloodcell_lib.pipeline import make_dataset

    started = time.perf_counter()
    ds = make_dataset(split, "train", image_size, preprocess, batch_size=batch_size, cache="memory",
                      image_cache=image_cache)
    for _ in ds:
        pass
    return time.perf_counter() - started


def timed_check(data_root, cache) -> float:
    from bloodcell_lib.dataset import check_dataset

    started = time.perf_counter()
    check_dataset(data_root, progress=False, cache=cache)
    return time.perf_counter() - started


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0], _arguments)
    _common.print_header("first epoch: make_dataset from the study cache vs seed-style OpenCV loop")
    from bloodcell_lib.cache import CACHE_FOLDER, StudyCache, study_side, study_sizes
    from bloodcell_lib.registry import get_arch

    preprocess = get_arch(args.arch).preprocess
    with _common.work_folder(args, "first_epoch") as folder:
        split = _common.synthetic_split(folder, args.per_class, args.source_size, args.duplicates)
        root = split.attrs["data_root"]
        files = [f"{root}/{p}" for p in split["path"]]
        n = len(files)
        side = study_side("native")
        beside = ", ".join(str(s) for s in study_sizes("native") if s < side)
        print(f"{n} JPEGs of {args.source_size} px → {args.image_size} px, batch {args.batch_size}, "
              f"{args.arch} preprocess_input; study cache at {side} px (the largest native input), {beside} px "
              "(the other networks' native inputs) stored beside it")
        # Every method starts from the OS page cache (the check has just read every file in a real study).
        for path in files:
            with open(path, "rb") as fh:
                fh.read()
        cache_root = folder / CACHE_FOLDER
        if cache_root.exists():
            import shutil

            shutil.rmtree(cache_root)

        load_before = _common.wait_for_quiet(args)
        seed_times = seed_loop_epochs(files, args.image_size, preprocess, args.batch_size, max(1, args.seed_epochs))
        uncached = first_epoch(split, args.image_size, preprocess, args.batch_size, image_cache=None)
        check_plain = timed_check(root, None)
        # The cache study.check_data fills: StudyCache.in_output (at `side`, every native size beside it).
        check_fill = timed_check(root, StudyCache.in_output(folder, "native"))
        cached = first_epoch(split, args.image_size, preprocess, args.batch_size, StudyCache(cache_root, side))
        check_again = timed_check(root, StudyCache(cache_root, side))
        load_after = _common.load1()
        cache_mb = sum(f.stat().st_size for f in cache_root.rglob("*") if f.is_file()) / 2**20

    seed = n / statistics.median(seed_times)
    print(f"load average (1 min): {load_before:.2f} before, {load_after:.2f} after the measurement")
    print(f"{'method':62s} {'seconds':>8s} {'images/s':>9s}")
    rows = [
        (f"seed loop, one epoch (median of {len(seed_times)}: "
         + ", ".join(f"{t:.1f}" for t in seed_times) + " s)", statistics.median(seed_times)),
        ("pipeline first epoch, decoding the files (before)", uncached),
        ("pipeline first epoch, from the study cache (now)", cached),
        ("data check, as before (decodes at 1/4 scale)", check_plain),
        (f"data check filling the study cache ({cache_mb:.0f} MB on disk)", check_fill),
        ("data check again, files unchanged (no decode)", check_again),
    ]
    for name, seconds in rows:
        print(f"{name:62s} {seconds:8.1f} {n / seconds:9.0f}")
    before = check_plain + 5 * uncached
    now = check_fill + 5 * cached
    print(f"a five-model study's decoding and first epochs: before {before:.0f} s (check + 5 first epochs), "
          f"now {now:.0f} s (check filling the cache + 5 first epochs from it) = {before / now:.2f}x faster")
    print(f"first epoch from the study cache / seed loop epoch = {n / cached / seed:.2f}x; "
          f"before (decoding the files) {n / uncached / seed:.2f}x")
    _common.ratio_line("first_epoch", "pipeline first epoch (study cache)/seed_loop epoch", n / cached / seed, 3.0)


if __name__ == "__main__":
    main()
