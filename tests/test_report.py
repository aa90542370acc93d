"""The HTML comparison report: one self-contained page written from a results folder built by hand."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from html.parser import HTMLParser
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bloodcell_lib.atomic import TEMP_MARK, write_json
from bloodcell_lib.classes import CLASSES
from bloodcell_lib.compare import BASELINE_RUN, compare_results
from bloodcell_lib.errors import OutputError
from bloodcell_lib.results import PROB_COLUMNS
from bloodcell_lib.metrics import compute_metrics
from bloodcell_lib.report import (PURPOSE, PURPOSE_MIXED, PURPOSE_SCRATCH, REPORT_FILE, TEMPLATE, cell_text, purpose,
                                  settings_tables, write_comparison_report)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VOID = {"meta", "img", "br", "hr", "link", "input", "source", "col", "wbr"}
CELLS = np.arange(100) // 2  # 100 test images: 50 cells with two copies each
VERSIONS = {"python": "3.11.9", "numpy": "1.26.4", "tensorflow": "2.16.1", "keras": "3.3.3"}


def _config(arch, **changes):
    return {"arch": arch, "profile": "smoke", "epochs": 2, "seed": 42, "bootstrap": 200, "image_size": 32,
            "extra": {"notes": ["synthetic stand-in"]}, **changes}


def _write_run(folder: Path, run, arch, y_true, pred, display_name=None, split_by="group", sha="a" * 64,
               **extra):
    """Write <run>_predictions.csv and <run>_results.json the way evaluation does (fields compare reads)."""
    n = len(y_true)
    proba = np.full((n, len(CLASSES)), 0.05)
    proba[np.arange(n), pred] = 0.8
    frame = pd.DataFrame({"path": [f"{CLASSES[y]}/img_{i:03d}.jpg" for i, y in enumerate(y_true)],
                          "true_label": [CLASSES[y] for y in y_true], "pred_label": [CLASSES[p] for p in pred]})
    for k, col in enumerate(PROB_COLUMNS):
        frame[col] = proba[:, k]
    frame["group"] = [f"g{g}" for g in CELLS]
    frame.to_csv(folder / f"{run}_predictions.csv", index=False)
    results = {"architecture": arch, "display_name": display_name or arch.upper(), "run": run, "weights": None,
               "image_size": 32, "split": {"split_by": split_by, "sha256": sha},
               "predictions_file": f"{run}_predictions.csv", "created": "2026-01-02T03:04:05+00:00",
               "metrics": compute_metrics(y_true, proba, groups=CELLS, n_boot=50, seed=0), **extra}
    write_json(folder / f"{run}_results.json", results)


def _png(colour=(200, 30, 30)) -> bytes:
    buf = BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def results_dir(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 20)
    good = np.where(rng.random(100) < 0.9, y, (y + 1) % 5)
    poor = np.where(rng.random(100) < 0.5, y, (y + 2) % 5)
    _write_run(tmp_path, "vgg16", "vgg16", y, good, display_name="VGG16", config=_config("vgg16"),
               versions=VERSIONS, cost={"params_total": 1000, "flops_per_image": 2e6, "latency_ms_batch1_median": 1.5})
    # No cost block and no Grad-CAM numbers: those cells must print "—", never "nan".
    _write_run(tmp_path, "resnet50", "resnet50", y, poor, display_name="ResNet50",
               config=_config("resnet50", image_size=64), versions={**VERSIONS, "keras": "3.4.0"})
    _write_run(tmp_path, BASELINE_RUN, BASELINE_RUN, y, np.full(100, 3), display_name="Colour-only baseline",
               versions={"python": "3.11.9", "opencv": "4.9.0"})
    _write_run(tmp_path, "vgg16_imagesplit", "vgg16", y, y, display_name="VGG16", split_by="image", sha="c" * 64,
               config=_config("vgg16", split_by="image"), versions=VERSIONS)
    (tmp_path / "vgg16_confusion_normalised.png").write_bytes(_png())
    (tmp_path / "vgg16_gradcam.png").write_bytes(_png((30, 30, 200)))
    return tmp_path


class _Page(HTMLParser):
    """Collects tags, attributes and text, and checks that every non-void element is closed in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str, str | None]] = []
        self.text: list[str] = []
        self.open: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v) for k, v in attrs]
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if not self.open or self.open.pop() != tag:
            self.errors.append(f"</{tag}> closes nothing open")

    def handle_data(self, data):
        self.text.append(data)

    @property
    def plain(self) -> str:
        return re.sub(r"\s+", " ", " ".join(self.text))


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert not page.errors and not page.open, (page.errors, page.open)
    return page


def test_report_is_one_self_contained_page_with_table_figures_and_conclusion(results_dir):
    comparison = compare_results(results_dir, expected=[])
    before = set(results_dir.iterdir())
    path = write_comparison_report(results_dir, comparison)

    assert path == results_dir / REPORT_FILE and path.is_file()
    assert set(results_dir.iterdir()) == before | {path}  # written atomically: no temporary file left
    assert not list(results_dir.glob(f"*{TEMP_MARK}*"))
    text = path.read_text(encoding="utf-8")
    page = _parse(path)
    assert {"html", "head", "style", "body", "table", "img"} <= set(page.tags)
    # Nothing to fetch: no URL, no external style sheet, script or font.
    assert "http://" not in text and "https://" not in text
    assert not {"link", "script", "iframe", "object"} & set(page.tags)
    sources = [v for tag, k, v in page.attrs if k in ("src", "href")]
    assert sources and all(v.startswith("data:image/png;base64,") for v in sources)
    images = [base64.b64decode(v.split(",", 1)[1], validate=True) for v in sources]
    assert all(img.startswith(PNG_MAGIC) for img in images)
    # The two metric bars, the two cost scatters (vgg16 has cost numbers) and vgg16's two PNGs from disk.
    assert len(images) == 6
    assert _png() in images and _png((30, 30, 200)) in images

    for name in ("VGG16", "ResNet50", "Colour-only baseline", "VGG16 (image-level split, leaks)"):
        assert name in page.plain
    assert comparison.conclusion() in page.plain
    assert "Missing or partial none" in page.plain  # the empty list says so
    assert "—" in page.plain and not re.search(r"\bnan\b", text, re.IGNORECASE)
    assert "Paired macro-F1 tests" in page.plain and "Holm p" in page.plain
    assert "inflation (image − group)" in page.plain  # the leakage table


def test_report_shows_shared_settings_the_differences_and_versions(results_dir):
    path = write_comparison_report(results_dir, compare_results(results_dir, expected=[]))
    rows = _table_rows(path.read_text(encoding="utf-8"))
    assert ["seed", "42"] in rows and ["profile", "smoke"] in rows and ["extra.notes", '["synthetic stand-in"]'] in rows
    # Settings that differ get one column per run that records a configuration (the baseline has none).
    assert ["setting", "vgg16", "vgg16_imagesplit", "resnet50"] in rows  # in the table's order
    assert ["arch", "vgg16", "vgg16", "resnet50"] in rows and ["image_size", "32", "32", "64"] in rows
    assert ["split_by", "—", "image", "—"] in rows
    assert ["numpy", "1.26.4"] in rows and ["opencv", "4.9.0"] in rows  # agreed on by every run recording them
    assert ["library", "vgg16", "vgg16_imagesplit", "resnet50", BASELINE_RUN] in rows
    assert ["keras", "3.3.3", "3.3.3", "3.4.0", "—"] in rows


def _table_rows(html: str) -> list[list[str]]:
    """The text of every table row's cells, in page order."""
    rows, row, cell = [], None, None

    class Rows(HTMLParser):
        def handle_starttag(self, tag, attrs):
            nonlocal row, cell
            if tag == "tr":
                row = []
            elif tag in ("td", "th"):
                cell = []

        def handle_endtag(self, tag):
            nonlocal row, cell
            if tag in ("td", "th") and row is not None:
                row.append("".join(cell).strip())
                cell = None
            elif tag == "tr" and row is not None:
                rows.append(row)
                row = None

        def handle_data(self, data):
            if cell is not None:
                cell.append(data)

    parser = Rows(convert_charrefs=True)
    parser.feed(html)
    return rows


def test_missing_models_and_problems_are_listed(results_dir):
    (results_dir / "xception_results.json").write_text("{not json", encoding="utf-8")
    page = _parse(write_comparison_report(results_dir, compare_results(results_dir, expected=["vgg16", "densenet201"])))
    assert "densenet201 (no results file)" in page.plain
    assert "xception_results.json: unreadable or incomplete" in page.plain
    assert "Missing or partial none" not in page.plain


def test_names_from_results_files_are_escaped(results_dir):
    y = np.repeat(np.arange(5), 20)
    _write_run(results_dir, "xception", "xception", y, y, display_name="<script>alert(1)</script>")
    path = write_comparison_report(results_dir, compare_results(results_dir, expected=[]))
    page = _parse(path)
    assert "script" not in page.tags
    assert "<script>alert(1)</script>" in page.plain  # shown as text
    assert "&lt;script&gt;" in path.read_text(encoding="utf-8")


def test_a_folder_without_results_gives_a_report_that_says_so(tmp_path):
    path = write_comparison_report(tmp_path, compare_results(tmp_path, expected=["vgg16"]))
    page = _parse(path)
    assert "No model results in this folder yet" in page.plain
    assert "No trained model was found" in page.plain
    assert "vgg16 (no results file)" in page.plain
    assert "img" not in page.tags and not re.search(r"\bnan\b", path.read_text(encoding="utf-8"), re.IGNORECASE)


def test_a_folder_that_does_not_exist_is_our_error_and_nothing_is_created(tmp_path):
    missing = tmp_path / "no such folder"
    with pytest.raises(OutputError, match="is not a folder"):
        write_comparison_report(missing)
    assert not missing.exists()


def test_rewriting_replaces_the_report(results_dir):
    comparison = compare_results(results_dir, expected=[])
    path = write_comparison_report(results_dir, comparison)
    path.write_text("stale", encoding="utf-8")
    assert write_comparison_report(results_dir, comparison).read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_study_write_report_prints_the_path(results_dir, capsys):
    from bloodcell_lib import study

    path = study.write_report(results_dir, compare_results(results_dir, expected=[]))
    assert path == results_dir / REPORT_FILE and path.is_file()
    assert str(path.resolve()) in capsys.readouterr().out


def test_numbers_print_as_in_the_markdown_table():
    assert [cell_text(v) for v in (None, float("nan"), np.float64(np.inf), pd.NA, 0.12345, np.int64(3), True)] == [
        "—", "—", "—", "—", "0.123", "3", "True"]


def test_the_opening_line_says_pretrained_only_when_the_networks_were(results_dir):
    # The demo offline trains from random initialisation: "ImageNet-pretrained, fine-tuned" would be untrue there.
    table = compare_results(results_dir, expected=[]).table
    assert purpose(table) == PURPOSE_SCRATCH  # every network None; the baseline and ensemble do not count
    assert PURPOSE_SCRATCH.split(" — ")[0] in _parse(write_comparison_report(results_dir)).plain
    table.loc[table["run"] == "vgg16", "weights"] = "imagenet"
    assert purpose(table) == PURPOSE_MIXED
    table.loc[table["run"] != BASELINE_RUN, "weights"] = "imagenet"
    assert purpose(table) == PURPOSE and "ImageNet-pretrained" in PURPOSE


def test_a_setting_some_runs_do_not_record_differs_in_configurations_but_not_in_versions():
    per_run = {"a": {"x": 1, "y": 2}, "b": {"x": 1}, "baseline": None}
    shared, differ = settings_tables(per_run)
    assert shared.rows == [["x", "1"]] and differ.columns == ["setting", "a", "b"] and differ.rows == [["y", "2", "—"]]
    shared, differ = settings_tables(per_run, label="library", unrecorded_differs=False)
    assert shared.rows == [["x", "1"], ["y", "2"]] and differ.empty


def test_the_template_ships_as_package_data():
    """A non-editable install has the template only when pyproject.toml lists it as package data."""
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    setuptools = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    shipped = {path for package, globs in setuptools["package-data"].items() if package in setuptools["packages"]
               for g in globs for path in (root / package.replace(".", "/")).glob(g)}
    assert root / "bloodcell_lib" / "templates" / TEMPLATE in shipped


def test_the_shortcut_test_calibration_and_tta_are_shown_with_how_to_read_them(results_dir):
    from bloodcell_lib.compare import READ_CALIBRATION, READ_SHORTCUT, READ_TTA

    y = np.repeat(np.arange(5), 20)
    entry = lambda acc, ci: {"accuracy": acc, "accuracy_ci": ci, "macro_f1": acc, "macro_f1_ci": ci}  # noqa: E731
    scores = {"ece": 0.1, "classwise_ece": 0.05, "brier": 0.3, "log_loss": 0.5, "accuracy": 0.9}
    _write_run(results_dir, "xception", "xception", y, y, display_name="Xception",
               shortcut_test={"original": entry(1.0, [1.0, 1.0]), "background_only": entry(0.8, [0.7, 0.9]),
                              "cell_only": entry(0.4, [0.3, 0.5]), "chance": 0.2, "margin": 0.1},
               calibration={"temperature": 1.7, "before": scores, "after": {**scores, "ece": 0.02},
                            "change": {"ece": {"delta": -0.08, "ci": [-0.1, -0.05]}}},
               tta={"enabled": True, "macro_f1": 0.97, "macro_f1_ci": [0.9, 1.0], "accuracy": 0.97,
                    "accuracy_ci": [0.9, 1.0], "macro_f1_delta": -0.03, "macro_f1_delta_ci": [-0.06, 0.0],
                    "macro_f1_delta_p": 0.2})
    (results_dir / "xception_reliability.png").write_bytes(_png((30, 200, 30)))
    page = _parse(write_comparison_report(results_dir, compare_results(results_dir, expected=[])))
    for note in (READ_SHORTCUT, READ_CALIBRATION, READ_TTA):
        assert re.sub(r"\s+", " ", note) in page.plain
    rows = _table_rows((results_dir / REPORT_FILE).read_text(encoding="utf-8"))
    assert ["Xception", "1.000 [1.000, 1.000]", "0.800 [0.700, 0.900]", "0.400 [0.300, 0.500]", "0.200",
            "YES"] in rows
    assert any(row[:2] == ["Xception", "1.70"] and row[3:5] == ["0.020", "-0.080 [-0.100, -0.050]"] for row in rows)
    assert "Far above chance with the cell masked out" in page.plain
    assert "reliability before and after temperature scaling" in page.plain


# Added to a copy of the report (the report itself holds no script): after loading, the page records how many
# images it has, how many failed to decode, and how many elements point outside the file.
_BROWSER_CHECK = (
    "<script>window.addEventListener('load', () => { const imgs = [...document.images];"
    " const broken = imgs.filter(i => !i.complete || i.naturalWidth === 0).length;"
    " const external = [...document.querySelectorAll('[src],[href]')].filter(e => /^(https?:)?\\/\\//.test("
    "e.getAttribute('src') || e.getAttribute('href'))).length;"
    " document.body.setAttribute('data-check', `images=${imgs.length} broken=${broken} external=${external}`); });"
    "</script>")


@pytest.mark.slow  # starts a browser
def test_the_report_loads_in_a_real_browser_with_every_figure_and_nothing_external(results_dir, tmp_path):
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)),
                   None)
    if browser is None:
        pytest.skip("no Chromium or Chrome on this machine")
    page = tmp_path / "checked.html"
    page.write_text(write_comparison_report(results_dir).read_text(encoding="utf-8").replace(
        "</body>", _BROWSER_CHECK + "</body>"), encoding="utf-8")
    run = subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=180)
    found = re.search(r'data-check="images=(\d+) broken=(\d+) external=(\d+)"', run.stdout)
    assert found, run.stderr[-2000:]
    assert found.groups() == ("6", "0", "0")  # the two metric bars, the two cost scatters, vgg16's two PNGs
