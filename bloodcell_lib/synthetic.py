"""A synthetic stand-in for the Kaggle set "Blood Cell Images for Cancer Detection" (Wright-Giemsa smears).

Each image shows one centred white cell among pale red cells. Stains are drawn as absorbance
(Beer-Lambert: light = background × exp(-optical density)), so overlaps and stain strength behave like
dye on glass. Every original cell is written once plus K augmented copies, as in the real set, whose
images are augmented copies of fewer cells; the file numbers do not say which files are copies of one cell.
Copies are drawn from real-world augmentation ranges (COPY_RANGES: any rotation, flips, zoom, shift,
exposure with clipping, defocus, JPEG re-encoding), shared with the near-duplicate test set in copyset.py.
Slides (background colour, stain hue and strength, blur, noise, red-cell density) are shared across
classes, so the background carries no class information unless `shortcut=True` tints it by class.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np
import pandas as pd

from bloodcell_lib.atomic import write_json, write_text
from bloodcell_lib.classes import CLASSES, FILE_PREFIXES
from bloodcell_lib.config import RunConfig
from bloodcell_lib.errors import ConfigError, DatasetError
from bloodcell_lib.images import HIDDEN_FILES

MANIFEST_NAME = "synth_manifest.csv"
STAMP_NAME = "synth_params.json"  # ensure_synthetic_dataset's record of the parameters a set was made with
# Raised whenever the images drawn for the same parameters change, so cached sets are made again.
# 2: copies drawn from real-world augmentation ranges (any angle, zoom 0.85-1.2, clipping, defocus, JPEG 70-95).
GENERATOR_VERSION = 2
MANIFEST_COLUMNS = ("file", "class", "cell_id", "slide", "copy",
                    "mask_cx", "mask_cy", "mask_rx", "mask_ry", "mask_angle")
# The smallest set that still has every class and a copy of each cell; for other modules' tests.
TINY_SET: dict[str, int] = {"per_class": 6, "size": 48, "duplicates": 1}

JPEG_QUALITY = 90  # of originals; each copy draws its own from COPY_RANGES
_STAGING = ".synth_staging"
_CELLS_PER_SLIDE = 6
# With shortcut=True, each class comes from one of two "sources" (labs/scanners), like the real set.
_SOURCE_OF_CLASS = {"basophil": 0, "erythroblast": 0, "monocyte": 1, "myeloblast": 1, "seg_neutrophil": 0}
_SOURCE_TINT = (  # RGB gains of the glass: warm source, cool source
    np.array([1.04, 1.0, 0.91], np.float32),
    np.array([0.93, 0.98, 1.04], np.float32),
)

# How copies of one cell differ: the ranges of Keras ImageDataGenerator / Albumentations pipelines and
# re-crops as they are used on real blood-cell sets. Deliberately wide: a near-duplicate detector is
# scored on copies as they occur, never on ranges narrowed to suit it. Each is drawn uniformly.
COPY_RANGES: dict[str, tuple[float, float]] = {
    "angle": (0.0, 360.0),  # degrees, any rotation
    "zoom": (0.85, 1.2),  # magnification; below 1 the copy shows more of the surroundings
    "shift_x": (-0.08, 0.08),  # of the image side
    "shift_y": (-0.08, 0.08),
    "gain": (0.8, 1.25),  # value × gain + offset on 0-255, then clipped to 0-255
    "offset": (-25.0, 25.0),
    "blur_sigma": (0.0, 1.6),  # Gaussian defocus, pixels at the output size (synthetic sets: at 128 px)
    "jpeg_quality": (70, 95),  # re-encoding quality of a copy, both ends included
}
COPY_FLIP_P = 0.5  # chance of a horizontal flip, and independently of a vertical one
# Canvas margin around the image, as a fraction of its side: the farthest corner of a copy (half the
# diagonal plus the largest shift, divided by the smallest zoom) must still fall on drawn canvas.
_MARGIN = (0.5 + COPY_RANGES["shift_x"][1]) * math.sqrt(2) / COPY_RANGES["zoom"][0] - 0.5 + 0.02
_CELL_JITTER = 0.045  # of the image side: where the white cell sits in an original
_LAMP_TILT = 0.015  # brightness change across the field, uneven illumination

# Optical density (absorbance per RGB channel) of the stained structures at unit strength.
_OD_NUCLEUS = np.array([0.95, 1.45, 0.62], np.float32)  # azure-eosin purple chromatin
_OD_NUCLEUS_BLUE = np.array([1.15, 1.30, 0.45], np.float32)
_OD_NUCLEUS_RED = np.array([0.80, 1.55, 0.78], np.float32)
_OD_RBC = np.array([0.10, 0.44, 0.36], np.float32)  # eosin pink
_OD_GRANULE_BASO = np.array([1.75, 2.05, 1.10], np.float32)  # blue-black basophil granules
_OD_CYTOPLASM = {
    "basophil": np.array([0.14, 0.24, 0.11], np.float32),  # pale lilac, mostly hidden by granules
    "erythroblast": np.array([0.24, 0.38, 0.28], np.float32),  # grey-pink, polychromatic
    "monocyte": np.array([0.30, 0.31, 0.19], np.float32),  # grey-blue, "ground glass"
    "myeloblast": np.array([0.48, 0.36, 0.14], np.float32),  # basophilic blue rim
    "seg_neutrophil": np.array([0.11, 0.21, 0.12], np.float32),  # pale pink-lilac
}
_OD_CYTOPLASM_BLUE_ERB = np.array([0.36, 0.31, 0.16], np.float32)
# Cell radius range as a fraction of the image side.
_CELL_RADIUS = {
    "basophil": (0.21, 0.26),
    "erythroblast": (0.15, 0.20),
    "monocyte": (0.29, 0.34),
    "myeloblast": (0.25, 0.30),
    "seg_neutrophil": (0.24, 0.29),
}


def make_synthetic_dataset(
    out: str | Path,
    per_class: int = 200,
    size: int = 128,
    duplicates: int = 2,
    seed: int = 0,
    shortcut: bool = False,
) -> Path:
    """Write a synthetic set in the Kaggle layout to `out` and return the path of its manifest.

    per_class original cells per class, each written once plus `duplicates` augmented copies, as
    out/<class>/<PREFIX>_<number>.jpg; out/synth_manifest.csv says which file is which cell.
    """
    _check_parameters(per_class, size, duplicates, seed)
    out = Path(out)
    _check_target(out)
    staging = out / _STAGING
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)

    slides = _make_slides(seed, n=max(3, math.ceil(per_class * len(CLASSES) / _CELLS_PER_SLIDE)))
    n_files = per_class * (1 + duplicates)
    id_width = max(4, len(str(per_class - 1)))
    rows: list[dict[str, Any]] = []
    for ci, cls in enumerate(CLASSES):
        (staging / cls).mkdir()
        # A seeded permutation of file numbers hides which files are copies of one cell.
        numbers = np.random.default_rng([seed, 2, ci]).permutation(n_files) + 1
        slide_ids = _assign_slides(np.random.default_rng([seed, 3, ci]), slides, cls, per_class, shortcut)
        for i in range(per_class):
            rng = np.random.default_rng([seed, 4, ci, i])
            slide = slides[slide_ids[i]]
            canvas, ellipse = _render_canvas(cls, rng, slide, size, shortcut)
            photo = _expose(canvas, rng, slide)
            for copy in range(1 + duplicates):
                if copy == 0:
                    image, ell = _crop_original(photo, ellipse, size)
                    quality = JPEG_QUALITY
                else:
                    image, ell, drawn = _augment(photo, ellipse, size, rng)
                    quality = drawn.jpeg_quality
                name = f"{FILE_PREFIXES[cls]}_{numbers[i * (1 + duplicates) + copy]}.jpg"
                _write_jpeg(staging / cls / name, _to_uint8(image), quality)
                rows.append({
                    "file": f"{cls}/{name}", "class": cls, "cell_id": f"{cls}-{i:0{id_width}d}",
                    "slide": slide.index, "copy": copy, "mask_cx": ell[0], "mask_cy": ell[1],
                    "mask_rx": ell[2], "mask_ry": ell[3], "mask_angle": ell[4],
                })

    frame = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    frame["_n"] = frame["file"].str.extract(r"_(\d+)\.jpg$", expand=False).astype(int)
    frame = frame.sort_values(["class", "_n"], kind="stable").drop(columns="_n").round(3)
    _replace_previous_set(out, staging)
    manifest = write_text(out / MANIFEST_NAME, frame.to_csv(index=False))
    staging.rmdir()
    return manifest


def ensure_synthetic_dataset(
    out: str | Path,
    per_class: int = 200,
    size: int = 128,
    duplicates: int = 2,
    seed: int = 0,
    shortcut: bool = False,
) -> Path:
    """Return `out` holding the synthetic set of these parameters: made once, then reused until the parameters or
    GENERATOR_VERSION change (the stand-in a run without a dataset trains on)."""
    out = Path(out)
    stamp = out / STAMP_NAME
    wanted = {"per_class": per_class, "size": size, "duplicates": duplicates, "seed": seed, "shortcut": shortcut,
              "generator": GENERATOR_VERSION}
    if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == wanted:
        return out
    make_synthetic_dataset(out, per_class=per_class, size=size, duplicates=duplicates, seed=seed, shortcut=shortcut)
    write_json(stamp, wanted)
    return out


def make_stand_in(cfg: RunConfig) -> Path:
    """The synthetic stand-in a run without a dataset trains on, at cfg.data_dir, with the run's synth_* settings
    (made once, then reused). Its seed is synth_seed, not the run's seed: repeated seeds share one dataset."""
    return ensure_synthetic_dataset(cfg.data_dir, per_class=cfg.synth_per_class, size=cfg.synth_size,
                                    duplicates=cfg.synth_duplicates, seed=cfg.synth_seed, shortcut=cfg.synth_shortcut)


def load_manifest(path: str | Path) -> pd.DataFrame:
    """Read a synthetic set's manifest (the CSV or the folder holding it) into a DataFrame."""
    frame = _read_manifest(path, MANIFEST_NAME, MANIFEST_COLUMNS, ("file", "class", "cell_id"), "synthetic set",
                           "`python -m bloodcell_lib synth`")
    return frame.astype({"slide": int, "copy": int})


def _read_manifest(path: str | Path, name: str, columns: Sequence[str], text: Sequence[str], what: str,
                   how: str) -> pd.DataFrame:
    """Read a generator's manifest CSV (or the one in the folder `path`), refusing a missing file or column."""
    path = Path(path)
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise DatasetError(f"{path}: no {what.replace(' ', '-')} manifest here; make one with {how}.")
    frame = pd.read_csv(path, dtype={c: str for c in text})
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DatasetError(f"{path}: manifest lacks column(s) {', '.join(missing)}; regenerate the {what}.")
    return frame


def manifest_mask(row: Mapping[str, Any], height: int, width: int) -> np.ndarray:
    """Return the H×W boolean mask of a manifest row's cell ellipse (pixel centres at integer coordinates)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    dx, dy = x - float(row["mask_cx"]), y - float(row["mask_cy"])
    a = math.radians(float(row["mask_angle"]))
    u = (dx * math.cos(a) + dy * math.sin(a)) / float(row["mask_rx"])
    v = (-dx * math.sin(a) + dy * math.cos(a)) / float(row["mask_ry"])
    return u * u + v * v <= 1.0


# ---------------------------------------------------------------------------------------------------
# Where we may write


def _check_parameters(per_class: int, size: int, duplicates: int, seed: int) -> None:
    if seed < 0:
        raise ConfigError(f"seed must be 0 or a positive integer, got {seed}.")
    if per_class < 1:
        raise ConfigError(f"per_class must be at least 1 original cell per class, got {per_class}.")
    if size < 16:
        raise ConfigError(f"size must be at least 16 pixels to draw a cell, got {size}.")
    if duplicates < 0:
        raise ConfigError(f"duplicates must be 0 or more augmented copies per cell, got {duplicates}.")


def _check_target(out: Path, manifest: str = MANIFEST_NAME, staging: str = _STAGING,
                  what: str = "synthetic set") -> None:
    """Refuse any folder that holds something other than a previous generated set of this kind."""
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out} is a file, not a folder; choose an empty or new folder for the {what}.")
    if not out.exists() or (out / manifest).is_file() or (out / staging).is_dir():
        return
    contents = [p for p in out.iterdir() if p.name.casefold() not in HIDDEN_FILES]
    if contents:
        raise DatasetError(
            f"{out} is not empty and holds no {manifest}, so it may be your own data; the {what} "
            f"is written only into an empty or new folder (or over a previous {what}). "
            f"Choose an empty folder."
        )


def _replace_previous_set(out: Path, staging: Path, manifest: str = MANIFEST_NAME) -> None:
    """Swap the staged class folders in; until the new manifest lands, the staging folder marks `out` as ours."""
    (out / manifest).unlink(missing_ok=True)
    for cls in CLASSES:
        target = out / cls
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)
        (staging / cls).rename(target)


# ---------------------------------------------------------------------------------------------------
# Slides: what varies between smears and is shared by every class on them


@dataclass(frozen=True)
class _Slide:
    index: int
    source: int  # 0 warm or 1 cool; used only with shortcut=True
    background: np.ndarray  # RGB of empty glass under the lamp
    nucleus_od: np.ndarray
    eosin: float  # strength of the pink stain
    azure: float  # strength of the blue/purple stain
    blur: float  # focus, in pixels at 128 px
    noise: float  # sensor noise, grey levels
    rbc_density: tuple[float, float]  # red cells per image area (size²), lowest and highest


def _make_slides(seed: int, n: int) -> list[_Slide]:
    rng = np.random.default_rng([seed, 1])
    slides = []
    for k in range(n):
        light = rng.uniform(212, 246)
        background = np.clip(light + rng.normal(0, 5, 3) + np.array([2.0, -2.0, 0.0]), 150, 252).astype(np.float32)
        hue = rng.uniform(-1, 1)  # bluer (-) or redder (+) chromatin, one of the main slide-to-slide changes
        toward = _OD_NUCLEUS_RED if hue > 0 else _OD_NUCLEUS_BLUE
        nucleus = _OD_NUCLEUS + abs(hue) * (toward - _OD_NUCLEUS)
        low = float(rng.uniform(3.2, 6.5))
        slides.append(_Slide(
            index=k, source=k % 2, background=background, nucleus_od=nucleus,
            eosin=float(rng.uniform(0.7, 1.3)), azure=float(rng.uniform(0.8, 1.2)),
            blur=float(rng.uniform(0.35, 1.0)), noise=float(rng.uniform(1.0, 3.5)),
            rbc_density=(low, low + float(rng.uniform(1.0, 3.8))),
        ))
    return slides


def _assign_slides(rng: np.random.Generator, slides: list[_Slide], cls: str, n: int, shortcut: bool) -> np.ndarray:
    """Pick a slide per cell: independently of class, or (shortcut) only from the class's source."""
    pool = np.arange(len(slides))
    if shortcut:
        pool = pool[[s.source == _SOURCE_OF_CLASS[cls] for s in slides]]
    return rng.choice(pool, size=n)


# ---------------------------------------------------------------------------------------------------
# Drawing one scene on a canvas a little larger than the image


def _render_canvas(cls: str, rng: np.random.Generator, slide: _Slide, size: int, shortcut: bool):
    """Return (float32 RGB canvas, cell ellipse (cx, cy, rx, ry, angle°) in canvas pixels)."""
    margin = int(math.ceil(_MARGIN * size))
    side = size + 2 * margin
    scale = size / 128.0
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    centre = (side - 1) / 2.0
    edge = max(0.8, 1.3 * scale)  # anti-aliasing width in pixels

    window, cell, white, ellipse = _draw_white_cell(
        cls, rng, (side, side), (centre, centre), _CELL_JITTER, size, slide.nucleus_od, slide.azure)
    cx, cy, rx, ry, _ = ellipse
    cover = np.zeros((side, side), np.float32)
    cover[window] = cell
    od = (1 - 0.85 * cover)[..., None] * _red_cells(rng, xx, yy, (cx, cy), math.sqrt(rx * ry), size, slide, edge)
    od[window] += white

    background = slide.background * (_SOURCE_TINT[slide.source] if shortcut else 1.0)
    tilt_x, tilt_y = (float(t) / size for t in rng.normal(0, _LAMP_TILT, 2))  # uneven illumination across the field
    lamp = 1.0 + tilt_x * (xx - centre) + tilt_y * (yy - centre)
    canvas = (background[None, None, :] * lamp[..., None]) * np.exp(-od)
    sigma = slide.blur * scale
    if sigma > 0.2:
        canvas = cv2.GaussianBlur(canvas, (0, 0), sigma)
    return canvas, ellipse


def _draw_white_cell(cls: str, rng: np.random.Generator, shape: tuple[int, int], centre: tuple[float, float],
                     jitter: float, size: int, nucleus_od: np.ndarray, azure: float):
    """Draw one white cell within `jitter` × size of `centre` (x, y) on a canvas of `shape` (h, w).

    size is the side of the image the cell is drawn for (radii are fractions of it). Returns (window,
    coverage, optical density, ellipse (cx, cy, rx, ry, angle°) in canvas pixels); the coverage (0-1) and
    RGB optical density cover only the canvas[window] the cell reaches.
    """
    scale = size / 128.0
    edge = max(0.8, 1.3 * scale)  # anti-aliasing width in pixels
    r = rng.uniform(*_CELL_RADIUS[cls]) * size
    aspect = rng.uniform(0.80, 1.0)
    rx, ry = r / math.sqrt(aspect), r * math.sqrt(aspect)  # same area, different shape
    angle = rng.uniform(0, 180)
    cx, cy = (float(v) for v in np.asarray(centre) + rng.uniform(-jitter, jitter, 2) * size)
    wobble = _wobble(rng, 0.06 if cls == "monocyte" else 0.035)
    bound = float(np.max(wobble(np.linspace(-math.pi, math.pi, 721))))

    # Draw the white cell in its bounding box only: a third of the canvas, most of the work.
    reach = max(rx, ry) * bound + 2 * edge + 2
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, shape[1])
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, shape[0])
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    lx, ly = _local(xx, yy, cx, cy, angle)  # cell frame, pixels
    rho, theta = np.hypot(lx / rx, ly / ry), np.arctan2(ly / ry, lx / rx)
    cell = _soft((wobble(theta) - rho) * math.sqrt(rx * ry), edge)

    nucleus, cyto_scale, granules = _DRAW_NUCLEUS[cls](rng, lx, ly, rx, ry, edge, scale, (cx - x0, cy - y0))
    grain, contrast, density = _CHROMATIN[cls]
    nuc_od = nucleus_od * (azure * density)
    chroma = _texture(rng, lx.shape, grain * scale, contrast)
    fine = _texture(rng, lx.shape, 0.6 * scale, 1.0)
    cyto_od = _cytoplasm_od(cls, rng) * azure
    if cls == "seg_neutrophil":  # fine pink-lilac granules
        cyto_scale = cyto_scale * np.clip(1.0 + 0.45 * fine, 0.2, None)
    else:
        cyto_scale = cyto_scale * np.clip(1.0 + 0.12 * fine, 0.5, None)
    white = cell[..., None] * ((1 - nucleus)[..., None] * cyto_scale[..., None] * cyto_od
                               + (nucleus * np.clip(chroma, 0.2, None))[..., None] * nuc_od)
    if granules is not None:
        white += (cell * granules)[..., None] * (_OD_GRANULE_BASO * azure)
    return (slice(y0, y1), slice(x0, x1)), cell, white, (cx, cy, rx * bound, ry * bound, angle)


def _local(xx, yy, cx, cy, angle_deg):
    a = math.radians(float(angle_deg))
    dx, dy = xx - float(cx), yy - float(cy)
    return dx * math.cos(a) + dy * math.sin(a), -dx * math.sin(a) + dy * math.cos(a)


def _soft(distance_px, edge):
    """Anti-aliased coverage from a signed distance (positive inside)."""
    return np.clip(0.5 + distance_px / edge, 0.0, 1.0)


def _wobble(rng: np.random.Generator, amount: float):
    """Return b(θ) = 1 + Σ a_k cos(kθ + φ_k): an irregular outline around the unit circle."""
    ks = np.arange(2, 7)
    amps = [float(a) for a in rng.uniform(0, amount, ks.size) / (ks - 1) ** 0.7]
    phases = [float(p) for p in rng.uniform(0, 2 * math.pi, ks.size)]
    return lambda theta: 1.0 + sum(a * np.cos(int(k) * theta + p) for k, a, p in zip(ks, amps, phases))


def _ellipse_sd(lx, ly, cx, cy, rx, ry, angle_deg=0.0):
    """Approximate signed distance (pixels, positive inside) to an ellipse given in the cell frame."""
    rx, ry = float(rx), float(ry)
    u, v = _local(lx, ly, cx, cy, angle_deg)
    return (1.0 - np.hypot(u / rx, v / ry)) * math.sqrt(rx * ry)


def _segment_sd(lx, ly, p, q, half_width):
    """Signed distance (pixels, positive inside) to a thick line segment p–q."""
    px, py = float(p[0]), float(p[1])
    dx, dy = float(q[0]) - px, float(q[1]) - py
    t = np.clip(((lx - px) * dx + (ly - py) * dy) / max(dx * dx + dy * dy, 1e-6), 0, 1)
    return half_width - np.hypot(lx - px - t * dx, ly - py - t * dy)


def _texture(rng: np.random.Generator, shape: tuple[int, ...], sigma: float, amount: float) -> np.ndarray:
    """Return 1 + amount × smoothed unit-variance noise: chromatin clumps or fine granules."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), max(sigma, 0.3))
    smooth /= float(smooth.std()) + 1e-6
    return 1.0 + amount * smooth


def _blobs(rng: np.random.Generator, shape: tuple[int, ...], centre, count: int, radius: float, spot: float):
    """Return a map of `count` round spots of size `spot` scattered uniformly over a disc of `radius`."""
    dist = radius * np.sqrt(rng.uniform(0, 1, count))
    phi = rng.uniform(0, 2 * math.pi, count)
    # Splat points, then blur: one blur draws every granule at once.
    grid = np.zeros(shape, np.float32)
    ix = np.rint(centre[0] + dist * np.cos(phi)).astype(int)
    iy = np.rint(centre[1] + dist * np.sin(phi)).astype(int)
    keep = (ix >= 0) & (ix < shape[1]) & (iy >= 0) & (iy < shape[0])
    np.add.at(grid, (iy[keep], ix[keep]), rng.uniform(0.6, 1.4, int(keep.sum())).astype(np.float32))
    blurred = cv2.GaussianBlur(grid, (0, 0), spot)
    return np.clip(blurred * (2 * math.pi * spot * spot), 0, 1.6)


# Chromatin texture (blur sigma in pixels at 128 px, contrast, density) per class.
_CHROMATIN = {
    "basophil": (1.2, 0.18, 0.75),  # pale, half hidden by granules
    "erythroblast": (1.4, 0.07, 1.3),  # dense, nearly uniform: the darkest nucleus here
    "monocyte": (1.3, 0.24, 1.0),  # lacy
    "myeloblast": (0.55, 0.16, 1.0),  # fine, evenly dispersed
    "seg_neutrophil": (1.6, 0.28, 1.0),  # coarse clumps
}


def _cytoplasm_od(cls: str, rng: np.random.Generator) -> np.ndarray:
    base = _OD_CYTOPLASM[cls]
    if cls == "erythroblast":  # from basophilic to polychromatic to nearly orthochromatic
        base = base + rng.uniform(-0.5, 0.5) * (_OD_CYTOPLASM_BLUE_ERB - base)
    return base * rng.uniform(0.85, 1.15)


def _nucleus_neutrophil(rng, lx, ly, rx, ry, edge, scale, centre):
    """3–5 lobes on an arc, joined by thin chromatin strands."""
    r = math.sqrt(rx * ry)
    n = int(rng.choice([3, 4, 5], p=[0.4, 0.4, 0.2]))
    span = math.radians(rng.uniform(170, 230) + 25 * (n - 3))
    start = rng.uniform(0, 2 * math.pi)
    angles = start + np.linspace(0, span, n) + rng.normal(0, 0.12, n)
    arc = r * rng.uniform(0.42, 0.55)
    offset = rng.normal(0, 0.06, 2) * r
    reach = arc * rng.uniform(0.85, 1.12, n)
    centres = [(offset[0] + d * math.cos(t), offset[1] + d * math.sin(t)) for d, t in zip(reach, angles)]
    chord = 2 * arc * math.sin(span / (n - 1) / 2)
    lobe = min(max(0.44 * chord, 0.19 * r), 0.31 * r)
    sd = np.full(lx.shape, -1e3, np.float32)
    for (px, py), t in zip(centres, angles):
        lr = lobe * rng.uniform(0.85, 1.15)
        lobe_sd = _ellipse_sd(lx, ly, px, py, lr * rng.uniform(0.75, 0.95), lr * rng.uniform(1.0, 1.2), math.degrees(t))
        sd = np.maximum(sd, lobe_sd)
    strand = max(0.05 * r, 0.7 * scale)
    for p, q in zip(centres[:-1], centres[1:]):
        sd = np.maximum(sd, _segment_sd(lx, ly, p, q, strand))
    return _soft(sd, edge), np.ones_like(lx), None


def _nucleus_myeloblast(rng, lx, ly, rx, ry, edge, scale, centre):
    """A large round nucleus leaving a thin blue rim, fine chromatin, 1–3 pale nucleoli."""
    r = math.sqrt(rx * ry)
    f = rng.uniform(0.74, 0.86)
    d, t = rng.uniform(0, 0.7) * (1 - f) * r, rng.uniform(0, 2 * math.pi)  # the rim is often wider on one side
    ox, oy = d * math.cos(t), d * math.sin(t)
    nrx, nry = r * f, r * f * rng.uniform(0.86, 1.0)
    nucleus = _soft(_ellipse_sd(lx, ly, ox, oy, nrx, nry, rng.uniform(0, 180)), edge)
    pale = np.zeros_like(lx)
    for _ in range(int(rng.integers(1, 4))):
        d, t = rng.uniform(0, 0.5) * min(nrx, nry), rng.uniform(0, 2 * math.pi)
        nr = rng.uniform(0.08, 0.12) * math.sqrt(rx * ry)
        spot_sd = _ellipse_sd(lx, ly, ox + d * math.cos(t), oy + d * math.sin(t), nr, nr * rng.uniform(0.8, 1.0))
        pale = np.maximum(pale, _soft(spot_sd, edge * 1.8))
    # Nucleoli hold less chromatin: thinning the nucleus there lets a pale blue show through.
    return nucleus * (1 - 0.6 * pale), np.ones_like(lx), None


def _nucleus_monocyte(rng, lx, ly, rx, ry, edge, scale, centre):
    """A kidney- to horseshoe-shaped nucleus in grey-blue cytoplasm, sometimes with vacuoles."""
    r = math.sqrt(rx * ry)
    t = rng.uniform(0, 2 * math.pi)
    ox, oy = -0.12 * r * math.cos(t), -0.12 * r * math.sin(t)
    nrx, nry = r * rng.uniform(0.62, 0.72), r * rng.uniform(0.50, 0.60)
    nucleus_sd = _ellipse_sd(lx, ly, ox, oy, nrx, nry, math.degrees(t) + 90)
    depth = rng.uniform(0.25, 0.75)  # small → kidney, large → horseshoe
    ir = r * rng.uniform(0.28, 0.40)
    ix, iy = ox + (nry * (1.0 - depth) + ir) * math.cos(t), oy + (nry * (1.0 - depth) + ir) * math.sin(t)
    indent_sd = _ellipse_sd(lx, ly, ix, iy, ir * 1.1, ir)
    nucleus = _soft(np.minimum(nucleus_sd, -indent_sd), edge)
    cyto = np.ones_like(lx)
    for _ in range(int(rng.integers(0, 6))):
        d, phi = rng.uniform(0.6, 0.85) * r, t + rng.uniform(-1.3, 1.3)  # on the cytoplasm side of the indent
        vr = r * rng.uniform(0.04, 0.08)
        cyto = cyto * (1 - 0.75 * _soft(_ellipse_sd(lx, ly, d * math.cos(phi), d * math.sin(phi), vr, vr), edge))
    return nucleus, cyto, None


def _nucleus_basophil(rng, lx, ly, rx, ry, edge, scale, centre):
    """A pale, partly lobed nucleus hidden under coarse blue-black granules that cover the whole cell."""
    r = math.sqrt(rx * ry)
    sd = np.full(lx.shape, -1e3, np.float32)
    for _ in range(int(rng.integers(1, 3))):
        px, py = rng.normal(0, 0.15, 2) * r
        part = _ellipse_sd(lx, ly, px, py, r * rng.uniform(0.40, 0.55), r * rng.uniform(0.32, 0.45), rng.uniform(0, 180))
        sd = np.maximum(sd, part)
    nucleus = _soft(sd, edge)
    spot = max(0.6, rng.uniform(1.2, 1.8) * scale)
    granules = _blobs(rng, lx.shape, centre, int(rng.integers(35, 80)), 0.95 * r, spot)
    return nucleus, np.ones_like(lx), granules * rng.uniform(0.7, 1.0)


def _nucleus_erythroblast(rng, lx, ly, rx, ry, edge, scale, centre):
    """A small, dense, round and often eccentric nucleus."""
    r = math.sqrt(rx * ry)
    nr = r * rng.uniform(0.48, 0.64)
    d, t = rng.uniform(0.0, 0.8) * (r - nr), rng.uniform(0, 2 * math.pi)
    nucleus = _soft(_ellipse_sd(lx, ly, d * math.cos(t), d * math.sin(t), nr, nr * rng.uniform(0.9, 1.0)), edge)
    return nucleus, np.ones_like(lx), None


_DRAW_NUCLEUS = {
    "basophil": _nucleus_basophil,
    "erythroblast": _nucleus_erythroblast,
    "monocyte": _nucleus_monocyte,
    "myeloblast": _nucleus_myeloblast,
    "seg_neutrophil": _nucleus_neutrophil,
}


def _red_cells(rng, xx, yy, wbc_centre, wbc_radius, size, slide: _Slide, edge) -> np.ndarray:
    """Optical density of pale pink discs with a paler centre, placed around (and partly behind) the white cell."""
    side = xx.shape[0]
    od = np.zeros((side, side), np.float32)
    placed: list[tuple[float, float, float]] = []
    # The canvas is larger than the image: scale the count so the image sees the slide's density.
    for _ in range(int(rng.uniform(*slide.rbc_density) * (side / size) ** 2)):
        rr = rng.uniform(0.11, 0.145) * size
        for _try in range(12):
            x, y = (float(v) for v in rng.uniform(0, side, 2))
            if math.hypot(x - wbc_centre[0], y - wbc_centre[1]) < wbc_radius + 0.35 * rr:
                continue
            if all(math.hypot(x - px, y - py) > 0.8 * (rr + pr) for px, py, pr in placed):
                break
        else:
            continue
        placed.append((x, y, rr))
        # Work on the disc's bounding box only: most of the canvas is far from any one red cell.
        x0, x1 = max(int(x - rr - 3), 0), min(int(x + rr + 4), side)
        y0, y1 = max(int(y - rr - 3), 0), min(int(y + rr + 4), side)
        if x0 >= x1 or y0 >= y1:
            continue
        aspect = rng.uniform(0.88, 1.0)
        lx, ly = _local(xx[y0:y1, x0:x1], yy[y0:y1, x0:x1], x, y, rng.uniform(0, 180))
        rho = np.hypot(lx / (rr / math.sqrt(aspect)), ly / (rr * math.sqrt(aspect)))
        disc = _soft((1 - rho) * rr, edge)
        pallor = rng.uniform(0.35, 0.7)
        profile = (1 - pallor * np.clip(1 - (rho / 0.62) ** 2, 0, 1)) + 0.18 * np.exp(-((1 - rho) / 0.12) ** 2)
        od[y0:y1, x0:x1] += disc * profile * rng.uniform(0.8, 1.2)
    return od[..., None] * (_OD_RBC * slide.eosin)


# ---------------------------------------------------------------------------------------------------
# From canvas to file


def _expose(canvas: np.ndarray, rng: np.random.Generator, slide: _Slide) -> np.ndarray:
    """Add sensor noise once per photograph: copies of a cell are augmentations of that one photograph."""
    return canvas + slide.noise * rng.standard_normal(canvas.shape, dtype=np.float32)


def _crop_original(canvas: np.ndarray, ellipse, size: int):
    m = (canvas.shape[0] - size) // 2
    cx, cy, rx, ry, angle = ellipse
    return canvas[m:m + size, m:m + size], (cx - m, cy - m, rx, ry, float(angle) % 180)


@dataclass(frozen=True)
class _Copy:
    """One copy's transform, drawn from COPY_RANGES; shift is a fraction of the side."""
    angle: float
    flip_h: bool
    flip_v: bool
    zoom: float
    shift_x: float
    shift_y: float
    gain: float
    offset: float
    blur_sigma: float
    jpeg_quality: int


def _draw_copy(rng: np.random.Generator) -> _Copy:
    """Draw every parameter of a copy independently and uniformly from COPY_RANGES."""
    def uniform(name: str) -> float:
        return float(rng.uniform(*COPY_RANGES[name]))

    angle = uniform("angle")
    flip_h, flip_v = (bool(f) for f in rng.random(2) < COPY_FLIP_P)
    zoom, shift_x, shift_y = uniform("zoom"), uniform("shift_x"), uniform("shift_y")
    gain, offset, blur = uniform("gain"), uniform("offset"), uniform("blur_sigma")
    low, high = COPY_RANGES["jpeg_quality"]
    quality = int(rng.integers(int(low), int(high) + 1))
    return _Copy(angle, flip_h, flip_v, zoom, shift_x, shift_y, gain, offset, blur, quality)


def _copy_linear(copy: _Copy) -> np.ndarray:
    """The 2×2 map of a copy on pixel offsets from the image centre: flips, then rotation, then zoom."""
    a = math.radians(copy.angle)
    flips = np.diag([-1.0 if copy.flip_h else 1.0, -1.0 if copy.flip_v else 1.0])
    return copy.zoom * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) @ flips


def _relight(image: np.ndarray, copy: _Copy) -> np.ndarray:
    """Brightness gain and offset on 0-255 values, clipped as an 8-bit pipeline would."""
    return np.clip(image * np.float32(copy.gain) + np.float32(copy.offset), 0, 255)


def _augment(canvas: np.ndarray, ellipse, size: int, rng: np.random.Generator):
    """Draw a copy (COPY_RANGES) and apply it about the canvas centre; return (image, ellipse, copy).

    Defocus is scaled from 128 px to `size`, as every length in this module.
    """
    copy = _draw_copy(rng)
    linear = _copy_linear(copy)
    src_c = (canvas.shape[0] - 1) / 2.0
    dst_c = (size - 1) / 2.0
    offset = dst_c + np.array([copy.shift_x, copy.shift_y]) * size - linear @ np.array([src_c, src_c])
    matrix = np.hstack([linear, offset[:, None]])
    image = cv2.warpAffine(canvas, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    sigma = copy.blur_sigma * size / 128.0
    if sigma > 0.05:
        image = cv2.GaussianBlur(image, (0, 0), sigma)
    image = _relight(image, copy)

    cx, cy, rx, ry, angle = ellipse
    centre = linear @ np.array([cx, cy]) + offset
    axis = linear @ np.array([math.cos(math.radians(angle)), math.sin(math.radians(angle))])
    new_angle = math.degrees(math.atan2(axis[1], axis[0])) % 180
    return image, (float(centre[0]), float(centre[1]), rx * copy.zoom, ry * copy.zoom, new_angle), copy


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _write_jpeg(path: Path, rgb: np.ndarray, quality: int = JPEG_QUALITY) -> None:
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise DatasetError(f"{path}: OpenCV could not encode the image as JPEG.")
    path.write_bytes(data.tobytes())
