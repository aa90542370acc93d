"""One run's parameters (RunConfig), the profiles that preset them, and resolve(): where they are put together.

Every entry point — a notebook's Parameters cell (study.configure), the CLI's `train` (and `evaluate` and `baseline`
through profile_config), run_all.py — hands what the user gave to resolve(), which takes each value from the first
of these that has one:

1. an explicit argument: a notebook parameter, a command-line flag. None means unset, and so does "auto" for the
   profile and the output folder;
2. the environment, which only fills what was left unset: BLOODCELL_PROFILE (an explicit PROFILE or --profile
   beats it, and the note says so) and BLOODCELL_OUTPUT (nbval points it at a temporary folder);
3. the profile's preset (PROFILES: paper, demo, smoke);
4. RunConfig's defaults.

Then come the rules that depend on the network and the machine: a preset image size below the network's minimum is
raised to it, an explicit size the network cannot take is refused (check_image_size, the one image-size rule); where
a synthetic stand-in is allowed, no dataset means the demo on one; in the demo, unreachable ImageNet weights mean
random initialisation. The RunConfig that comes back is frozen, and its `notes` say what was chosen and why.
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
# Notebooks run in notebooks/, so their default output folder is the repository's Saved Models.
NOTEBOOK_OUTPUT = "../Saved Models"
# The synthetic stand-in's folder inside the output folder, where a run without a dataset may use one.
SYNTHETIC_FOLDER = "synthetic_data"
IMAGENET = "imagenet"
# Largest input side, as a multiple of the native one: activations grow with the square of the side, so at twice
# the native size a batch of 32 already fills a 16 GB GPU, and a blood-cell crop holds no more detail to find.
MAX_SIZE_FACTOR = 2


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, carried from a notebook, the CLI or run_all.py to every step; made by resolve()."""

    arch: str = "efficientnetb3"
    data_dir: str | None = None
    split_path: str | None = None
    output_dir: str = DEFAULT_OUTPUT
    profile: str = "paper"
    epochs: int = 20  # total budget over both phases; early stopping may use fewer
    head_epochs: int | None = None  # phase-1 share of `epochs`; None → half, rounded up
    image_size: int | str = "native"  # "native" or a side length in pixels
    batch_size: int = 32
    weights: str | None = IMAGENET  # "imagenet", None, or a path to a weights file
    seed: int = DEFAULT_SEED
    dropout: float = 0.3
    hidden_units: int = 0  # 0 → no hidden dense block in the head
    head_lr: float = 1e-3
    finetune_lr: float = 5e-5
    unfreeze_layers: int | None = None  # None → the registry's default for the architecture
    class_weights: bool = False
    patience: int = 4
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_by: str = "group"
    cache: str = "memory"  # "memory", "none", or a file path prefix for tf.data's file cache
    run_eagerly: bool = False
    # Synthetic stand-in used when no dataset is given (demo and smoke profiles).
    synth_per_class: int = 60
    synth_size: int = 128
    synth_duplicates: int = 2
    synth_shortcut: bool = False
    gradcam_images: int = 50
    bootstrap: int = DEFAULT_BOOTSTRAP  # group-bootstrap resamples behind every interval
    cost_repeats: int = 20  # timed calls for the latency median
    # (parameter, where its value came from or why resolve() changed it), in the order decided; replace() keeps them.
    notes: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        # Frozen: the values are normalised once, here, and never change afterwards.
        if isinstance(self.weights, str) and self.weights.casefold() in ("none", "null", ""):
            object.__setattr__(self, "weights", None)
        object.__setattr__(self, "image_size", parse_image_size(self.image_size))
        object.__setattr__(self, "notes", tuple((str(name), str(why)) for name, why in self.notes))
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}.")
        if self.split_by not in ("group", "image"):
            raise ConfigError(f"split_by must be 'group' or 'image', got {self.split_by!r}.")

    @property
    def phase_epochs(self) -> tuple[int, int]:
        """Return (phase-1 epochs, phase-2 epochs); their sum is `epochs`."""
        head = self.head_epochs if self.head_epochs is not None else (self.epochs + 1) // 2
        head = max(1, min(head, self.epochs))
        return head, self.epochs - head

    @property
    def output_path(self) -> Path:
        """Return the output folder as a Path."""
        return Path(self.output_dir)

    def why(self, name: str) -> str | None:
        """Return the note about one parameter (where its value came from, or why it was changed), or None."""
        return next((why for key, why in self.notes if key == name), None)

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


PROFILES: dict[str, dict[str, Any]] = {
    # The study itself: the real Kaggle folder, ImageNet weights, native input sizes.
    "paper": dict(epochs=20, image_size="native", batch_size=32, weights=IMAGENET, patience=4),
    # No dataset at hand: a synthetic set, small images, a few epochs.
    "demo": dict(
        epochs=6, image_size=96, batch_size=32, weights=IMAGENET, patience=3,
        synth_per_class=60, synth_size=128, synth_duplicates=2, gradcam_images=25, bootstrap=500,
    ),
    # CI: the smallest run that still executes every step.
    "smoke": dict(
        epochs=2, image_size=32, batch_size=16, weights=None, patience=2,
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
    folder when neither output_dir nor BLOODCELL_OUTPUT names one.
    """
    given = {k: v for k, v in params.items() if v is not None}
    _refuse_unknown(given)
    if spec is not None:
        given["arch"] = spec.key
    no_data = not given.get("data_dir")
    name, why = resolve_profile(profile, default="demo" if stand_in and no_data else "paper",
                                default_why="the default without a dataset" if stand_in and no_data else "the default")
    notes = [*given.pop("notes", ()), ("profile", why)]
    values = {**PROFILES[name], **given, "profile": name}
    values["output_dir"], why = resolve_output_dir(given.get("output_dir"), default_output)
    if why:
        notes.append(("output_dir", why))
    if spec is not None:
        size = parse_image_size(values.get("image_size", "native"))
        if "image_size" not in given and isinstance(size, int) and size < spec.min_size:
            notes.append(("image_size", f"{size} → {spec.min_size}: the smallest {spec.display_name} accepts "
                                        f"(the {name} profile's {size} is below it)"))
            size = spec.min_size
        check_image_size(spec, size)  # an explicit size the network cannot take is refused here, before any work
        values["image_size"] = size
    if stand_in and no_data:
        if name == "paper":
            raise ConfigError("The paper profile trains on the real dataset: pass --data-dir (DATA_DIR) with the "
                              "Kaggle folder, or choose the demo profile (a synthetic stand-in).")
        values["data_dir"] = str(Path(values["output_dir"]) / SYNTHETIC_FOLDER)
        notes.append(("data_dir", f"→ {values['data_dir']}: no dataset given, so the synthetic stand-in "
                                  "(made once, then reused)"))
    arch = values.get("arch", RunConfig.arch)
    if imagenet_reachable is not None and name == "demo" and values.get("weights") == IMAGENET \
            and not imagenet_reachable(arch):
        values["weights"] = None
        notes.append(("weights", "imagenet → none: IMAGENET WEIGHTS ARE NOT REACHABLE: training from random "
                                 "initialisation; these numbers say nothing about transfer learning"))
    try:
        return RunConfig(**values, notes=tuple(notes))
    except TypeError as exc:
        raise ConfigError(f"Bad run parameter: {exc}.") from exc


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
    only replaces an unset one or "auto"; else `default`."""
    env = os.environ.get(OUTPUT_ENV) or ""
    given = "" if output_dir is None or str(output_dir).strip().casefold() in ("", AUTO) else str(output_dir)
    if given:
        return given, (f"given explicitly (it wins over {OUTPUT_ENV}={env})" if env and env != given else None)
    if env:
        return env, f"from the environment variable {OUTPUT_ENV}"
    return default, None


def output_dir_override(output_dir: str | Path | None) -> str:
    """Return the folder a notebook reads and writes: the given one; unset or "auto" → BLOODCELL_OUTPUT, else
    ../Saved Models (for the Comparison notebook's calls, which take a folder rather than a RunConfig)."""
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
