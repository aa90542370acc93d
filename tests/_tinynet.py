"""A one-convolution stand-in network registered as `tinynet`: trains in seconds through every real code path."""

from __future__ import annotations

import keras

from bloodcell_lib.registry import ArchSpec


def tiny_base(include_top=False, weights=None, input_tensor=None, **_):
    """The 'keras.applications' constructor of the stand-in: one 3×3 convolution, the Grad-CAM layer."""
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="tiny_conv")(input_tensor)
    return keras.Model(input_tensor, x)


TINYNET = ArchSpec(key="tinynet", display_name="TinyNet", constructor=tiny_base,
                   preprocess=keras.applications.efficientnet.preprocess_input, native_size=32, min_size=8,
                   last_conv_layer="tiny_conv", unfreeze_layers=1, notebook="TinyNet")
