"""Build a transfer-learning classifier from a registry entry, save it atomically, and load a trained one back.

The model is one FLAT functional graph: the keras.applications base is built on our own Input
(`input_tensor=`), so its layers sit directly in the model and `model.get_layer(spec.last_conv_layer)`
works for Grad-CAM, also on a model loaded back from `.keras`. Head layers are named `head_*`;
every other layer after the input belongs to the pretrained base.
"""

from __future__ import annotations

import os
import re
import socket
import zipfile
from pathlib import Path

import keras

from bloodcell_lib.atomic import atomic_path
from bloodcell_lib.classes import CLASSES
from bloodcell_lib.config import check_image_size
from bloodcell_lib.dedupe import sha256_file
from bloodcell_lib.errors import ConfigError, ModelError, WeightsError
from bloodcell_lib.registry import ArchSpec, get_arch

IMAGENET = "imagenet"
HEAD_PREFIX = "head_"
INPUT_NAME = "image"
# Per socket operation while Keras fetches ImageNet weights: offline, the fetch must fail in seconds,
# not hang for the minutes of the system's default TCP timeout.
DOWNLOAD_TIMEOUT_S = 10.0
# Where keras.applications downloads ImageNet weights from.
KERAS_WEIGHTS_HOST = ("storage.googleapis.com", 443)
# A layer's block: the leading letters of its name and the number after them.
_BLOCK_NAME = re.compile(r"[A-Za-z]+\d*")


def build_model(
    arch: str,
    num_classes: int = len(CLASSES),
    image_size: int | None = None,
    weights: str | Path | None = IMAGENET,
    dropout: float = 0.3,
    hidden_units: int = 0,
) -> keras.Model:
    """Return base (no top) → global average pooling → dropout → [dense → dropout] → softmax, named `arch`.

    image_size None means the architecture's native size. weights: "imagenet" (Keras' download and
    cache), None (random initialisation) or a path to a weights file of the base without top.
    The softmax runs in float32 so mixed precision cannot round probabilities to float16.
    """
    spec = get_arch(arch)
    size = check_image_size(spec, image_size)
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}.")
    inputs = keras.Input(shape=(size, size, 3), name=INPUT_NAME)
    base_output = _build_base(spec, inputs, weights)
    x = keras.layers.GlobalAveragePooling2D(name=f"{HEAD_PREFIX}pool")(base_output)
    x = keras.layers.Dropout(dropout, name=f"{HEAD_PREFIX}dropout")(x)
    if hidden_units > 0:
        x = keras.layers.Dense(hidden_units, activation="relu", name=f"{HEAD_PREFIX}hidden")(x)
        x = keras.layers.Dropout(dropout, name=f"{HEAD_PREFIX}hidden_dropout")(x)
    outputs = keras.layers.Dense(
        num_classes, activation="softmax", dtype="float32", name=f"{HEAD_PREFIX}predictions"
    )(x)
    return keras.Model(inputs, outputs, name=spec.key)


def describe_weights(weights: str | Path | None) -> str:
    """Return how the base was initialised, for the results: 'imagenet', 'none (random init)' or file + sha256."""
    if weights is None:
        return "none (random init)"
    if str(weights) == IMAGENET:
        return IMAGENET
    path = Path(weights)
    return f"file {path.resolve()} (sha256 {sha256_file(path)})"


def imagenet_available(arch: str | None = None, timeout: float = 3.0) -> bool:
    """Return True when Keras can get ImageNet weights: the arch's file is cached, or the download host answers."""
    if arch is not None and _cached_imagenet_files(get_arch(arch)):
        return True
    try:
        with socket.create_connection(KERAS_WEIGHTS_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def base_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Return the pretrained base's layers in graph order (everything but the input and the head)."""
    return [
        layer for layer in model.layers
        if not isinstance(layer, keras.layers.InputLayer) and not layer.name.startswith(HEAD_PREFIX)
    ]


def head_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Return the classification head's layers (pooling, dropout, dense)."""
    return [layer for layer in model.layers if layer.name.startswith(HEAD_PREFIX)]


def layer_blocks(model: keras.Model) -> dict[str, list[keras.layers.Layer]]:
    """Return the model's layers (without the input) grouped by block, in graph order: the name's leading word and
    number ("block1a_expand_conv" → block1, "conv5_block3_out" → conv5, "stem_conv" → stem, "head_pool" → head)."""
    blocks: dict[str, list[keras.layers.Layer]] = {}
    for layer in base_layers(model) + head_layers(model):
        match = _BLOCK_NAME.match(layer.name)
        blocks.setdefault(match.group(0) if match else layer.name, []).append(layer)
    return blocks


def model_image_size(model: keras.Model) -> int:
    """Return the side length of the square images the model takes."""
    return int(model.input_shape[1])


def save_model(model: keras.Model, path: str | Path) -> Path:
    """Save a `.keras` model atomically (a crash mid-save leaves the previous file intact), without optimizer state.

    What a user loads is the network: Adam's two slots per weight would triple the file (VGG16 at 32 px: 177 MB →
    59 MB) and the compile configuration would rebuild an optimizer nobody asked for. Keras 3 has no
    include_optimizer flag, so an uncompiled functional model over the same layers is saved; it shares the weights
    and copies nothing. Resuming training uses its own snapshots (resume.py), never this file.
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise ConfigError(f"Models are saved in Keras 3's format; the file name must end in .keras, got {path}.")
    with atomic_path(path) as tmp:  # the temporary name keeps the .keras suffix Keras insists on
        inference_model(model).save(tmp)
    return path


def inference_model(model: keras.Model) -> keras.Model:
    """Return an uncompiled model over the same layers and weights (no optimizer, no compile configuration)."""
    if not getattr(model, "compiled", False) and getattr(model, "optimizer", None) is None:
        return model
    try:
        return keras.Model(model.input, model.output, name=model.name)
    except (AttributeError, ValueError):  # a subclassed model has no graph to wrap: saved as it is
        return model


def load_trained_model(path: str | Path) -> tuple[keras.Model, ArchSpec]:
    """Load a saved `.keras` model (safe_mode=True) and return it with its ArchSpec (found from the model name)."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"{path} is a folder, not a model file; pass the `.keras` file inside it "
                         "(e.g. 'Saved Models/efficientnetb3.keras').")
    if not path.is_file():
        raise ModelError(f"No model file at {path}; train one with `python -m bloodcell_lib train` first.")
    if not zipfile.is_zipfile(path):  # Keras would call this "File not found", which it is not
        raise ModelError(
            f"{path} is not a Keras 3 `.keras` archive (not a zip file: corrupt, truncated, or another format "
            "such as .h5); retrain it or restore it from a copy."
        )
    try:
        model = keras.models.load_model(path, safe_mode=True)
    except Exception as exc:  # Keras raises ValueError, OSError, zipfile errors... for a bad archive
        raise ModelError(
            f"Cannot load the model file {path}: {_first_line(exc)}. The file is corrupt, truncated or not a "
            "Keras 3 `.keras` archive; retrain it or restore it from a copy."
        ) from exc
    try:
        spec = get_arch(model.name)
    except ConfigError:
        raise ModelError(
            f"The model in {path} is named {model.name!r}, which is no registry architecture; "
            "models built by build_model are named after their architecture key."
        ) from None
    check_model_fits_study(model, path)
    return model, spec


def check_model_fits_study(model: keras.Model, where: str | Path = "the model") -> None:
    """Refuse a model whose output is not one probability per class of this study or whose input is not RGB."""
    inputs, outputs = model.input_shape, model.output_shape
    if isinstance(inputs, list) or len(inputs) != 4 or inputs[-1] != 3 or inputs[1] != inputs[2] or not inputs[1]:
        raise ModelError(
            f"The model in {where} takes inputs of shape {inputs}; this study feeds square RGB images "
            "(None, size, size, 3). Use a model trained with `python -m bloodcell_lib train`."
        )
    if isinstance(outputs, list) or len(outputs) != 2 or outputs[-1] != len(CLASSES):
        raise ModelError(
            f"The model in {where} has output shape {outputs}, but this study has {len(CLASSES)} classes "
            f"({', '.join(CLASSES)}); it was trained for another task. Use a model trained with "
            "`python -m bloodcell_lib train`."
        )


def _build_base(spec: ArchSpec, inputs: keras.KerasTensor, weights: str | Path | None) -> keras.KerasTensor:
    """Build the base on `inputs` with the requested weights and return its output tensor."""
    if weights is None:
        return spec.constructor(include_top=False, weights=None, input_tensor=inputs).output
    if str(weights) == IMAGENET:
        return _build_imagenet_base(spec, inputs)
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(
            f"Weights file {path} does not exist. Pass the path of a {spec.display_name} weights file "
            "without top (.h5 or .weights.h5), 'imagenet', or none."
        )
    try:
        return spec.constructor(include_top=False, weights=str(path), input_tensor=inputs).output
    except Exception as exc:  # wrong network, wrong shapes, not HDF5: Keras raises ValueError/OSError/...
        raise WeightsError(
            f"Cannot load {path} into {spec.display_name} without top: {_first_line(exc)}. The file must hold the "
            f"weights of a {spec.display_name} base without its classification top (e.g. Keras' "
            "'..._notop.h5'), or pass --weights none."
        ) from exc


def _build_imagenet_base(spec: ArchSpec, inputs: keras.KerasTensor) -> keras.KerasTensor:
    """Build the base with ImageNet weights from Keras' cache or download; offline → WeightsError in seconds."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return spec.constructor(include_top=False, weights=IMAGENET, input_tensor=inputs).output
    except Exception as exc:  # Keras' get_file raises a plain Exception on URL errors, ValueError on a bad hash
        raise WeightsError(
            f"Could not get the ImageNet weights of {spec.display_name}: {_first_line(exc)}. Keras downloads them once "
            "into ~/.keras/models/, which needs internet access. Alternatives: pass a local weights file "
            "without top, e.g. "
            f"`--weights PATH/{spec.key}_notop.h5` (weights=PATH); put Keras' cached file into "
            "~/.keras/models/; or train from random initialisation with `--weights none` (weights=None)."
        ) from exc
    finally:
        socket.setdefaulttimeout(previous)


def _first_line(exc: BaseException) -> str:
    """Return the first line of an exception's message (Keras' loading errors run to hundreds of lines)."""
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__


def _cached_imagenet_files(spec: ArchSpec) -> list[Path]:
    """Return Keras' cached no-top ImageNet files of an architecture (their names start with the key)."""
    home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
    # Keras falls back to /tmp/.keras when the home folder is not writable.
    folders = [home / "models", Path("/tmp/.keras/models")]
    return [path for folder in folders if folder.is_dir() for path in folder.glob(f"{spec.key}*notop*.h5")]
