import time

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from bloodcell_lib.dedupe import (
    DEFAULT_MAX_DISTANCE,
    MIN_SIMILARITY,
    cell_signature,
    dihedral_hashes,
    group_duplicates,
    min_dihedral_distance,
    near_duplicate_pairs,
    sha256_file,
    signature_similarity,
)

BACKGROUND = (232, 204, 212)


def smear_cell(seed: int, size: int = 96) -> np.ndarray:
    """A stand-in smear crop: pink background, a few red cells, one stained cell with a lobed nucleus."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(float)
    img = np.zeros((size, size, 3)) + BACKGROUND
    for _ in range(8):
        cx, cy = rng.uniform(0, size, 2)
        r = rng.uniform(0.08, 0.14) * size
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = (222, 140, 152)
    cx, cy = size / 2 + rng.normal(0, size * 0.03, 2)
    rx, ry = rng.uniform(0.2, 0.28, 2) * size
    angle = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    body = (u / rx) ** 2 + (v / ry) ** 2 < 1
    img[body] = (198, 162, 204)
    for _ in range(3):
        nx, ny = cx + rng.normal(0, size * 0.07), cy + rng.normal(0, size * 0.07)
        lobe = ((xx - nx) ** 2 + (yy - ny) ** 2 < (rng.uniform(0.05, 0.1) * size) ** 2) & body
        img[lobe] = (92, 42, 122)
    img += rng.normal(0, 5, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_rotated_flipped_and_recoloured_copies_match():
    cell = smear_cell(1)
    pil = Image.fromarray(cell)
    copies = {
        "rot90": np.rot90(cell),
        "rot270": np.rot90(cell, 3),
        "flip": np.fliplr(cell),
        "transpose": cell.transpose(1, 0, 2),
        "brighter": np.asarray(ImageEnhance.Brightness(pil).enhance(1.15)),
        "less contrast": np.asarray(ImageEnhance.Contrast(pil).enhance(0.8)),
        "rot90 + darker": np.rot90(np.asarray(ImageEnhance.Brightness(pil).enhance(0.9))),
        "slight crop": np.asarray(pil.crop((3, 3, 93, 93)).resize((96, 96))),
    }
    original = dihedral_hashes(cell)
    distances = {name: min_dihedral_distance(original, dihedral_hashes(c)) for name, c in copies.items()}
    assert all(d <= DEFAULT_MAX_DISTANCE for d in distances.values()), distances
    # The eight variants of a pure rotation/flip are the same set of hashes.
    assert set(dihedral_hashes(np.rot90(cell)).tolist()) == set(original.tolist())


def test_different_cells_do_not_match():
    hashes = [dihedral_hashes(smear_cell(seed)) for seed in range(100, 130)]
    closest = min(min_dihedral_distance(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1:])
    assert closest > DEFAULT_MAX_DISTANCE


def test_hashes_have_eight_uint64_variants_and_accept_grayscale():
    h = dihedral_hashes(smear_cell(3))
    assert h.shape == (8,) and h.dtype == np.uint64
    assert len(set(h.tolist())) > 1  # a non-symmetric image differs from its rotations
    gray = dihedral_hashes(smear_cell(3).mean(axis=2).astype(np.uint8))
    assert gray.shape == (8,)


def test_exact_copies_share_sha256_and_group(tmp_path):
    a = tmp_path / "a.png"
    Image.fromarray(smear_cell(5)).save(a)
    b = tmp_path / "b.png"
    b.write_bytes(a.read_bytes())
    assert sha256_file(a) == sha256_file(b)
    # Even with hashes that look unrelated, equal bytes put two images in one group.
    hashes = np.array([[0] * 8, [2**64 - 1] * 8, [0x0F0F] * 8], dtype=np.uint64)
    groups = group_duplicates([sha256_file(a), sha256_file(b), "other"], hashes, max_distance=0)
    assert groups[0] == groups[1] != groups[2]


def test_groups_are_connected_components_numbered_in_order():
    # 0~1 (1 bit) and 1~2 (1 bit) but 0 and 2 differ by 2: the chain still makes one group.
    base = np.uint64(0b1111 << 20)
    rows = [base, base ^ np.uint64(1), base ^ np.uint64(3), np.uint64(2**63 - 1), np.uint64(0xFFFF)]
    hashes = np.repeat(np.array(rows, dtype=np.uint64)[:, None], 8, axis=1)
    groups = group_duplicates([str(i) for i in range(5)], hashes, max_distance=1)
    assert groups.tolist() == [0, 0, 0, 1, 2]


def test_any_variant_of_the_other_image_links_a_pair():
    a = np.arange(8, dtype=np.uint64) * np.uint64(0x0101010101)
    b = np.full(8, 0xFFFFFFFFFFFF, dtype=np.uint64)
    b[5] = a[0]  # b turned one way is a as it is
    assert group_duplicates(["a", "b"], np.stack([a, b]), max_distance=0).tolist() == [0, 0]


def test_five_thousand_images_group_in_seconds():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=(5000, 8), dtype=np.uint64)
    hashes[1::2, 3] = hashes[::2, 0] ^ np.uint64(1)  # every odd image is a turned copy of the one before
    start = time.perf_counter()
    groups = group_duplicates([str(i) for i in range(5000)], hashes, max_distance=DEFAULT_MAX_DISTANCE)
    assert time.perf_counter() - start < 20
    assert groups.max() == 2499
    assert (groups[::2] == groups[1::2]).all()


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        group_duplicates(["a", "b"], np.zeros((3, 8), dtype=np.uint64))


def turned(rgb: np.ndarray, degrees: float, zoom: float = 1.0) -> np.ndarray:
    """The image rotated about its centre (edges mirrored), as an augmentation would write it."""
    import cv2

    side = rgb.shape[0]
    matrix = cv2.getRotationMatrix2D(((side - 1) / 2, (side - 1) / 2), degrees, zoom)
    return cv2.warpAffine(rgb, matrix, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def test_signature_matches_a_cell_turned_by_a_small_angle_and_relit():
    cell = smear_cell(7, size=128)
    relit = np.clip(turned(np.rot90(cell), 6.0, zoom=1.03).astype(float) * 0.92 + 12, 0, 255).astype(np.uint8)
    copies = [np.fliplr(cell), turned(cell, -4.0), relit, np.asarray(Image.fromarray(cell).resize((96, 96)))]
    reference = cell_signature(cell)
    scores = [signature_similarity(reference, cell_signature(c)) for c in copies]
    assert min(scores) >= MIN_SIMILARITY, scores


def test_signature_keeps_different_cells_apart():
    signatures = [cell_signature(smear_cell(seed, size=128)) for seed in range(200, 216)]
    scores = [signature_similarity(a, b) for i, a in enumerate(signatures) for b in signatures[i + 1:]]
    assert max(scores) < MIN_SIMILARITY


def test_near_duplicate_pairs_links_copies_only():
    cells = [smear_cell(seed, size=96) for seed in range(300, 310)]
    images = cells + [turned(np.rot90(cells[2], 3), 5.0), np.flipud(cells[7])]
    pairs = near_duplicate_pairs([cell_signature(im) for im in images])
    groups = group_duplicates([str(i) for i in range(len(images))], None, pairs=pairs)
    assert groups[10] == groups[2] and groups[11] == groups[7]
    assert len(set(groups.tolist())) == 10


def test_group_duplicates_takes_extra_pairs_without_hashes():
    groups = group_duplicates(["a", "b", "c", "d"], None, pairs=np.array([[3, 1]]))
    assert groups.tolist() == [0, 1, 2, 1]
    assert group_duplicates([], None).tolist() == []
