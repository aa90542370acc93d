"""Memory: peak resident memory of one training epoch through make_dataset versus loading every image as one
float32 array first (the usual notebook recipe), 5,000 images of 224 px, each in its own child process.

    python benchmarks/bench_memory.py

A tiny model keeps the measurement about the data. A third child does everything but the data (import
TensorFlow, build and train the model on two random batches): its peak is the baseline subtracted for
the net figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _common

VARIANTS = ("baseline", "pipeline", "float32_array")


def _arguments(parser) -> None:
    parser.add_argument("--per-class", type=int, default=200, help="original cells per class")
    parser.add_argument("--duplicates", type=int, default=4, help="augmented copies per cell (5,000 files in all)")
    parser.add_argument("--source-size", type=int, default=224, help="side of the synthetic JPEGs")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--arch", default="resnet50", help="whose preprocess_input both recipes apply")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)


def tiny_model(image_size: int):
    """A few hundred parameters: the model and its activations are small next to the images."""
    import keras

    model = keras.Sequential([
        keras.Input((image_size, image_size, 3)),
        keras.layers.Conv2D(8, 3, strides=4, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(5, activation="softmax"),
    ])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


def run_child(args) -> None:
    """One variant in this process; prints one JSON line (the parent reads the peak from the kernel)."""
    import numpy as np

    from bloodcell_lib.registry import get_arch

    preprocess = get_arch(args.arch).preprocess
    size, batch = args.image_size, args.batch_size
    model = tiny_model(size)
    rng = np.random.default_rng(0)
    # Train on random data first, so every variant (and the baseline) holds the same runtime and graphs.
    model.fit(rng.uniform(0, 255, (2 * batch, size, size, 3)).astype(np.float32),
              rng.integers(0, 5, 2 * batch), batch_size=batch, epochs=1, verbose=0)
    started = time.perf_counter()
    n = 0
    before_fit = None
    if args.child != "baseline":
        split = _common.synthetic_split(args.data, args.per_class, args.source_size, args.duplicates)
        n = len(split)
        if args.child == "pipeline":
            from bloodcell_lib.pipeline import make_dataset

            ds = make_dataset(split, "train", size, preprocess, batch_size=batch, cache="memory")
            model.fit(ds, epochs=1, verbose=0, shuffle=False)
        else:
            x, y = float32_array(split, size, preprocess)
            before_fit = _peak_mib()
            model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=True)
    print(json.dumps({"variant": args.child, "images": n, "seconds": time.perf_counter() - started,
                      "peak_before_fit_mib": before_fit}), flush=True)


def _peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def float32_array(split, size: int, preprocess):
    """The usual recipe, at its leanest: one preallocated float32 array filled in place, preprocessed in place.

    Notebooks usually build a list and call np.array(...).astype(float32), which briefly holds more;
    the lean form makes our comparison conservative.
    """
    import cv2
    import numpy as np

    from bloodcell_lib.classes import CLASSES

    root = split.attrs["data_root"]
    x = np.empty((len(split), size, size, 3), np.float32)
    for i, path in enumerate(split["path"]):
        image = cv2.cvtColor(cv2.imread(f"{root}/{path}", cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        x[i] = cv2.resize(image, (size, size))
    x = preprocess(x)  # Keras' numpy path works in place on float32
    y = split["label"].map(CLASSES.index).to_numpy()
    return x, y


def measure(args, variant: str, data: Path) -> dict:
    """Run one variant in a child process and return its JSON line plus its peak RSS from wait4 (MiB)."""
    command = [sys.executable, __file__, "--child", variant, "--data", str(data),
               "--per-class", str(args.per_class), "--duplicates", str(args.duplicates),
               "--source-size", str(args.source_size), "--image-size", str(args.image_size),
               "--batch-size", str(args.batch_size), "--arch", args.arch]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    out = child.stdout.read()
    # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the maximum over all children so far).
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    child.stdout.close()
    if child.returncode != 0:
        raise RuntimeError(f"the {variant} child failed with exit code {child.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_mib"] = usage.ru_maxrss / 1024  # Linux reports KiB
    result["wall_seconds"] = time.perf_counter() - started
    return result


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0], _arguments)
    if args.child:
        run_child(args)
        return
    _common.print_header("memory: make_dataset vs a float32 array of the whole set")
    with _common.work_folder(args, "memory") as folder:
        split = _common.synthetic_split(folder, args.per_class, args.source_size, args.duplicates)
        n, size = len(split), args.image_size
        print(f"{n} JPEGs of {args.source_size} px → {size} px, batch {args.batch_size}, one epoch, tiny model; "
              f"uint8 set {n * size * size * 3 / 2**20:.0f} MiB, float32 set {n * size * size * 3 * 4 / 2**20:.0f} MiB")
        results = {}
        for variant in VARIANTS:
            load = _common.wait_for_quiet(args, f"the {variant} child")
            results[variant] = measure(args, variant, folder)
            results[variant]["load"] = load

    base = results["baseline"]["peak_mib"]
    for variant, r in results.items():
        net = r["peak_mib"] - base
        print(f"{variant:14s} peak RSS {r['peak_mib']:7.0f} MiB raw, {net:7.0f} MiB net of the baseline; "
              f"data+epoch {r['seconds']:.1f} s; load average {r['load']:.2f} at start")
    pipe, arr = results["pipeline"]["peak_mib"], results["float32_array"]["peak_mib"]
    loaded = results["float32_array"]["peak_before_fit_mib"]
    print(f"float32_array peak before model.fit (the array alone, preprocessed): {loaded:.0f} MiB raw, "
          f"{loaded - base:.0f} MiB net; model.fit(x, y) adds the rest (Keras copies the arrays)")
    print(f"raw ratio pipeline/float32_array = {pipe / arr:.3f}; "
          f"against the array alone: raw {pipe / loaded:.3f}, net {(pipe - base) / (loaded - base):.3f}")
    # The net ratio: the baseline (TensorFlow, the model, its graphs) is the same for both recipes and does not
    # grow with the data; what the recipes differ in is the memory the data takes.
    _common.ratio_line("memory", "net peak RSS pipeline/float32_array", (pipe - base) / (arr - base), 1 / 3,
                       at_least=False)


if __name__ == "__main__":
    main()
