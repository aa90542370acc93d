"""How much a random image-level split inflates the scores: one architecture trained and evaluated on one.

The Kaggle set holds augmented copies of fewer cells, so an image-level split puts copies of test cells into
training. This trains the architecture again on the study's images split by image, not by duplicate group; the
comparison sets its accuracy beside the group split's as the leakage delta (`run_all.py --leakage ARCH`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bloodcell_lib.config import resolve
from bloodcell_lib.evaluation import evaluate
from bloodcell_lib.model import imagenet_available
from bloodcell_lib.registry import get_arch
from bloodcell_lib.split import SPLIT_FILE, load_split, resolve_split
from bloodcell_lib.training import train_from_config

# The image-split model's own folder inside the study's output folder: it must not meet the study's split there.
LEAKAGE_FOLDER = "leakage"


def measure_leakage(output_dir: str | Path, arch: str, profile: str = "demo", epochs: int | None = None) -> dict[str, Any]:
    """Train and evaluate `arch` on an image-level split of the study's data in output_dir; return the results.

    The model lives in `<output>/leakage/`; its results land beside the study's as `<arch>_imagesplit_*`, where the
    comparison turns them into the leakage delta. Data, seed and output come from the study's split.
    """
    output_dir = Path(output_dir)
    study_split = load_split(output_dir / SPLIT_FILE)
    cfg = resolve(profile, spec=get_arch(arch), imagenet_reachable=imagenet_available,
                  data_dir=study_split.attrs["data_root"], epochs=epochs, output_dir=str(output_dir / LEAKAGE_FOLDER),
                  split_by="image", seed=study_split.attrs.get("seed"))
    split, split_path = resolve_split(cfg, verbose=1)
    result = train_from_config(cfg.replace(split_path=str(split_path)))
    return evaluate(result.model, split, "test", output_dir, history=result.history, config=cfg.to_dict(),
                    model_path=result.model_path, weights_used=result.weights_used, gradcam_images=0,
                    n_boot=cfg.bootstrap, seed=cfg.seed, cost_repeats=cfg.cost_repeats)
