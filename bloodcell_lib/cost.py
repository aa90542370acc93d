"""What a model costs: parameters, FLOPs per image, file size, training time, latency and throughput.

Every number is measured in the process that calls `measure_cost`, on its machine, and the dict says
which device that was: a latency from a Colab T4 and one from a laptop CPU are not comparable.
FLOPs count a multiply-add as two operations (the TensorFlow profiler's convention).

One traced graph serves every number: `compiled_forward` traces the inference pass once for any batch size; latency
and throughput time it, and the TF profiler counts FLOPs on that same graph re-imported with the batch fixed at 1
(shape inference on import, variables standing in as placeholders of their shapes). Tracing a deep network costs
seconds (DenseNet201: ~5 s, freezing its variables into constants ~9 s more), so the graph is traced once, never
frozen, and the caller may pass the one it traced already (evaluation shares it with the deletion curves). The count
equals the profiler's on a separately traced, frozen batch-1 graph (tests/test_cost.py checks it on small networks;
the five registry networks were checked at their smoke and native sizes). A cache of counts was not chosen: every
run would still trace the graph for latency, and a cache could outlive a change of the graph.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from bloodcell_lib.errors import ModelError
from bloodcell_lib.quiet import quiet_tensorflow


def measure_cost(model, model_path: str | Path | None = None, training_seconds: float | None = None,
                 epochs: int | None = None, repeats: int = 20, batch_size: int = 32,
                 throughput_repeats: int | None = None, forward=None) -> dict[str, Any]:
    """Return a JSON-ready dict: params, FLOPs per image, .keras size, training time, latency, throughput, device.

    Latency is the median of `repeats` timed batch-1 calls after warm-up; throughput is images per second
    at `batch_size` (median of `throughput_repeats` calls, default max(3, repeats // 4)).
    forward: the model's compiled_forward when the caller has one (None → traced here); it is timed and counted.
    """
    size = _input_size(model)
    forward = forward if forward is not None else compiled_forward(model, size)
    flops, method = graph_flops(model, size, forward)
    latency = _timed_calls(forward, _zeros(1, size), repeats)
    batch_times = _timed_calls(forward, _zeros(batch_size, size), throughput_repeats or max(3, repeats // 4))
    return {
        "params_total": int(model.count_params()),
        "params_trainable": int(sum(int(np.prod(w.shape)) for w in model.trainable_weights)),
        "flops_per_image": int(flops),
        "flops_method": method,
        "flops_analytic_per_image": int(analytic_flops(model)),
        "image_size": list(size),
        "keras_file_mb": round(Path(model_path).stat().st_size / 1e6, 3) if model_path else None,
        "training_seconds": None if training_seconds is None else float(training_seconds),
        "epochs": None if epochs is None else int(epochs),
        "latency_ms_batch1_median": 1000.0 * statistics.median(latency),
        "latency_ms_batch1_p90": 1000.0 * float(np.percentile(latency, 90)),
        "latency_repeats": int(repeats),
        "throughput_batch32": batch_size / statistics.median(batch_times),
        "throughput_batch_size": int(batch_size),
        "device": device_name(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }


def graph_flops(model, size: tuple[int, ...] | None = None, forward=None) -> tuple[int, str]:
    """Return (FLOPs per image, method): the TF profiler on the traced graph at batch 1, else an analytic count.

    The profiler cannot see inside nested function calls (Keras runs grouped convolutions on CPU that
    way), so a count below the analytic one means ops were missed and the analytic count is returned.
    forward: the model's compiled_forward, if traced already (None → traced here).
    """
    size = size or _input_size(model)
    analytic = analytic_flops(model)
    try:
        counted = _profiler_flops(forward if forward is not None else compiled_forward(model, size), size)
    except Exception:  # noqa: BLE001 - the v1 profiler is optional; the analytic count is the documented fallback
        return analytic, "analytic"
    if counted < 0.95 * analytic:
        return analytic, "analytic"
    return counted, "tf_profiler"


def analytic_flops(model) -> int:
    """Return 2 × multiply-adds (+ bias adds) of the Conv, DepthwiseConv, SeparableConv and Dense layers."""
    total = 0
    for layer in _all_layers(model):
        try:
            out = tuple(layer.output.shape[1:])
            inp = tuple(layer.input.shape[1:])
        except (AttributeError, ValueError):
            continue  # a layer used twice or never: no single shape to count
        positions = int(np.prod(out[:-1])) if len(out) > 1 else 1
        bias = positions * out[-1] if getattr(layer, "use_bias", False) else 0
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            total += 2 * positions * out[-1] * int(np.prod(layer.kernel_size)) + bias
        elif isinstance(layer, keras.layers.SeparableConv2D):
            channels = inp[-1] * layer.depth_multiplier
            total += 2 * positions * channels * int(np.prod(layer.kernel_size))  # depthwise part
            total += 2 * positions * channels * out[-1] + bias  # pointwise part
        elif isinstance(layer, keras.layers.Conv2D):
            total += 2 * positions * out[-1] * int(np.prod(layer.kernel_size)) * inp[-1] // layer.groups + bias
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * positions * inp[-1] * out[-1] + bias
    return int(total)


def compiled_forward(model, size: tuple[int, ...] | None = None):
    """The model's inference-mode forward pass as a tf.function traced once for any batch size (on first use).

    model.predict re-plans on every call and an eager call pays Python per layer; this graph is what latency
    times, what the FLOPs are counted on, and what evaluation's deletion curves run, so one trace serves all three.
    """
    signature = [tf.TensorSpec([None, *(size or _input_size(model))], tf.float32)]
    return tf.function(lambda x: model(x, training=False), input_signature=signature, autograph=False)


def device_name() -> str:
    """Return the GPU's name if TensorFlow sees one, else the CPU model and its core count."""
    for gpu in tf.config.list_physical_devices("GPU"):
        with contextlib.suppress(Exception):
            name = tf.config.experimental.get_device_details(gpu).get("device_name")
            if name:
                return str(name)
    return f"{_cpu_model()} ({os.cpu_count()} cores)"


# ---------------------------------------------------------------------------------------------------------
# Internals


def _input_size(model) -> tuple[int, ...]:
    shape = tuple(model.inputs[0].shape[1:])
    if any(dim is None for dim in shape):
        raise ModelError(f"Model {model.name!r} has input shape {shape} with an unknown size; cost is measured "
                         "at a fixed size, so build the model with a fixed image size.")
    return tuple(int(d) for d in shape)


def _zeros(batch: int, size: tuple[int, ...]):
    return tf.zeros((batch, *size), tf.float32)


def _timed_calls(fn, x, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):  # the first call traces; later ones settle caches and thread pools
        np.asarray(fn(x))
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        np.asarray(fn(x))  # copying the result to the host waits for the device to finish
        times.append(time.perf_counter() - start)
    return times


def _profiler_flops(forward, size: tuple[int, ...]) -> int:
    """The TF profiler's FLOPs of forward's traced graph with the batch fixed at 1.

    The graph is re-imported with a batch-1 input and each variable read replaced by a placeholder of its shape:
    shape inference then gives every op the static shape the profiler's per-op counts need, which is what
    freezing the variables into constants achieved at several seconds' cost for a deep network.
    """
    concrete = forward.get_concrete_function()
    graph = concrete.graph
    counted = tf.Graph()
    with counted.as_default():
        mapping = {concrete.inputs[0].name: tf.compat.v1.placeholder(tf.float32, [1, *size])}
        for op in graph.get_operations():
            if op.type == "ReadVariableOp":
                value = op.outputs[0]
                if not value.shape.is_fully_defined():
                    raise RuntimeError(f"variable read {op.name} has no static shape")
                mapping[value.name] = tf.compat.v1.placeholder(value.dtype, value.shape)
        tf.graph_util.import_graph_def(graph.as_graph_def(), input_map=mapping, name="")
    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    options = builder(builder.float_operation()).with_empty_output().build()
    with quiet_tensorflow():
        profile = tf.compat.v1.profiler.profile(graph=counted, run_meta=tf.compat.v1.RunMetadata(),
                                                cmd="op", options=options)
    if profile is None or profile.total_float_ops <= 0:
        raise RuntimeError("the profiler counted no floating-point operations")
    return int(profile.total_float_ops)


def _all_layers(model) -> list:
    layers = []
    for layer in model.layers:
        layers.extend(_all_layers(layer) if hasattr(layer, "layers") else [layer])
    return layers


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"
