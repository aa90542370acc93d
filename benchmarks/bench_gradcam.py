"""Grad-CAM: heatmaps for 64 images in batches (explain.gradcam_heatmaps) versus a per-image loop with the same
model (the keras-io recipe: one GradientTape per image, eager).

    python benchmarks/bench_gradcam.py                  # ResNet50 at 224 px, weights=None
"""

from __future__ import annotations

import time

import _common  # noqa: I001 - first: quiets TensorFlow before it loads
import numpy as np
import tensorflow as tf


def _arguments(parser) -> None:
    parser.add_argument("--arch", default="resnet50", help="registry architecture (weights=None)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="runs per method; the fastest counts")
    parser.add_argument("--retrace-sample", type=int, default=4,
                        help="images for the 'gradcam_heatmaps once per image' figure (it re-traces per call)")


def per_image_gradcam(model, layer: str, images: np.ndarray) -> np.ndarray:
    """The keras-io 'Grad-CAM class activation visualization' recipe, one image at a time (grad model built once)."""
    import keras

    grad_model = keras.Model(model.input, [model.get_layer(layer).output, model.output])
    size = images.shape[1:3]
    maps = []
    for image in images:
        with tf.GradientTape() as tape:
            conv, preds = grad_model(image[None], training=False)
            score = preds[:, int(tf.argmax(preds[0]))]
        grads = tape.gradient(score, conv)
        pooled = tf.reduce_mean(grads, axis=(0, 1, 2))
        heat = tf.nn.relu(tf.squeeze(conv[0] @ pooled[..., None]))
        heat = tf.math.divide_no_nan(heat, tf.reduce_max(heat))
        maps.append(tf.image.resize(heat[..., None], size)[..., 0].numpy())
    return np.stack(maps)


def best_of(repeats: int, fn):
    """Return (fastest seconds, result of the last run)."""
    times, result = [], None
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return min(times), result


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0], _arguments)
    _common.print_header("Grad-CAM: batched vs per-image loop")
    from bloodcell_lib.explain import default_layer, gradcam_heatmaps
    from bloodcell_lib.model import build_model
    from bloodcell_lib.pipeline import load_images
    from bloodcell_lib.registry import get_arch

    spec = get_arch(args.arch)
    with _common.work_folder(args, "gradcam") as folder:
        per_class = -(-args.images // 5)
        split = _common.synthetic_split(folder, per_class, args.image_size, duplicates=0)
        images, _, _ = load_images(split, "train", args.image_size, limit=args.images)
    x = spec.network_input(images)
    model = build_model(args.arch, image_size=args.image_size, weights=None)
    layer = default_layer(model)
    n = len(x)
    print(f"{spec.display_name} at {args.image_size} px (weights=None), layer {layer}, {n} images, "
          f"best of {args.repeats} runs per method")

    load_before = _common.wait_for_quiet(args)
    t_batched, heat_batched = best_of(args.repeats, lambda: gradcam_heatmaps(model, x, layer=layer))
    t_batch64, _ = best_of(args.repeats, lambda: gradcam_heatmaps(model, x, layer=layer, batch_size=n))
    t_batch1, heat_batch1 = best_of(args.repeats, lambda: gradcam_heatmaps(model, x, layer=layer, batch_size=1))
    t_loop, _ = best_of(args.repeats, lambda: per_image_gradcam(model, layer, x))
    k = min(n, max(1, args.retrace_sample))
    t_calls, _ = best_of(1, lambda: [gradcam_heatmaps(model, x[i:i + 1], layer=layer) for i in range(k)])
    load_after = _common.load1()

    print(f"load average (1 min): {load_before:.2f} before, {load_after:.2f} after the measurement")
    print(f"gradcam_heatmaps, batches of 32 (default):     {t_batched:7.2f} s  ({n / t_batched:6.1f} img/s)")
    print(f"gradcam_heatmaps, one batch of {n}:             {t_batch64:7.2f} s  ({n / t_batch64:6.1f} img/s)")
    print(f"gradcam_heatmaps, batch_size=1 (one trace):    {t_batch1:7.2f} s  ({n / t_batch1:6.1f} img/s)")
    print(f"per-image GradientTape loop (keras-io recipe): {t_loop:7.2f} s  ({n / t_loop:6.1f} img/s)")
    print(f"gradcam_heatmaps called once per image:        {t_calls / k:7.2f} s per image, measured on {k} images "
          f"(each call traces anew); x{n} = {t_calls / k * n:.0f} s, extrapolated, not used in the ratio")
    print(f"batched vs batch_size=1 heatmaps: max abs difference {np.max(np.abs(heat_batched - heat_batch1)):.2e}")
    print(f"batching alone (batch_size=1 / batches of 32) = {t_batch1 / t_batched:.2f}x")
    _common.ratio_line("gradcam", "per_image_loop/batched", t_loop / t_batched, 5.0)


if __name__ == "__main__":
    main()
