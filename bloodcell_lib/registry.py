"""The architectures of the study as data: one ArchSpec per network, and nothing per network anywhere else.

Adding a sixth network is one entry in ARCHITECTURES (see tests/test_registry.py, which does exactly that).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from keras import applications

from bloodcell_lib.errors import ConfigError


@dataclass(frozen=True)
class ArchSpec:
    """What a user needs to build, feed, fine-tune and explain one keras.applications network."""

    key: str  # registry key and model name, lower case: "vgg16"
    display_name: str  # as the paper writes it: "VGG16"
    constructor: Callable[..., Any]  # keras.applications constructor (include_top, weights, input_tensor, ...)
    preprocess: Callable[..., Any]  # its own preprocess_input; the pipeline applies it, never the model
    native_size: int  # side length the ImageNet weights were trained at
    min_size: int  # smallest side the constructor accepts without top
    last_conv_layer: str  # Grad-CAM target: the last layer with a spatial feature map
    unfreeze_layers: int  # default count of top base layers made trainable in phase 2 (BatchNorm stays frozen)
    notebook: str  # stem of the model's notebook, e.g. notebooks/VGG16.ipynb
    # From scratch, the run's scratch_learning_rate is multiplied by this (config.resolve, with a note): a network
    # without BatchNorm (VGG16) stalls at chance with Adam 1e-3 from random weights and trains at 1e-4.
    scratch_lr_factor: float = 1.0

    def network_input(self, images_uint8: np.ndarray) -> np.ndarray:
        """uint8 N×H×W×3 RGB images as this network takes them: float32 through its own preprocess_input."""
        return np.asarray(self.preprocess(np.array(images_uint8, dtype=np.float32)), dtype=np.float32)


# Unfreeze depths follow the networks' own stages: the last stage (or exit flow) of each, so phase 2
# adapts the most task-specific features while the generic early filters keep their ImageNet values.
ARCHITECTURES: dict[str, ArchSpec] = {
    spec.key: spec
    for spec in (
        ArchSpec(
            key="vgg16", display_name="VGG16",
            constructor=applications.VGG16, preprocess=applications.vgg16.preprocess_input,
            native_size=224, min_size=32, last_conv_layer="block5_conv3",
            unfreeze_layers=4,  # block5: three convolutions and the pool
            notebook="VGG16",
            scratch_lr_factor=0.1,  # no BatchNorm: demo from scratch at 1e-3 stayed at chance (macro-F1 0.06)
        ),
        ArchSpec(
            key="resnet50", display_name="ResNet50",
            constructor=applications.ResNet50, preprocess=applications.resnet50.preprocess_input,
            native_size=224, min_size=32, last_conv_layer="conv5_block3_out",
            unfreeze_layers=32,  # stage conv5 (three bottleneck blocks)
            notebook="ResNet50",
        ),
        ArchSpec(
            key="xception", display_name="Xception",
            constructor=applications.Xception, preprocess=applications.xception.preprocess_input,
            native_size=299, min_size=71, last_conv_layer="block14_sepconv2_act",
            unfreeze_layers=16,  # exit flow: blocks 13 and 14
            notebook="Xception",
        ),
        ArchSpec(
            key="densenet201", display_name="DenseNet201",
            constructor=applications.DenseNet201, preprocess=applications.densenet.preprocess_input,
            native_size=224, min_size=32, last_conv_layer="relu",
            unfreeze_layers=30,  # the last four dense layers of block 5 and the final BN/ReLU
            notebook="DenseNet201",
        ),
        ArchSpec(
            key="efficientnetb3", display_name="EfficientNetB3",
            constructor=applications.EfficientNetB3, preprocess=applications.efficientnet.preprocess_input,
            native_size=300, min_size=32, last_conv_layer="top_activation",
            unfreeze_layers=31,  # block 7 and the top convolution
            notebook="EfficientNetB3",
        ),
    )
}


def get_arch(key: str) -> ArchSpec:
    """Return the ArchSpec of a registry key (case and surrounding spaces ignored)."""
    normalised = str(key).strip().casefold()
    try:
        return ARCHITECTURES[normalised]
    except KeyError:
        raise ConfigError(
            f"Unknown architecture {key!r}; choose one of: {', '.join(ARCHITECTURES)}."
        ) from None
