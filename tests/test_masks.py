"""Cell masks: stain-colour segmentation against drawn cells of known shape, and the synthetic manifest's truth."""

import cv2
import numpy as np
import pytest

from bloodcell_lib.images import read_rgb
from bloodcell_lib.masks import MANIFEST_SOURCE, STAIN_SOURCE, cell_masks, stain_mask
from bloodcell_lib.synthetic import MANIFEST_NAME, load_manifest, make_synthetic_dataset, manifest_mask


def smear(size, seed, centre, axes, angle=30, tint=(1.0, 1.0, 1.0), cell=True):
    """A white cell (pale lilac cytoplasm, dark purple nucleus) among pink red cells on light glass."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), (242, 236, 240), np.uint8)
    for _ in range(14):
        c = tuple(int(v) for v in rng.integers(0, size, 2))
        r = int(rng.integers(size // 12, size // 7))
        cv2.circle(img, c, r, (228, 150, 170), -1)
        cv2.circle(img, c, r // 2, (238, 190, 200), -1)
    truth = np.zeros((size, size), np.uint8)
    if cell:
        cv2.ellipse(truth, centre, axes, angle, 0, 360, 1, -1)
        cv2.ellipse(img, centre, axes, angle, 0, 360, (170, 140, 200), -1)
        cv2.ellipse(img, (centre[0] + 3, centre[1] - 2), (axes[0] // 2, axes[1] // 2), angle + 40, 0, 360,
                    (95, 45, 140), -1)
    noisy = img.astype(float) * np.array(tint) + rng.normal(0, 6, img.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8), truth.astype(bool)


@pytest.mark.parametrize("size, centre, tint", [
    (64, (32, 30), (1.0, 1.0, 1.0)),
    (128, (60, 66), (1.04, 1.0, 0.91)),  # warm lamp: white balance must undo it
    (256, (126, 130), (0.93, 0.98, 1.04)),  # cool lamp
    (128, (14, 64), (1.0, 1.0, 1.0)),  # cell cut by the image border
])
def test_stain_mask_recovers_the_cell(size, centre, tint):
    image, truth = smear(size, seed=size, centre=centre, axes=(size // 4, size // 5), tint=tint)
    mask = stain_mask(image)
    assert mask.dtype == bool and mask.shape == truth.shape
    assert (mask & truth).sum() / (mask | truth).sum() > 0.8


def test_stain_mask_is_empty_without_a_stained_cell():
    image, _ = smear(96, seed=3, centre=(48, 48), axes=(24, 20), cell=False)
    assert stain_mask(image).sum() == 0
    assert stain_mask(np.full((32, 32, 3), 240, np.uint8)).sum() == 0


def test_stain_mask_on_the_synthetic_set(tmp_path):
    manifest = make_synthetic_dataset(tmp_path / "synth", per_class=4, size=96, duplicates=1, seed=5)
    ious = []
    for _, row in load_manifest(manifest).iterrows():
        image = read_rgb(manifest.parent / row["file"])
        truth, mask = manifest_mask(row, *image.shape[:2]), stain_mask(image)
        ious.append((mask & truth).sum() / max((mask | truth).sum(), 1))
    assert np.mean(ious) > 0.75


def _resized(root, paths, size):
    return np.stack([cv2.resize(read_rgb(root / p), (size, size), interpolation=cv2.INTER_AREA) for p in paths])


def test_cell_masks_are_the_manifest_ellipses_on_a_synthetic_set(tmp_path):
    manifest = make_synthetic_dataset(tmp_path / "synth", per_class=2, size=96, duplicates=1, seed=5)
    rows = load_manifest(manifest).iloc[::3]
    paths = rows["file"].tolist()
    masks, source = cell_masks(manifest.parent, paths, _resized(manifest.parent, paths, 48))
    assert source == MANIFEST_SOURCE and masks.shape == (len(paths), 48, 48) and masks.dtype == bool
    for mask, (_, row) in zip(masks, rows.iterrows()):
        truth = manifest_mask(row, 96, 96).astype(np.uint8)
        assert np.array_equal(mask, cv2.resize(truth, (48, 48), interpolation=cv2.INTER_NEAREST).astype(bool))


def test_cell_masks_segment_the_stain_without_a_manifest_that_names_every_image(tmp_path):
    manifest = make_synthetic_dataset(tmp_path / "synth", per_class=2, size=64, duplicates=0, seed=2)
    paths = load_manifest(manifest)["file"].tolist()[:3]
    images = _resized(manifest.parent, paths, 64)
    stained = np.stack([stain_mask(img) for img in images])
    masks, source = cell_masks(manifest.parent, [*paths[:2], "elsewhere/unknown.jpg"], images)
    assert source == STAIN_SOURCE and np.array_equal(masks, stained)
    (manifest.parent / MANIFEST_NAME).unlink()
    masks, source = cell_masks(manifest.parent, paths, images)
    assert source == STAIN_SOURCE and np.array_equal(masks, stained)
