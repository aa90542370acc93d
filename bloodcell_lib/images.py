"""Reading any image file a user may have into an RGB uint8 array, or a clear error."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from bloodcell_lib.errors import ImageDecodeError, ImageTooLargeError

# A single blood-cell crop is well under a megapixel; a whole-slide scan is not what we classify.
# 100 MP lets large smear photographs through and refuses decompression bombs.
MAX_PIXELS = 100_000_000

# Names of files that operating systems and tools leave in folders; never images.
HIDDEN_FILES = {".ds_store", "thumbs.db", "desktop.ini", ".directory"}


def is_hidden(path: Path) -> bool:
    """Return True for dot-files and OS clutter such as Thumbs.db or __MACOSX folders."""
    name = path.name
    return name.startswith(".") or name.casefold() in HIDDEN_FILES or name == "__MACOSX"


def read_rgb(path: str | Path, min_side: int | None = None) -> np.ndarray:
    """Decode an image file to an H×W×3 uint8 RGB array; raise ImageDecodeError if it is not one.

    min_side: a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose sides stay ≥ min_side,
    a fraction of the cost of a full decode; other formats decode in full. The whole file is still read,
    so a truncated file fails either way.
    """
    return read_rgb_sized(path, min_side)[0]


def read_rgb_sized(path: str | Path, min_side: int | None = None,
                   data: bytes | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Return (RGB array as read_rgb gives it, (height, width) of the full-resolution image as displayed).

    data: the file's bytes when the caller has read them already (e.g. to hash them): decoded from memory instead
    of reading the file again; path then only names it in errors.
    """
    path = Path(path)
    if data is None:
        if path.is_dir():
            raise ImageDecodeError(f"{path}: is a folder, not an image file; pass the image files inside it "
                                   f"(e.g. {path}/*.jpg).")
        if not path.exists():
            raise ImageDecodeError(f"{path}: no such file; check the path.")
    try:
        if (len(data) if data is not None else path.stat().st_size) == 0:
            raise ImageDecodeError(f"{path}: the file is empty (0 bytes); delete or replace it.")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path if data is None else io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise ImageTooLargeError(
                        f"{path}: declares {width}×{height} = {width * height:,} pixels, more than the "
                        f"{MAX_PIXELS:,} we decode (possible decompression bomb); crop or resize it first."
                    )
                if min_side and img.format == "JPEG":
                    img.draft("RGB", (min_side, min_side))
                img.load()
                if img.getexif().get(_EXIF_ORIENTATION, 1) in _TURNED_A_QUARTER:
                    width, height = height, width
                img = ImageOps.exif_transpose(img)
                return to_rgb(img), (height, width)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"{path}: refused as a decompression bomb ({exc}).") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"{path}: not an image file Pillow can read; remove it from the folder.") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"{path}: corrupt or truncated image ({exc}); re-export or remove it.") from exc


def displayed_size(path: str | Path) -> tuple[int, int]:
    """Return (height, width) of an image as read_rgb shows it (EXIF rotation applied), from its header alone."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            turned = "exif" in img.info and img.getexif().get(_EXIF_ORIENTATION, 1) in _TURNED_A_QUARTER
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"{path}: not an image file Pillow can read ({exc}); remove it.") from exc
    return (width, height) if turned else (height, width)


# EXIF orientations 5-8 turn the picture by a quarter: displayed width and height swap.
_EXIF_ORIENTATION = 0x0112
_TURNED_A_QUARTER = (5, 6, 7, 8)


def to_rgb(img: Image.Image) -> np.ndarray:
    """Convert a Pillow image of any mode (L, P, RGBA, CMYK, I;16, F, ...) to RGB uint8."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        gray = np.clip(np.rint(arr / hi * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # Composite transparent pixels on white, the colour of an empty smear background.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    if mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    return np.ascontiguousarray(arr)
