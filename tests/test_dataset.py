import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import adjusted_rand_score

from bloodcell_lib import images, synthetic
from bloodcell_lib.classes import CLASSES
from bloodcell_lib.dataset import check_dataset, find_data_root
from bloodcell_lib.errors import DatasetError, MissingClassError

def snapshot(folder: Path) -> dict[str, str]:
    """Every file's SHA-256 and every folder, by path: equal snapshots mean nothing was written."""
    state = {}
    for current, dirs, files in os.walk(folder):
        for d in dirs:
            state[os.path.relpath(os.path.join(current, d), folder) + "/"] = "dir"
        for f in files:
            path = os.path.join(current, f)
            state[os.path.relpath(path, folder)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return state


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG whose header declares a huge image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def random_rgb(seed: int, size: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def messy(tmp_path_factory, tiny_set):
    """A Kaggle-style unzip with every kind of trouble, under a path with spaces and non-ASCII characters."""
    requested = tmp_path_factory.mktemp("ds") / "my data" / "Blütenzellen 血液"
    root = requested / "Blood Cell Images" / "dataset"
    shutil.copytree(tiny_set, root)  # the tiny set: 6 cells per class, one copy each
    (root / "seg_neutrophil").rename(root / "Segmented Neutrophils")  # an alias folder name
    base = np.asarray(Image.open(next((root / "basophil").glob("*.jpg"))).convert("RGB"))
    good = png_bytes(Image.fromarray(random_rgb(1)))
    idat = good.index(b"IDAT")
    corrupt = bytearray(good)
    corrupt[idat + 12: idat + 200] = bytes(range(188))
    jpeg = io.BytesIO()
    Image.fromarray(random_rgb(2)).save(jpeg, "JPEG")
    files = {
        "basophil/corrupt.png": bytes(corrupt),
        "basophil/truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
        "basophil/empty.jpg": b"",
        "basophil/notes.jpg": b"this is a text file with an image name\n",
        "basophil/.DS_Store": b"\0\0\0\1Bud1",
        "monocyte/Thumbs.db": b"\xd0\xcf\x11\xe0",
        "myeloblast/._MYO_1.jpg": b"\0\5\26\7 AppleDouble",
        "Segmented Neutrophils/bomb.png": bomb_png(),
        "erythroblast/gray.png": png_bytes(Image.fromarray(base).convert("L").rotate(90)),
        "erythroblast/rgba.png": png_bytes(Image.fromarray(random_rgb(3)).convert("RGBA")),
        "monocyte/palette.png": png_bytes(Image.fromarray(random_rgb(4)).convert("P", palette=Image.Palette.ADAPTIVE)),
        "monocyte/deep16.png": png_bytes(Image.fromarray((random_rgb(5)[..., 0].astype(np.uint16) * 257))),
        "__MACOSX/basophil/._BA_1.jpg": b"\0\5\26\7",
        "augmented_backup/BA_999.jpg": jpeg.getvalue(),
        "README.txt": "Blood cell images, five classes.\n".encode(),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    cmyk = io.BytesIO()
    Image.fromarray(random_rgb(6)).convert("CMYK").save(cmyk, "JPEG")
    (root / "myeloblast" / "cmyk.jpg").write_bytes(cmyk.getvalue())
    before = snapshot(requested)
    report = check_dataset(requested, progress=False)
    return requested, root, before, report


def test_finds_the_class_folders_two_levels_down(messy):
    requested, root, _, report = messy
    assert find_data_root(requested) == root
    assert report.root == root and report.requested == requested
    summary = report.summary()
    assert str(root) in summary and "found below" in summary
    assert report.class_folders["seg_neutrophil"] == ["Segmented Neutrophils"]


def test_every_problem_is_named_and_nothing_crashes(messy):
    _, _, _, report = messy
    kinds = {p.path: p.kind for p in report.problems}
    expected = {
        "basophil/corrupt.png": "corrupt",
        "basophil/truncated.jpg": "corrupt",
        "basophil/empty.jpg": "empty",
        "basophil/notes.jpg": "not_image",
        "basophil/.DS_Store": "hidden",
        "monocyte/Thumbs.db": "hidden",
        "myeloblast/._MYO_1.jpg": "hidden",
        "__MACOSX": "hidden",
        "Segmented Neutrophils/bomb.png": "too_large",
        "augmented_backup": "stray_folder",
        "README.txt": "stray_file",
        "synth_manifest.csv": "stray_file",
        "erythroblast/gray.png": "converted",
        "erythroblast/rgba.png": "converted",
        "monocyte/palette.png": "converted",
        "monocyte/deep16.png": "converted",
        "myeloblast/cmyk.jpg": "converted",
    }
    assert {k: kinds.get(k) for k in expected} == expected
    assert sorted(report.ignored) == ["README.txt", "augmented_backup", "synth_manifest.csv"]
    assert "truncated" in next(p.message for p in report.problems if p.path == "basophil/truncated.jpg")
    summary = report.summary()
    for path in expected:
        assert path in summary


def test_counts_modes_and_sizes(messy):
    _, root, _, report = messy
    assert list(report.counts) == list(CLASSES)
    assert report.counts == {"basophil": 12, "erythroblast": 14, "monocyte": 14, "myeloblast": 13, "seg_neutrophil": 12}
    modes = {r.path: r.mode for r in report.records}
    assert modes["erythroblast/gray.png"] == "L"
    assert modes["erythroblast/rgba.png"] == "RGBA"
    assert modes["monocyte/palette.png"] == "P"
    assert modes["monocyte/deep16.png"].startswith("I")
    assert modes["myeloblast/cmyk.jpg"] == "CMYK"
    assert report.size_stats["sizes"] == {"48x48": 61, "40x40": 4}
    assert report.size_stats["width"] == {"min": 40, "median": 48.0, "max": 48}
    # 30 synthetic cells with 1 copy each, and gray.png: a basophil turned and stripped of colour.
    assert len({r.group for r in report.records}) == len(report.records) - 31
    groups = {r.path: r.group for r in report.records}
    base = next((root / "basophil").glob("BA_*.jpg")).relative_to(root).as_posix()  # the fixture's choice
    assert groups["erythroblast/gray.png"] == groups[base]
    assert all(r.group.startswith("g") for r in report.records)


@pytest.mark.slow  # a CLI subprocess
def test_the_dataset_folder_is_left_byte_identical(messy, tmp_path):
    requested, root, before, report = messy
    report.save_json(tmp_path / "report.json")
    result = subprocess.run(
        [sys.executable, "-m", "bloodcell_lib", "check-data", str(requested), "--json", str(tmp_path / "cli.json"),
         "--quiet"], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Dataset root:" in result.stdout
    assert snapshot(requested) == before
    saved = json.loads((tmp_path / "cli.json").read_text(encoding="utf-8"))
    assert saved["root"] == str(root) and saved["counts"] == report.counts
    assert len(saved["records"]) == len(report.records)


def test_save_json_refuses_the_dataset_folder(messy):
    requested, root, before, report = messy
    with pytest.raises(DatasetError, match="inside the dataset folder"):
        report.save_json(root / "basophil" / "report.json")
    assert snapshot(requested) == before


def test_to_frame_has_the_contract_columns(messy):
    _, root, _, report = messy
    frame = report.to_frame()
    assert list(frame.columns) == ["path", "label", "group", "sha256", "width", "height"]
    assert len(frame) == sum(report.counts.values())
    assert frame.attrs["data_root"] == str(root)
    assert all((root / p).is_file() for p in frame["path"])


@pytest.fixture
def tiny(tiny_set_copy):
    return tiny_set_copy


@pytest.mark.slow  # a CLI subprocess
def test_missing_class_is_an_error_with_exit_code_2(tiny):
    shutil.rmtree(tiny / "monocyte")
    with pytest.raises(MissingClassError, match="monocyte") as info:
        check_dataset(tiny, progress=False)
    assert str(tiny) in str(info.value)
    result = subprocess.run([sys.executable, "-m", "bloodcell_lib", "check-data", str(tiny), "--quiet"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "monocyte" in result.stderr and "Traceback" not in result.stderr


def test_class_with_only_unreadable_files_is_missing(tiny):
    for f in (tiny / "myeloblast").iterdir():
        f.write_bytes(b"")
    with pytest.raises(MissingClassError, match="myeloblast.*no readable image"):
        check_dataset(tiny, progress=False)


def test_no_class_folders_says_what_was_looked_for(tmp_path):
    (tmp_path / "photos" / "holiday").mkdir(parents=True)
    with pytest.raises(DatasetError, match="basophil") as info:
        find_data_root(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(DatasetError, match="does not exist"):
        check_dataset(tmp_path / "nowhere", progress=False)


def test_exact_and_turned_copies_share_a_group_and_mixed_labels_are_flagged(tiny):
    originals = sorted((tiny / "basophil").glob("*.jpg"))
    shutil.copyfile(originals[0], tiny / "basophil" / "copy of first.jpg")
    turned = Image.open(originals[1]).transpose(Image.Transpose.ROTATE_90).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    turned.save(tiny / "monocyte" / "stray basophil.png")
    report = check_dataset(tiny, progress=False)
    by_path = {r.path: r for r in report.records}
    first, copy = by_path[originals[0].relative_to(tiny).as_posix()], by_path["basophil/copy of first.jpg"]
    assert first.sha256 == copy.sha256 and first.group == copy.group
    assert report.exact_duplicates == 1
    moved = by_path["monocyte/stray basophil.png"]
    assert moved.group == by_path[originals[1].relative_to(tiny).as_posix()].group
    conflicts = [p for p in report.problems if p.kind == "label_conflict"]
    assert len(conflicts) == 1 and "monocyte/stray basophil.png" in conflicts[0].message


def test_images_over_the_pixel_limit_are_refused(tiny, monkeypatch):
    Image.fromarray(random_rgb(9, size=64)).save(tiny / "erythroblast" / "large.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 50 * 50)
    report = check_dataset(tiny, progress=False)
    refused = [p for p in report.problems if p.kind == "too_large"]
    assert [p.path for p in refused] == ["erythroblast/large.png"]
    assert "decompression bomb" in refused[0].message
    assert report.counts["erythroblast"] == 12


@pytest.fixture(scope="module")
def acceptance_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "accept"
    synthetic.make_synthetic_dataset(out, per_class=30, size=96, duplicates=2, seed=0)
    return out


@pytest.mark.slow  # ~4 s: the acceptance set, checked end to end
def test_synthetic_copies_are_found_and_distinct_cells_stay_apart(acceptance_set, capsys):
    report = check_dataset(acceptance_set, progress=True)
    assert "Checking images" in capsys.readouterr().err  # 450 files: a progress bar on stderr
    assert report.counts == {c: 90 for c in CLASSES}
    assert all(abs(n - 30) <= 2 for n in report.groups_per_class.values()), report.groups_per_class
    manifest = synthetic.load_manifest(acceptance_set).set_index("file")
    frame = report.to_frame()
    truth = manifest.loc[frame["path"], "cell_id"].to_numpy()
    assert adjusted_rand_score(truth, frame["group"]) >= 0.97
    assert not [p for p in report.problems if p.kind == "label_conflict"]
    assert [p.path for p in report.problems] == ["synth_manifest.csv"]


def test_quiet_scan_prints_no_progress(acceptance_set, capsys):
    check_dataset(acceptance_set, progress=False)
    assert "Checking images" not in capsys.readouterr().err
