"""One run's parameters (RunConfig), the profiles that preset them, and resolve(): where they are put together.

Every entry point — a notebook's Parameters cell (study.configure), the CLI's `train` (and `evaluate` and `baseline`
through profile_config), run_all.py — hands what the user gave to resolve(), which takes each value from the first
of these that has one:

1. an explicit argument: a notebook parameter, a command-line flag. None means unset, and so does "auto" for the
   profile and the output folder;
2. the environment, which only fills what was left unset: BLOODCELL_PROFILE (an explicit PROFILE or --profile
   beats it, and the note says so) and BLOODCELL_OUTPUT (nbval points it at a temporary folder);
3. the profile's preset (PROFILES: paper, demo, smoke);
4. RunConfig's defaults. (The notebooks' output folder "auto", without BLOODCELL_OUTPUT, is the repository's
   Saved Models, found from where the package is, wherever the kernel started: repository_output_dir.)

Then come the rules that depend on the network and the machine: a preset image size below the network's minimum is
raised to it, an explicit size the network cannot take is refused (check_image_size, the one image-size rule); where
a synthetic stand-in is allowed, no dataset means the demo on one; in the demo, unreachable ImageNet weights mean
random initialisation. The RunConfig that comes back is frozen; its `notes` say what was chosen and why, its
`sources` where every value came from (parameter, environment, profile, a rule, default), and settings() lists every
setting that changes the result, grouped, with its source.

Weights decide the training recipe (recipe "auto"): pretrained weights are fine-tuned in two phases (the head on the
frozen base, then the top layers); with weights None every layer trains from the first epoch, in one phase at
scratch_learning_rate.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from bloodcell_lib.errors import ConfigError

if TYPE_CHECKING:  # only for annotations: the registry loads Keras, and a configuration reads two sizes of an entry
    from bloodcell_lib.registry import ArchSpec

PROFILE_ENV = "BLOODCELL_PROFILE"
OUTPUT_ENV = "BLOODCELL_OUTPUT"  # where notebooks write when OUTPUT_DIR is "auto" (nbval uses a temp folder)
AUTO = "auto"  # an unset profile or output folder: the environment, else the default
# The defaults every step falls back to, so a function called without a RunConfig (the baseline, a library
# user's evaluate) resamples like a run that has one: one seed and one bootstrap size for the whole study.
DEFAULT_SEED = 42
DEFAULT_BOOTSTRAP = 1000
DEFAULT_OUTPUT = "Saved Models"
# The notebooks' default output folder: "auto" → the repository's Saved Models (repository_output_dir), wherever the
# kernel starts (Colab starts it in /content, where "../Saved Models" would be /Saved Models).
NOTEBOOK_OUTPUT = AUTO
# The synthetic stand-in's folder inside the output folder, where a run without a dataset may use one.
SYNTHETIC_FOLDER = "synthetic_data"
IMAGENET = "imagenet"
# Training recipes: pretrained weights → fine-tune in two phases; random initialisation → every layer from epoch 1.
FINE_TUNE, SCRATCH = "fine-tune", "scratch"
RECIPES = (AUTO, FINE_TUNE, SCRATCH)
# Largest input side, as a multiple of the native one: activations grow with the square of the side, so at twice
# the native size a batch of 32 already fills a 16 GB GPU, and a blood-cell crop holds no more detail to find.
MAX_SIZE_FACTOR = 2
# The source of a value one of resolve()'s rules chose (its note says why).
RULE = "resolve (see NOTE)"


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, carried from a notebook, the CLI or run_all.py to every step; made by resolve()."""

    arch: str = "efficientnetb3"
    data_dir: str | None = None
    split_path: str | None = None
    output_dir: str = DEFAULT_OUTPUT
    profile: str = "paper"
    epochs: int = 20  # total budget over both phases; early stopping may use fewer
    head_epochs: int | None = None  # phase-1 share of `epochs` when fine-tuning; None → half, rounded up
    # "auto" → "fine-tune" with pretrained weights, "scratch" with weights None (see training_recipe)
    recipe: str = AUTO
    image_size: int | str = "native"  # "native" or a side length in pixels
    batch_size: int = 32
    weights: str | None = IMAGENET  # "imagenet", None, or a path to a weights file
    seed: int = DEFAULT_SEED
    dropout: float = 0.3
    hidden_units: int = 0  # 0 → no hidden dense block in the head
    head_lr: float = 1e-3
    finetune_lr: float = 5e-5
    scratch_learning_rate: float = 1e-3  # Adam's usual rate for a network trained end to end from random weights
    # From scratch, BatchNormalization's momentum (the share of the moving statistics kept per step); None → the
    # network's own (Keras: 0.99). At 0.99 the statistics inference uses lag ~100 steps behind the weights, so a
    # short run validates on stale ones (ResNet50: 0.85 training, 0.32 validation accuracy after 5 epochs).
    scratch_bn_momentum: float | None = None
    unfreeze_layers: int | None = None  # None → the registry's default for the architecture
    class_weights: bool = False
    patience: int = 4
    # ReduceLROnPlateau: multiply the rate by this after lr_patience epochs without improvement (None → half of
    # `patience`, at least 1), never below min_lr.
    lr_factor: float = 0.2
    lr_patience: int | None = None
    min_lr: float = 1e-7
    # Training augmentation (besides all 8 orientations): brightness shifted by up to ± this fraction of 255,
    # contrast scaled by a factor in 1 ± augment_contrast.
    augment_brightness: float = 0.1
    augment_contrast: float = 0.1
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_by: str = "group"
    # Grouped cross-validation (crossval.py): this run is fold `fold` of `folds` (test = that fold's cells, val
    # carved from the rest); None → the single hold-out split. The seed makes the folds.
    folds: int | None = None
    fold: int | None = None
    # Learning curve (learning_curve.py): train on this share of the study split's training cells (whole duplicate
    # groups, stratified by class); val and test stay the study's.
    train_fraction: float = 1.0
    # A learning-curve point (also at train_fraction 1.0, e.g. the from-scratch ablation of a pretrained study):
    # the run gets its own folder learning_curve/<init>-frac<f> and trains on the study's split.
    curve_point: bool = False
    # The study's output folder when this run writes into a folder of its own inside it (a fold, a learning-curve
    # point); None → output_dir is the study's folder. The study's split, synthetic set and image cache live there.
    study_dir: str | None = None
    cache: str = "memory"  # "memory", "none", or a file path prefix for tf.data's file cache
    run_eagerly: bool = False
    # Synthetic stand-in used when no dataset is given (demo and smoke profiles).
    synth_per_class: int = 60
    synth_size: int = 128
    synth_duplicates: int = 2
    synth_shortcut: bool = False
    # The stand-in's generator seed: fixed, not the run's seed, so runs with other seeds (--seeds) share one dataset.
    synth_seed: int = DEFAULT_SEED
    gradcam_images: int = 50
    # Test-time augmentation at evaluation (mean over the 8 rotations/flips); None: per profile (paper on).
    tta: bool | None = None
    bootstrap: int = DEFAULT_BOOTSTRAP  # group-bootstrap resamples behind every interval
    cost_repeats: int = 20  # timed calls for the latency median
    # (parameter, where its value came from or why resolve() changed it), in the order decided; replace() keeps them.
    notes: tuple[tuple[str, str], ...] = ()
    # (parameter, source) for every field resolve() set: "parameter", "environment (...)", "profile <name>",
    # "default", or "resolve (see NOTE)" when a rule chose the value; source() reads it.
    sources: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        # Frozen: the values are normalised once, here, and never change afterwards.
        if isinstance(self.weights, str) and self.weights.casefold() in ("none", "null", ""):
            object.__setattr__(self, "weights", None)
        object.__setattr__(self, "image_size", parse_image_size(self.image_size))
        object.__setattr__(self, "notes", tuple((str(name), str(why)) for name, why in self.notes))
        object.__setattr__(self, "sources", tuple((str(name), str(src)) for name, src in self.sources))
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}.")
        if self.recipe not in RECIPES:
            raise ConfigError(f"recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}.")
        if self.scratch_bn_momentum is not None and not 0.0 <= self.scratch_bn_momentum < 1.0:
            raise ConfigError(f"scratch_bn_momentum must lie in [0, 1) (or None), got {self.scratch_bn_momentum}.")
        if not 0.0 < self.lr_factor < 1.0:
            raise ConfigError(f"lr_factor must lie between 0 and 1 (it multiplies the rate), got {self.lr_factor}.")
        if self.lr_patience is not None and self.lr_patience < 1:
            raise ConfigError(f"lr_patience must be at least 1 (or None), got {self.lr_patience}.")
        if not 0.0 <= self.augment_brightness <= 1.0:
            raise ConfigError(f"augment_brightness is a fraction of 255 in [0, 1], got {self.augment_brightness}.")
        if not 0.0 <= self.augment_contrast < 1.0:
            raise ConfigError(f"augment_contrast must be in [0, 1) (factor 1 ± it), got {self.augment_contrast}.")
        if (self.folds is None) != (self.fold is None):
            raise ConfigError(f"fold and folds go together (fold k of folds K), got fold={self.fold}, "
                              f"folds={self.folds}.")
        if self.folds is not None and not (self.folds >= 2 and 1 <= self.fold <= self.folds):
            raise ConfigError(f"Cross-validation needs folds ≥ 2 and 1 ≤ fold ≤ folds, got fold={self.fold}, "
                              f"folds={self.folds}.")
        if not 0.0 < self.train_fraction <= 1.0:
            raise ConfigError(f"train_fraction is a share of the training cells in (0, 1], got {self.train_fraction}.")
        if self.folds is not None and (self.train_fraction != 1.0 or self.curve_point):
            raise ConfigError("A run is either a cross-validation fold or a learning-curve point, not both: give "
                              "folds/fold or train_fraction.")
        if self.split_by not in ("group", "image"):
            raise ConfigError(f"split_by must be 'group' or 'image', got {self.split_by!r}.")

    @property
    def training_recipe(self) -> str:
        """Return "fine-tune" (pretrained weights: head, then top layers) or "scratch" (every layer from epoch 1)."""
        if self.recipe != AUTO:
            return self.recipe
        return SCRATCH if self.weights is None else FINE_TUNE

    @property
    def recipe_label(self) -> str:
        """Which recipe runs, as results and summaries say it: "fine-tune (2 phases)", "from scratch (1 phase)"."""
        if self.training_recipe == SCRATCH:
            return "from scratch (1 phase)"
        return "fine-tune (2 phases)" if self.phase_epochs[1] else "fine-tune (head only, 1 phase)"

    @property
    def phase_learning_rates(self) -> tuple[float, float]:
        """Return the (phase-1, phase-2) learning rates of the recipe (from scratch there is no phase 2)."""
        if self.training_recipe == SCRATCH:
            return self.scratch_learning_rate, self.scratch_learning_rate
        return self.head_lr, self.finetune_lr

    @property
    def reduce_lr_patience(self) -> int:
        """ReduceLROnPlateau's patience: lr_patience, else half of EarlyStopping's, at least 1."""
        return self.lr_patience if self.lr_patience is not None else max(1, self.patience // 2)

    @property
    def contrast_range(self) -> tuple[float, float]:
        """The augmentation's contrast factor range, 1 ± augment_contrast."""
        return 1.0 - self.augment_contrast, 1.0 + self.augment_contrast

    @property
    def phase_epochs(self) -> tuple[int, int]:
        """Return (phase-1 epochs, phase-2 epochs); their sum is `epochs`. From scratch, phase 1 is the whole run."""
        if self.training_recipe == SCRATCH:
            return self.epochs, 0
        head = self.head_epochs if self.head_epochs is not None else (self.epochs + 1) // 2
        head = max(1, min(head, self.epochs))
        return head, self.epochs - head

    @property
    def output_path(self) -> Path:
        """Return the output folder as a Path: where this run writes its model, results and figures."""
        return Path(self.output_dir)

    @property
    def study_path(self) -> Path:
        """Return the study's output folder: the study's split, synthetic set and image cache live there (the output
        folder itself, unless this run is a fold or a learning-curve point with a folder of its own inside it)."""
        return Path(self.study_dir) if self.study_dir else self.output_path

    def why(self, name: str) -> str | None:
        """Return the note about one parameter (where its value came from, or why it was changed), or None."""
        return next((why for key, why in self.notes if key == name), None)

    def source(self, name: str) -> str:
        """Return where a parameter's value came from: parameter, environment, profile, resolve's rule or default."""
        return next((src for key, src in self.sources if key == name), "default")

    def settings(self) -> list[tuple[str, str, Any, str]]:
        """Every setting that changes the result, as (group, name, value, source) rows in SETTING_GROUPS' order;
        the recipe's row holds the recipe that runs."""
        rows = []
        for group, names in SETTING_GROUPS.items():
            for name in names:
                value = getattr(self, name)
                if name == "recipe":
                    value = f"{value} → {self.recipe_label}" if value == AUTO else self.recipe_label
                rows.append((group, name, value, self.source(name)))
        return rows

    def note_lines(self) -> list[str]:
        """The notes as lines to print, "NOTE: image_size 32 → 71: ..." (the profile's source goes with the profile)."""
        return [f"NOTE: {name} {why}" for name, why in self.notes if name != "profile"]

    def to_dict(self) -> dict[str, Any]:
        """Return the configuration as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> "RunConfig":
        """Rebuild a configuration recorded with to_dict() (names this version does not know are dropped);
        overrides that are not None win."""
        values = {k: v for k, v in data.items() if k in _FIELDS}
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"Bad run parameter: {exc}.") from exc

    def replace(self, **changes: Any) -> "RunConfig":
        """Return a copy with some fields changed (unknown names are an error; the checks run again)."""
        _refuse_unknown(changes)
        return dataclasses.replace(self, **changes)


_FIELDS = frozenset(f.name for f in dataclasses.fields(RunConfig))

# The settings that change a run's result, grouped as a summary prints them (describe, RunConfig.settings). Left
# out: notes and sources (about the values), cache and run_eagerly (speed only), output_dir (where, not what).
SETTING_GROUPS: dict[str, tuple[str, ...]] = {
    "data": ("data_dir", "split_path", "split_by", "val_fraction", "test_fraction", "folds", "fold",
             "train_fraction", "curve_point", "image_size",
             "synth_per_class", "synth_size", "synth_duplicates", "synth_shortcut", "synth_seed"),
    "model": ("arch", "weights", "dropout", "hidden_units"),
    "training": ("recipe", "epochs", "head_epochs", "unfreeze_layers", "batch_size", "seed", "class_weights",
                 "patience", "scratch_bn_momentum"),
    "learning rate": ("head_lr", "finetune_lr", "scratch_learning_rate", "lr_factor", "lr_patience", "min_lr"),
    "augmentation": ("augment_brightness", "augment_contrast"),
    "evaluation": ("bootstrap", "gradcam_images", "tta", "cost_repeats"),
}


PROFILES: dict[str, dict[str, Any]] = {
    # The study itself: the real Kaggle folder, ImageNet weights, native input sizes.
    "paper": dict(epochs=20, image_size="native", batch_size=32, weights=IMAGENET, patience=4, gradcam_images=100),
    # No dataset at hand: a synthetic set, small images, a few epochs. Offline it trains from scratch, so the values
    # were measured that way on 2 CPU cores (README, "The demo"): 48 px (Xception: 71) and 40 cells per class keep
    # an epoch short; batch 16 doubles the updates per epoch; BatchNorm momentum 0.9 lets the moving statistics
    # catch up within an epoch (at 0.99 validation collapsed); the rate is cut only when early stopping could
    # also act (lr_patience 1 cut VGG16's at epoch 4 of 8); graph mode (run_eagerly False) costs ResNet50 one
    # trace (~25 CPU s) and then a third of eager's time per step.
    "demo": dict(
        epochs=6, image_size=48, batch_size=16, weights=IMAGENET, patience=3, lr_patience=3,
        scratch_learning_rate=1e-3, scratch_bn_momentum=0.9,
        synth_per_class=40, synth_size=128, synth_duplicates=2, gradcam_images=25, bootstrap=500,
    ),
    # CI: the smallest run that still executes every step.
    "smoke": dict(
        epochs=1, image_size=32, batch_size=16, weights=None, patience=2,
        synth_per_class=8, synth_size=64, synth_duplicates=1, gradcam_images=10, bootstrap=100,
        run_eagerly=True, cost_repeats=3,
    ),
}


def resolve(
    profile: str | None = None,
    *,
    spec: ArchSpec | None = None,
    stand_in: bool = False,
    imagenet_reachable: Callable[[str], bool] | None = None,
    default_output: str = DEFAULT_OUTPUT,
    **params: Any,
) -> RunConfig:
    """Return the run's configuration: given params (None = unset) over the environment over the profile over
    RunConfig's defaults (see the module docstring), with a note for every value chosen on the user's behalf.

    spec: the architecture's registry entry; sets `arch` and decides the image size. stand_in: where a synthetic
    stand-in is allowed (notebooks, run_all.py), no data_dir means the demo profile on the set in the output folder's
    `synthetic_data` (made by the caller); the paper profile still needs the real dataset. imagenet_reachable(arch):
    asked in the demo profile only; False means random initialisation, said loudly. default_output: the output
    folder when neither output_dir nor BLOODCELL_OUTPUT names one ("auto": the repository's Saved Models).
    Every value's source is recorded in `sources` (RunConfig.source).
    """
    given = {k: v for k, v in params.items() if v is not None}
    _refuse_unknown(given)
    given.pop("sources", None)  # recomputed below
    if spec is not None:
        given["arch"] = spec.key
    no_data = not given.get("data_dir")
    name, why = resolve_profile(profile, default="demo" if stand_in and no_data else "paper",
                                default_why="the default without a dataset" if stand_in and no_data else "the default")
    notes = [*given.pop("notes", ()), ("profile", why)]
    values = {**PROFILES[name], **given, "profile": name}
    sources = {key: f"profile {name}" for key in PROFILES[name]}
    sources.update({key: "parameter" for key in given})
    sources["profile"] = (f"environment ({PROFILE_ENV})" if why.startswith("from the environment")
                          else "parameter" if why.startswith("given") else "default")
    values["output_dir"], why = resolve_output_dir(given.get("output_dir"), default_output)
    if why:
        notes.append(("output_dir", why))
        if "environment variable" in why:
            sources["output_dir"] = f"environment ({OUTPUT_ENV})"
        elif not why.startswith("given"):
            sources["output_dir"] = RULE
    if spec is not None:
        size = parse_image_size(values.get("image_size", "native"))
        if "image_size" not in given and isinstance(size, int) and size < spec.min_size:
            notes.append(("image_size", f"{size} → {spec.min_size}: the smallest {spec.display_name} accepts "
                                        f"(the {name} profile's {size} is below it)"))
            size = spec.min_size
            sources["image_size"] = RULE
        check_image_size(spec, size)  # an explicit size the network cannot take is refused here, before any work
        values["image_size"] = size
    if stand_in and no_data:
        if name == "paper":
            raise ConfigError("The paper profile trains on the real dataset: pass --data-dir (DATA_DIR) with the "
                              "Kaggle folder, or choose the demo profile (a synthetic stand-in).")
        values["data_dir"] = str(Path(values["output_dir"]) / SYNTHETIC_FOLDER)
        sources["data_dir"] = RULE
        notes.append(("data_dir", f"→ {values['data_dir']}: no dataset given, so the synthetic stand-in "
                                  "(made once, then reused)"))
    arch = values.get("arch", RunConfig.arch)
    if imagenet_reachable is not None and name == "demo" and values.get("weights") == IMAGENET \
            and not imagenet_reachable(arch):
        values["weights"] = None
        sources["weights"] = RULE
        notes.append(("weights", "imagenet → none: IMAGENET WEIGHTS ARE NOT REACHABLE: training from random "
                                 "initialisation; these numbers say nothing about transfer learning"))
    if spec is not None and spec.scratch_lr_factor != 1.0 and values.get("weights", RunConfig.weights) is None \
            and values.get("recipe", AUTO) in (AUTO, SCRATCH) and "scratch_learning_rate" not in given:
        base = values.get("scratch_learning_rate", RunConfig.scratch_learning_rate)
        values["scratch_learning_rate"] = base * spec.scratch_lr_factor
        sources["scratch_learning_rate"] = RULE
        notes.append(("scratch_learning_rate", f"{base:g} → {values['scratch_learning_rate']:g}: {spec.display_name} "
                                               f"trains from scratch at {spec.scratch_lr_factor:g}× the rate "
                                               "(registry scratch_lr_factor)"))
    run_folder = run_subfolder(values)
    if run_folder is not None:
        values["study_dir"] = values["output_dir"]
        values["output_dir"] = str(Path(values["output_dir"]) / run_folder)
        sources["output_dir"] = sources["study_dir"] = RULE
        notes.append(("output_dir", f"→ {values['output_dir']}: this run's own folder inside the study's "
                                    f"{values['study_dir']} ({run_folder.parts[0]})"))
    try:
        return RunConfig(**values, notes=tuple(notes), sources=tuple(sources.items()))
    except TypeError as exc:
        raise ConfigError(f"Bad run parameter: {exc}.") from exc


# Inside the study's folder: one folder per cross-validation fold and seed, one per learning-curve point.
CV_FOLDER = "cv"
CURVE_FOLDER = "learning_curve"


def run_subfolder(values: dict[str, Any]) -> Path | None:
    """The folder, relative to the study's, of a run that is a cross-validation fold (`cv/seed42-fold1of5`) or a
    learning-curve point (`learning_curve/scratch-frac0.5`); None for the study's own hold-out run. Already inside
    one (a study_dir given), None."""
    if values.get("study_dir"):
        return None
    if values.get("folds") is not None:
        seed = values.get("seed", RunConfig.seed)
        return Path(CV_FOLDER) / f"seed{seed}-fold{values.get('fold')}of{values['folds']}"
    fraction = float(values.get("train_fraction", 1.0))
    if fraction != 1.0 or values.get("curve_point"):
        return Path(CURVE_FOLDER) / f"{curve_init(values.get('weights', RunConfig.weights))}-frac{fraction:g}"
    return None


def curve_init(weights: str | None) -> str:
    """How a learning-curve point's network starts: "scratch" (weights None) or "pretrained"."""
    return "scratch" if weights is None else "pretrained"


# The name evaluation.py and baseline.py know resolve() by: a profile and overrides, no architecture rules.
profile_config = resolve


def resolve_profile(profile: str | None, default: str = "paper", default_why: str = "the default") -> tuple[str, str]:
    """Return (profile name, why it was chosen). Explicit beats implicit: a given profile wins; BLOODCELL_PROFILE
    only replaces an unset one or "auto"; else `default`."""
    env = (os.environ.get(PROFILE_ENV) or "").strip().casefold()
    given = (profile or "").strip().casefold()
    if given and given != AUTO:
        name = given
        why = "given explicitly" + (f" (it wins over {PROFILE_ENV}={env})" if env and env != given else "")
    elif env:
        name, why = env, f"from the environment variable {PROFILE_ENV}"
    else:
        name, why = default, default_why
    if name not in PROFILES:
        raise ConfigError(f"Unknown profile {name!r} ({why}); choose one of: {', '.join(PROFILES)}.")
    return name, why


def resolve_output_dir(output_dir: str | Path | None, default: str = DEFAULT_OUTPUT) -> tuple[str, str | None]:
    """Return (output folder, why, or None for a plain given or default one). A given folder wins; BLOODCELL_OUTPUT
    only replaces an unset one or "auto"; else `default`, where "auto" is the repository's Saved Models."""
    env = os.environ.get(OUTPUT_ENV) or ""
    given = "" if output_dir is None or str(output_dir).strip().casefold() in ("", AUTO) else str(output_dir)
    if given:
        return given, (f"given explicitly (it wins over {OUTPUT_ENV}={env})" if env and env != given else None)
    if env:
        return env, f"from the environment variable {OUTPUT_ENV}"
    if default == AUTO:
        folder, where = repository_output_dir()
        return str(folder), f"auto → {folder}: {where}"
    return default, None


def repository_output_dir() -> tuple[Path, str]:
    """Return (the repository's Saved Models folder, how it was found): beside the package when bloodcell_lib runs
    from a source checkout (an editable install, a clone in Colab), else in the current directory."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir():
        return root / DEFAULT_OUTPUT, "the repository's, found from where bloodcell_lib is"
    return Path.cwd() / DEFAULT_OUTPUT, "the current folder's (bloodcell_lib is installed, not a source checkout)"


def output_dir_override(output_dir: str | Path | None) -> str:
    """Return the folder a notebook reads and writes: the given one; unset or "auto" → BLOODCELL_OUTPUT, else
    the repository's Saved Models (for the Comparison notebook's calls, which take a folder rather than a RunConfig)."""
    return resolve_output_dir(output_dir, NOTEBOOK_OUTPUT)[0]


def check_image_size(spec: ArchSpec, image_size: int | str | None) -> int:
    """Return the side length to build at ("native"/None → the spec's), refusing sizes the network cannot take."""
    if image_size is None or image_size == "native":
        return spec.native_size
    size = int(parse_image_size(image_size))
    if size < spec.min_size:
        raise ConfigError(
            f"{spec.display_name} needs images of at least {spec.min_size}×{spec.min_size} pixels, "
            f"got {size}; use image_size >= {spec.min_size} or 'native' ({spec.native_size})."
        )
    largest = MAX_SIZE_FACTOR * spec.native_size
    if size > largest:
        raise ConfigError(
            f"image size {size} is too large for {spec.display_name}: the limit is {largest} pixels "
            f"({MAX_SIZE_FACTOR}× its native {spec.native_size}); beyond it training runs out of memory. "
            f"Use image_size <= {largest} or 'native'."
        )
    return size


def parse_image_size(value: int | str) -> int | str:
    """Return "native" or a number of pixels from a parameter's value ("64" → 64); anything else is a ConfigError."""
    if isinstance(value, str) and value != "native":
        if not value.strip().isdigit():
            raise ConfigError(f"image_size must be 'native' or a number of pixels, got {value!r}.")
        return int(value)
    return value


def _refuse_unknown(names: Any) -> None:
    unknown = set(names) - _FIELDS
    if unknown:
        raise ConfigError(f"Unknown run parameter(s): {', '.join(sorted(unknown))}.")
