"""One run's parameters as a dataclass, and the named profiles (paper, demo, smoke) that preset it."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bloodcell_lib.errors import ConfigError

PROFILE_ENV = "BLOODCELL_PROFILE"
OUTPUT_ENV = "BLOODCELL_OUTPUT"  # where notebooks write, overriding their parameter (nbval uses a temp folder)
# The defaults every step falls back to, so a function called without a RunConfig (the baseline, a library
# user's evaluate) resamples like a run that has one: one seed and one bootstrap size for the whole study.
DEFAULT_SEED = 42
DEFAULT_BOOTSTRAP = 1000


def output_dir_override(output_dir: str) -> str:
    """Return BLOODCELL_OUTPUT when set, else the given output folder."""
    return os.environ.get(OUTPUT_ENV) or output_dir


@dataclass
class RunConfig:
    """Everything a run needs, carried from a notebook, the CLI or run_all.py to every step."""

    arch: str = "efficientnetb3"
    data_dir: str | None = None
    split_path: str | None = None
    output_dir: str = "Saved Models"
    profile: str = "paper"
    epochs: int = 20  # total budget over both phases; early stopping may use fewer
    head_epochs: int | None = None  # phase-1 share of `epochs`; None → half, rounded up
    image_size: int | str = "native"  # "native" or a side length in pixels
    batch_size: int = 32
    weights: str | None = "imagenet"  # "imagenet", None, or a path to a weights file
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
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.weights, str) and self.weights.casefold() in ("none", "null", ""):
            self.weights = None
        if isinstance(self.image_size, str) and self.image_size != "native":
            if not self.image_size.isdigit():
                raise ConfigError(f"image_size must be 'native' or a number of pixels, got {self.image_size!r}.")
            self.image_size = int(self.image_size)
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

    def to_dict(self) -> dict[str, Any]:
        """Return the configuration as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> "RunConfig":
        """Rebuild a configuration recorded with to_dict() (names this version does not know are dropped);
        overrides that are not None win."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"Bad run parameter: {exc}.") from exc

    def replace(self, **changes: Any) -> "RunConfig":
        """Return a copy with some fields changed (unknown names are an error)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"Unknown run parameter(s): {', '.join(sorted(unknown))}.")
        return dataclasses.replace(self, **changes)


PROFILES: dict[str, dict[str, Any]] = {
    # The study itself: the real Kaggle folder, ImageNet weights, native input sizes.
    "paper": dict(epochs=20, image_size="native", batch_size=32, weights="imagenet", patience=4),
    # No dataset at hand: a synthetic set, small images, a few epochs.
    "demo": dict(
        epochs=6, image_size=96, batch_size=32, weights="imagenet", patience=3,
        synth_per_class=60, synth_size=128, synth_duplicates=2, gradcam_images=25, bootstrap=500,
    ),
    # CI: the smallest run that still executes every step.
    "smoke": dict(
        epochs=2, image_size=32, batch_size=16, weights=None, patience=2,
        synth_per_class=8, synth_size=64, synth_duplicates=1, gradcam_images=10, bootstrap=100,
        run_eagerly=True, cost_repeats=3,
    ),
}


AUTO = "auto"


def resolve_profile(profile: str | None, default: str = "paper") -> tuple[str, str]:
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
        name, why = default, "the default"
    if name not in PROFILES:
        raise ConfigError(f"Unknown profile {name!r} ({why}); choose one of: {', '.join(PROFILES)}.")
    return name, why


def profile_config(profile: str | None = None, **overrides: Any) -> RunConfig:
    """Return the RunConfig of a named profile (see resolve_profile); extra["profile_source"] says why that one."""
    name, why = resolve_profile(profile)
    values = {**PROFILES[name], **{k: v for k, v in overrides.items() if v is not None}}
    values["profile"] = name
    values["extra"] = {**dict(values.get("extra") or {}), "profile_source": why}
    try:
        return RunConfig(**values)
    except TypeError as exc:
        raise ConfigError(f"Bad run parameter: {exc}.") from exc
