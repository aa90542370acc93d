"""Data delivery: images per second that make_dataset hands to training (epochs >= 2, cached) versus the
seed notebooks' loop (OpenCV decode + resize + preprocess_input per image, every epoch).

Each rate is the median over epochs 2..E (E = --epochs): one epoch takes a few seconds, so a single one
is at the mercy of anything else running.

    python benchmarks/bench_data_delivery.py            # 2,000 synthetic 512-px JPEGs → 224 px
"""

from __future__ import annotations

import statistics
import time

import _common


def _arguments(parser) -> None:
    parser.add_argument("--per-class", type=int, default=80, help="original cells per class")
    # Copies are separate JPEG files that cost the same to decode and are quicker to make than new cells.
    parser.add_argument("--duplicates", type=int, default=4, help="augmented copies per cell")
    parser.add_argument("--source-size", type=int, default=512, help="side of the synthetic JPEGs")
    parser.add_argument("--image-size", type=int, default=224, help="side the images are resized to")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=5, help="epochs per method (>= 2)")
    parser.add_argument("--arch", default="resnet50", help="whose preprocess_input both methods apply")


def pipeline_epochs(split, image_size: int, preprocess, batch_size: int, epochs: int,
                    training: bool) -> list[float]:
    """Seconds per epoch of iterating make_dataset to the end (every batch materialised as tensors)."""
    from bloodcell_lib.pipeline import make_dataset

    ds = make_dataset(split, "train", image_size, preprocess, batch_size=batch_size,
                      augment=training, shuffle=training, cache="memory")
    times = []
    for _ in range(epochs):
        started = time.perf_counter()
        for images, labels in ds:
            pass
        times.append(time.perf_counter() - started)
    return times


def seed_loop_epochs(files: list[str], image_size: int, preprocess, batch_size: int, epochs: int) -> list[float]:
    """Seconds per epoch of the seed notebooks' recipe: imread → RGB → resize → preprocess_input, per image."""
    import cv2
    import numpy as np

    times = []
    for _ in range(epochs):
        started = time.perf_counter()
        for start in range(0, len(files), batch_size):
            batch = []
            for path in files[start:start + batch_size]:
                image = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                image = cv2.resize(image, (image_size, image_size))
                batch.append(preprocess(image.astype(np.float32)))
            images = np.stack(batch)  # what a generator yields to model.fit
        times.append(time.perf_counter() - started)
        del images
    return times


def batch_step_costs(image_size: int, preprocess, batch_size: int, reps: int = 20) -> dict[str, float]:
    """Milliseconds per batch of each post-cache step (cast, preprocess, augmentation), plain TF and XLA."""
    import numpy as np
    import tensorflow as tf

    from bloodcell_lib.pipeline import augment_batch

    images = tf.constant(np.random.default_rng(0).integers(0, 256, (batch_size, image_size, image_size, 3), np.uint8))
    floats = tf.cast(images, tf.float32)
    seed = tf.constant([0, 1], tf.int64)
    steps = {
        "cast uint8 -> float32": (lambda x: tf.cast(x, tf.float32), images),
        "preprocess_input (float32 in)": (lambda x: preprocess(x), floats),
        "augment_batch": (lambda x: augment_batch(x, seed), images),
        "cast + preprocess_input": (lambda x: preprocess(tf.cast(x, tf.float32)), images),
        "augment_batch + preprocess_input": (lambda x: preprocess(augment_batch(x, seed)), images),
    }
    costs = {}
    for name, (fn, arg) in steps.items():
        for jit in (False, True):
            compiled = tf.function(fn, jit_compile=jit, autograph=False)
            compiled(arg).numpy()  # trace (and compile) outside the timing
            started = time.perf_counter()
            for _ in range(reps):
                out = compiled(arg)
            out.numpy()
            costs[f"{name}{', XLA' if jit else ''}"] = (time.perf_counter() - started) / reps * 1e3
    return costs


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0], _arguments)
    _common.print_header("data delivery: make_dataset vs seed-style OpenCV loop")
    from bloodcell_lib.registry import get_arch

    preprocess = get_arch(args.arch).preprocess
    epochs = max(2, args.epochs)
    with _common.work_folder(args, "data_delivery") as folder:
        split = _common.synthetic_split(folder, args.per_class, args.source_size, args.duplicates)
        root = split.attrs["data_root"]
        files = [f"{root}/{p}" for p in split["path"]]
        n = len(files)
        print(f"{n} JPEGs of {args.source_size} px → {args.image_size} px, batch {args.batch_size}, "
              f"{args.arch} preprocess_input, {epochs} epochs per method")
        # Read every file once so all methods start from the OS page cache, as epoch 2 of any of them would.
        for path in files:
            with open(path, "rb") as fh:
                fh.read()

        load_before = _common.wait_for_quiet(args)
        results = {
            "pipeline, training (shuffle + augment)": pipeline_epochs(
                split, args.image_size, preprocess, args.batch_size, epochs, training=True),
            "pipeline, evaluation (no shuffle/augment)": pipeline_epochs(
                split, args.image_size, preprocess, args.batch_size, epochs, training=False),
            "seed loop (cv2 per image)": seed_loop_epochs(files, args.image_size, preprocess, args.batch_size, epochs),
        }
        costs = batch_step_costs(args.image_size, preprocess, args.batch_size)
        load_after = _common.load1()

    print(f"load average (1 min): {load_before:.2f} before, {load_after:.2f} after the measurement")
    print(f"{'method':45s} " + " ".join(f"{'epoch ' + str(i + 1):>12s}" for i in range(epochs)) + "   (images/s)")
    for name, times in results.items():
        print(f"{name:45s} " + " ".join(f"{n / t:12.0f}" for t in times))
    rate = {name: n / statistics.median(times[1:]) for name, times in results.items()}
    train = rate["pipeline, training (shuffle + augment)"]
    evaluation = rate["pipeline, evaluation (no shuffle/augment)"]
    seed = rate["seed loop (cv2 per image)"]
    print(f"median of epochs >= 2: pipeline (training) {train:.0f} img/s, "
          f"pipeline (evaluation) {evaluation:.0f} img/s, seed loop {seed:.0f} img/s")
    print(f"evaluation-mode ratio pipeline/seed_loop = {evaluation / seed:.2f}x")
    print(f"where the time goes, ms per batch of {args.batch_size} × {args.image_size}² (one call at a time; "
          f"the seed loop needs {args.batch_size / seed * 1e3:.1f} ms per batch):")
    for name, ms in costs.items():
        print(f"  {name:42s} {ms:7.1f}")
    # The ratio uses the training configuration: it does more work than the seed loop (shuffle, augmentation),
    # so it is the conservative comparison.
    _common.ratio_line("data_delivery", "pipeline(train)/seed_loop, epochs >= 2", train / seed, 3.0)


if __name__ == "__main__":
    main()
