"""Finding copies of one cell: exact (SHA-256 of the bytes) and near (the same cell turned, flipped, re-lit).

The Kaggle set holds several augmented copies of many cells. A split that puts one copy in train and
another in test measures memory, not skill, so every image gets a duplicate group and the split keeps
groups together.

Two near-duplicate tests live here:
- dihedral_hashes: a 64-bit DCT pHash of each of the 8 rotations/flips, compared by Hamming distance.
  Fast, and right for copies that differ only by 90° turns, flips and re-lighting.
- cell_signature + near_duplicate_pairs: what check_dataset uses. Blood-cell crops of one class look
  alike at thumbnail scale (a round purple cell on pink), so a global hash cannot tell "the same cell
  turned by 5°" from "another cell": on the synthetic set, 64-bit pHash distances of copies (0-26 bits)
  overlap those of distinct cells of a class (2 bits and up). The signature is a colour disc centred on
  the cell's stain, stored at a few small rotations; copies correlate at the best turn/flip/rotation
  above MIN_SIMILARITY, distinct cells below it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# Side of the DCT hash block: 8 → 64-bit hashes. Each variant is one uint64, so distances are one XOR.
HASH_SIZE = 8

# The hash is taken on a grayscale thumbnail this many times the block side (the classic pHash ratio);
# the higher DCT frequencies it drops are the ones that change under resampling, JPEG and small shifts.
_OVERSAMPLE = 4

# Two images are near-duplicates when their closest rotation/flip differs in at most this many of the
# 64 bits. Right for copies that differ by 90° turns, flips and re-lighting (0-2 bits); copies with a
# free rotation or a shift spread to 20+ bits, where distinct cells of one class also fall.
DEFAULT_MAX_DISTANCE = 8

# Rows of the pairwise distance matrix computed at once: 512 × 8·N uint64 stays near 160 MB at N = 5,000.
_CHUNK_ROWS = 512


def sha256_file(path: str | Path) -> str:
    """Return the hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dihedral_hashes(rgb: np.ndarray) -> np.ndarray:
    """Return the 64-bit DCT perceptual hashes of the 8 rotations/flips of an H×W×3 (or H×W) image, shape (8,) uint64."""
    side = HASH_SIZE * _OVERSAMPLE
    thumb = _gray_thumbnail(rgb, side)
    basis = _dct_matrix(side)[:HASH_SIZE]
    hashes = np.empty(8, dtype=np.uint64)
    for k, variant in enumerate(_dihedral_variants(thumb)):
        coeffs = basis @ variant @ basis.T
        hashes[k] = _bits_to_uint64(_threshold_ac(coeffs))
    return hashes


def hamming_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return the number of differing bits between uint64 arrays a and b (broadcast)."""
    return _popcount(np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)))


def min_dihedral_distance(hashes_a: np.ndarray, hashes_b: np.ndarray) -> int:
    """Return the smallest Hamming distance between one image and any rotation/flip of the other."""
    a, b = np.asarray(hashes_a), np.asarray(hashes_b)
    return int(min(hamming_distance(a[0], b).min(), hamming_distance(b[0], a).min()))


def group_duplicates(
    sha256s: list[str],
    hashes: np.ndarray | None,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    pairs: np.ndarray | None = None,
) -> np.ndarray:
    """Return a group index per image: identical bytes, hashes within max_distance (any rotation/flip) or
    an extra `pairs` link (M×2 image indices, e.g. from near_duplicate_pairs) put images in one group.

    Groups are the connected components of the "duplicate of" relation, numbered 0, 1, ... in order of
    each group's first image, so every image (singletons too) has one. hashes=None skips the hash test.
    """
    n = len(sha256s)
    parent = np.arange(n)
    first_of_sha: dict[str, int] = {}
    edges: list[np.ndarray] = [np.array([[i, first_of_sha.setdefault(sha, i)] for i, sha in enumerate(sha256s)],
                                        dtype=np.int64).reshape(-1, 2)]
    if pairs is not None and len(pairs):
        edges.append(np.asarray(pairs, dtype=np.int64).reshape(-1, 2))
    if hashes is None or n == 0:
        return _numbered(_components(parent, edges))
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    if hashes.shape != (n, 8):
        raise ValueError(f"hashes must have shape ({n}, 8) to match {n} sha256 values, got {hashes.shape}.")
    # Image i as it is against all 8 variants of image j: if j is i turned by R, the variant R⁻¹ of j is i
    # again. The relation is not exactly symmetric (the median threshold moves under sign flips of the
    # DCT), so a pair is linked when either direction is close.
    variants = hashes.reshape(-1)  # image j's variants at 8j .. 8j+7
    pending = 0
    for start in range(0, n, _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, n)
        dist = _popcount(hashes[start:stop, :1] ^ variants[None, :]).reshape(stop - start, n, 8).min(axis=2)
        rows, cols = np.nonzero(dist <= max_distance)
        keep = cols != rows + start
        if keep.any():
            edges.append(np.stack([rows[keep] + start, cols[keep]], axis=1))
            pending += int(keep.sum())
        # A folder of near-identical images (blank crops) makes O(N²) edges; fold them into a forest early.
        if pending > 1_000_000:
            parent = _components(parent, edges)
            edges, pending = [], 0
    return _numbered(_components(parent, edges))


# ---------------------------------------------------------------------------------------------------
# Cell signatures: what check_dataset uses to find copies of one cell.

# Images are compared at this side length; a Kaggle crop is ~360 px, the synthetic ones 64-128 px.
WORK_SIDE = 96
# Radius of the disc around the cell's centre that is compared, as a fraction of WORK_SIDE: the cell and a
# rim of background, but not the corners, which a free rotation swaps for content the other copy lacks.
DISC_RADIUS = 0.45
SIGNATURE_SIDE = 16
# Weight of the colour-opponent channels against luminance: two cells of one class from differently
# stained slides differ first in hue, and re-lighting (an offset or a gain) does not change it.
_CHROMA_WEIGHT = 2.0
# Free rotations stored per image, on top of which the comparison tries the 8 turns/flips (degrees).
FREE_ANGLES = (-7.5, -5.0, -2.5, 0.0, 2.5, 5.0, 7.5)
# Candidates per image passed from the shortlist (turns/flips only) to the full comparison.
CANDIDATES = 8
# Correlation of the colour discs (best turn/flip and rotation) at or above which two images show the same
# cell. Tuned on the synthetic set (30 cells per class, 2 copies each): copies score 0.955-1.0 (1st
# percentile 0.974), the closest distinct cells of a class up to 0.975; 0.975 recovers the groups with an
# adjusted Rand index of 0.998. With 200 cells per class the nearest distinct myeloblasts reach 0.99 and
# some merge (bigger sets need a stricter value): a merged group only makes the split stricter.
MIN_SIMILARITY = 0.975


@dataclass(frozen=True)
class CellSignature:
    """A colour disc around the cell, centred on its stain and rotated by each of FREE_ANGLES."""

    discs: np.ndarray  # (len(FREE_ANGLES), 3, SIGNATURE_SIDE, SIGNATURE_SIDE) float32, each unit norm

    @property
    def upright(self) -> np.ndarray:
        """Return the unrotated disc."""
        return self.discs[FREE_ANGLES.index(0.0)]


def cell_signature(rgb: np.ndarray) -> CellSignature:
    """Return the CellSignature of an H×W×3 (or H×W) uint8 image of any size."""
    rgb = np.asarray(rgb)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    small = cv2.resize(np.ascontiguousarray(rgb), (WORK_SIDE, WORK_SIDE), interpolation=cv2.INTER_AREA)
    small = small.astype(np.float32)
    gray = small.mean(axis=2)
    cy, cx = _cell_centre(gray)
    opponent = np.dstack([gray, _CHROMA_WEIGHT * (small[..., 0] - small[..., 1]),
                          _CHROMA_WEIGHT * (small[..., 2] - small[..., 1])])
    opponent = cv2.GaussianBlur(opponent, (0, 0), WORK_SIDE / 80)
    disc = _disc_mask(SIGNATURE_SIDE)
    discs = []
    for angle in FREE_ANGLES:
        patch = _sample_disc(opponent, cx, cy, DISC_RADIUS * WORK_SIDE, SIGNATURE_SIDE, angle)
        patch[..., 0] -= patch[..., 0][disc].mean()  # a brightness offset vanishes here, a gain in the norm
        patch *= disc[..., None]
        discs.append(np.moveaxis(patch / (np.linalg.norm(patch) + 1e-12), -1, 0))
    return CellSignature(np.ascontiguousarray(discs, dtype=np.float32))


def near_duplicate_pairs(
    signatures: list[CellSignature], min_similarity: float = MIN_SIMILARITY, candidates: int = CANDIDATES
) -> np.ndarray:
    """Return (M, 2) index pairs of images that show the same cell (any turn/flip plus a small rotation).

    Each image's `candidates` closest upright discs (best of the 8 turns/flips) are shortlisted; a pair is
    kept when the best turn/flip and rotation correlates at or above min_similarity.
    """
    n = len(signatures)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    upright = np.stack([s.upright for s in signatures])
    shortlist = _shortlist(upright, min(candidates, n - 1))
    scores = _pair_similarity(upright, np.stack([s.discs for s in signatures]), shortlist)
    return shortlist[scores >= min_similarity]


def signature_similarity(a: CellSignature, b: CellSignature) -> float:
    """Return the correlation of two images' discs at the best turn/flip and small rotation (≤ 1)."""
    pair = np.array([[0, 1]])
    score = _pair_similarity(np.stack([a.upright, b.upright]), np.stack([a.discs, b.discs]), pair)
    reverse = _pair_similarity(np.stack([a.upright, b.upright]), np.stack([a.discs, b.discs]), pair[:, ::-1])
    return float(max(score[0], reverse[0]))


def _shortlist(upright: np.ndarray, k: int) -> np.ndarray:
    """Return (M, 2) unordered pairs: each image with its k most similar others over the 8 turns/flips."""
    n = len(upright)
    flat = upright.reshape(n, -1)
    variants = np.stack(_dihedral_variants_last2(upright), axis=1).reshape(n * 8, -1)  # image j at rows 8j..8j+7
    rows = []
    for start in range(0, n, _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, n)
        best = (flat[start:stop] @ variants.T).reshape(stop - start, n, 8).max(axis=2)
        best[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        top = np.argpartition(-best, k - 1, axis=1)[:, :k]
        rows.append(np.stack([np.repeat(np.arange(start, stop), k), top.reshape(-1)], axis=1))
    pairs = np.sort(np.concatenate(rows), axis=1)
    return np.unique(pairs, axis=0)


def _pair_similarity(upright: np.ndarray, discs: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Return, per pair (i, j), the best correlation of i's upright disc with j's discs over turns/flips and rotations."""
    # <T(x), y> = <x, T⁻¹(y)> and the 8 turns/flips are closed under inverse: turn i's disc, not j's 7.
    turned = np.stack(_dihedral_variants_last2(upright), axis=1).reshape(len(upright), 8, -1)
    flat = discs.reshape(len(discs), discs.shape[1], -1)
    scores = np.empty(len(pairs))
    for start in range(0, len(pairs), 8192):
        i, j = pairs[start:start + 8192, 0], pairs[start:start + 8192, 1]
        scores[start:start + len(i)] = np.einsum("bvd,bad->bva", turned[i], flat[j]).reshape(len(i), -1).max(axis=1)
    return scores


def _disc_mask(side: int) -> np.ndarray:
    yy, xx = (np.mgrid[:side, :side] - (side - 1) / 2.0) / ((side - 1) / 2.0)
    return np.hypot(yy, xx) <= 1.0


def _sample_disc(image: np.ndarray, cx: float, cy: float, radius: float, side: int, angle: float) -> np.ndarray:
    """Return the side×side resampling of the square of half-width `radius` centred at (cx, cy), turned by angle°."""
    scale = 2 * radius / (side - 1)
    a = np.deg2rad(angle)
    linear = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    centre = (side - 1) / 2.0
    offset = np.array([cx, cy]) - linear @ np.array([centre, centre])
    matrix = np.hstack([linear, offset[:, None]]).astype(np.float32)
    return cv2.warpAffine(image, matrix, (side, side), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REFLECT_101)


def _cell_centre(gray: np.ndarray) -> tuple[float, float]:
    """Return (y, x) of the stained cell: the centre of the darkest mass, refined under a window around it.

    The darkest half of the stain belongs to the white cell's nucleus and granules; red cells are paler.
    The window keeps a red cell entering at the border from pulling the centre, so copies of one cell get
    the same centre to a fraction of a pixel.
    """
    side = gray.shape[0]
    dark = np.clip(np.percentile(gray, 95) - gray, 0, None)
    if dark.max() <= 0:
        return (side - 1) / 2.0, (side - 1) / 2.0
    weight = np.where(dark > 0.5 * dark.max(), dark, 0.0) ** 2
    yy, xx = np.mgrid[:side, :side].astype(np.float64)
    cy, cx = (weight * yy).sum() / weight.sum(), (weight * xx).sum() / weight.sum()
    for _ in range(3):
        window = weight * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.25 * side) ** 2))
        total = window.sum()
        if total <= 0:
            break
        cy, cx = (window * yy).sum() / total, (window * xx).sum() / total
    return float(cy), float(cx)


def _dihedral_variants_last2(stack: np.ndarray) -> list[np.ndarray]:
    """Return the 8 rotations/flips over the last two axes, in the order of _dihedral_variants."""
    rotations = [np.rot90(stack, k, axes=(-2, -1)) for k in range(4)]
    return rotations + [np.flip(r, axis=-1) for r in rotations]


def _numbered(parent: np.ndarray) -> np.ndarray:
    """Return component ids 0, 1, ... in order of each component's first image."""
    if len(parent) == 0:
        return np.zeros(0, dtype=np.int64)
    _, first_index, group = np.unique(parent, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first_index))
    return order[group.reshape(-1)].astype(np.int64)


def _components(parent: np.ndarray, edges: list[np.ndarray]) -> np.ndarray:
    """Return each node's component representative, merging the forest `parent` with new edges."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(parent)
    pairs = np.concatenate([np.stack([np.arange(n), parent], axis=1), *edges]) if edges else \
        np.stack([np.arange(n), parent], axis=1)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    # Represent each component by its smallest member so the forest is a star per component.
    smallest = np.full(labels.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(smallest, labels, np.arange(n))
    return smallest[labels]


def _gray_thumbnail(rgb: np.ndarray, side: int) -> np.ndarray:
    """Return a side×side float luminance thumbnail (box-filtered so every pixel counts)."""
    img = Image.fromarray(np.asarray(rgb, dtype=np.uint8))
    gray = img.convert("L") if img.mode != "L" else img
    return np.asarray(gray.resize((side, side), Image.Resampling.BOX), dtype=np.float64)


def _dihedral_variants(square: np.ndarray) -> list[np.ndarray]:
    """Return the 8 rotations/flips of a square array, identity first."""
    rotations = [np.rot90(square, k) for k in range(4)]
    return rotations + [np.fliplr(r) for r in rotations]


def _dct_matrix(n: int) -> np.ndarray:
    """Return the orthonormal DCT-II matrix of size n (rows = frequencies)."""
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def _threshold_ac(coeffs: np.ndarray) -> np.ndarray:
    """Return coefficient > median of the AC terms, DC bit fixed at 0.

    Leaving the DC term out makes the hash blind to brightness offsets and (through the median) to contrast
    gain, which is how the Kaggle augmentations re-colour copies.
    """
    flat = coeffs.reshape(-1).copy()
    median = np.median(flat[1:])
    bits = flat > median
    bits[0] = False
    return bits


def _bits_to_uint64(bits: np.ndarray) -> np.uint64:
    return np.packbits(bits.astype(np.uint8)).view(">u8")[0].astype(np.uint64)


def _popcount(x: np.ndarray) -> np.ndarray:
    """Return the number of set bits of each uint64 (np.bitwise_count where numpy has it)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    as_bytes = np.ascontiguousarray(x).view(np.uint8).reshape(*x.shape, 8)
    return _BYTE_POPCOUNT[as_bytes].sum(axis=-1, dtype=np.uint8)


_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
