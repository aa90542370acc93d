"""images.py: reading any image file as RGB uint8, and its displayed size without decoding it."""

from __future__ import annotations

import numpy as np
from PIL import Image

from bloodcell_lib.images import displayed_size, read_rgb


def test_displayed_size_is_read_rgbs_shape_without_decoding(tmp_path):
    rng = np.random.default_rng(0)
    plain, turned = tmp_path / "plain.jpg", tmp_path / "turned.jpg"
    img = Image.fromarray(rng.integers(0, 256, (20, 40, 3), np.uint8))
    img.save(plain)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° when shown: width and height swap
    img.save(turned, exif=exif)
    for path in (plain, turned):
        assert displayed_size(path) == read_rgb(path).shape[:2]
    assert displayed_size(turned) == (40, 20)
