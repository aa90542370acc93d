"""Pipeline overhead: training throughput of one model fed from files through make_dataset versus fed from
preprocessed float32 tensors already in memory (same model, same batch, epochs >= 2).

    python benchmarks/bench_pipeline_overhead.py        # ResNet50 at 64 px, batch 32, 320 images
"""

from __future__ import annotations

import statistics
import time

import _common  # noqa: I001 - first: quiets TensorFlow before it loads
import keras


def _arguments(parser) -> None:
    parser.add_argument("--arch", default="resnet50", help="registry architecture (weights=None)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=16, help="original cells per class")
    parser.add_argument("--duplicates", type=int, default=3, help="augmented copies per cell")
    parser.add_argument("--source-size", type=int, default=256, help="side of the synthetic JPEGs")
    parser.add_argument("--rounds", type=int, default=3, help="measured epochs per feed (after a warm-up epoch)")


class EpochTimer(keras.callbacks.Callback):
    """Keras callback keeping each epoch's wall time."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []
        self._started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._started)


def epoch_seconds(model, ds) -> float:
    """Train one epoch on `ds` and return its wall time (the feeds shuffle themselves, so fit must not)."""
    timer = EpochTimer()
    model.fit(ds, epochs=1, verbose=0, shuffle=False, callbacks=[timer])
    return timer.seconds[0]


def in_memory_dataset(split, image_size: int, preprocess, batch_size: int, n: int):
    """The in-memory reference: the same decoded pixels, preprocessed to float32 once, sliced, shuffled, batched."""
    import numpy as np
    import tensorflow as tf

    from bloodcell_lib.pipeline import load_images

    images, labels, _ = load_images(split, "train", image_size)
    x = np.asarray(preprocess(images.astype(np.float32)), dtype=np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, labels.astype(np.int32)))
    return ds.shuffle(n, seed=0, reshuffle_each_iteration=True).batch(batch_size).prefetch(tf.data.AUTOTUNE)


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0], _arguments)
    _common.print_header("pipeline overhead: training fed by make_dataset vs by in-memory tensors")
    from bloodcell_lib.model import build_model
    from bloodcell_lib.pipeline import make_dataset
    from bloodcell_lib.registry import get_arch

    spec = get_arch(args.arch)
    with _common.work_folder(args, "pipeline_overhead") as folder:
        split = _common.synthetic_split(folder, args.per_class, args.source_size, args.duplicates)
        # Whole batches only: a smaller last batch would be a second graph and a different step time.
        n = len(split) // args.batch_size * args.batch_size
        split = split.iloc[:n].copy()
        split.attrs["data_root"] = str(folder / "data")
        feeds = {
            "in-memory float32 tensors": in_memory_dataset(split, args.image_size, spec.preprocess, args.batch_size, n),
            "make_dataset, training (shuffle + augment)": make_dataset(
                split, "train", args.image_size, spec.preprocess, batch_size=args.batch_size, cache="memory"),
            "make_dataset, no augmentation (shuffle)": make_dataset(
                split, "train", args.image_size, spec.preprocess, batch_size=args.batch_size, augment=False,
                shuffle=True, cache="memory"),
        }
        model = build_model(args.arch, image_size=args.image_size, weights=None)
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        print(f"{spec.display_name} at {args.image_size} px (weights=None), batch {args.batch_size}, "
              f"{n} images of {args.source_size} px, {args.rounds} measured epochs per feed, interleaved")

        # Epoch 1 of each feed: Keras traces the step, the pipeline fills its cache.
        warm = {name: epoch_seconds(model, ds) for name, ds in feeds.items()}

        load_before = _common.wait_for_quiet(args)
        seconds: dict[str, list[float]] = {name: [] for name in feeds}
        for _ in range(args.rounds):  # interleaved, so a load change hits every feed alike
            for name, ds in feeds.items():
                seconds[name].append(epoch_seconds(model, ds))
        load_after = _common.load1()

    print(f"load average (1 min): {load_before:.2f} before, {load_after:.2f} after the measurement")
    rate = {}
    for name, times in seconds.items():
        rate[name] = n / statistics.median(times)
        print(f"{name:45s} warm-up epoch {n / warm[name]:6.1f} img/s; epochs >= 2: "
              + ", ".join(f"{n / t:.1f}" for t in times) + f" img/s (median {rate[name]:.1f})")
    memory = rate["in-memory float32 tensors"]
    plain = rate["make_dataset, no augmentation (shuffle)"] / memory
    print(f"no-augmentation ratio make_dataset/in_memory = {plain:.3f}")
    # The ratio uses the training configuration: augmentation is work the in-memory feed does not do, so
    # this is the conservative comparison.
    _common.ratio_line("pipeline_overhead", "make_dataset(train)/in_memory",
                       rate["make_dataset, training (shuffle + augment)"] / memory, 0.95)


if __name__ == "__main__":
    main()
