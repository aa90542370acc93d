import dataclasses
from pathlib import Path

import pytest

import bloodcell_lib

from bloodcell_lib import config
from bloodcell_lib.config import (MAX_SIZE_FACTOR, PROFILES, SYNTHETIC_FOLDER, RunConfig, check_image_size,
                                  output_dir_override, resolve)
from bloodcell_lib.errors import ConfigError
from bloodcell_lib.registry import get_arch
from bloodcell_lib.study import configure, describe

REPO = Path(bloodcell_lib.__file__).resolve().parents[1]


def test_phase_epochs_sum_to_budget():
    assert RunConfig(epochs=3).phase_epochs == (2, 1)
    assert RunConfig(epochs=2).phase_epochs == (1, 1)
    assert RunConfig(epochs=1).phase_epochs == (1, 0)
    assert RunConfig(epochs=20, head_epochs=5).phase_epochs == (5, 15)


def test_weights_none_string_means_no_weights():
    assert RunConfig(weights="none").weights is None
    assert RunConfig(weights="imagenet").weights == "imagenet"


def test_image_size_text_is_parsed():
    assert RunConfig(image_size="64").image_size == 64
    with pytest.raises(ConfigError, match="native"):
        RunConfig(image_size="big")


def test_a_configuration_is_immutable_and_changes_only_through_replace_and_its_checks():
    cfg = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.image_size = 32
    assert cfg.replace(epochs=3).epochs == 3 and cfg.epochs == 20
    with pytest.raises(ConfigError, match="epochs"):
        cfg.replace(epochs=0)


def test_precedence_explicit_over_environment_over_profile_over_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("BLOODCELL_PROFILE", "smoke")
    monkeypatch.setenv("BLOODCELL_OUTPUT", str(tmp_path / "env"))
    cfg = resolve("auto", batch_size=8)
    assert cfg.profile == "smoke" and cfg.why("profile") == "from the environment variable BLOODCELL_PROFILE"
    assert cfg.batch_size == 8  # explicit beats the profile's 16
    assert cfg.epochs == PROFILES["smoke"]["epochs"]  # the profile beats RunConfig's default
    assert cfg.dropout == RunConfig.dropout  # nothing else names it: the default
    assert cfg.output_dir == str(tmp_path / "env") and "BLOODCELL_OUTPUT" in cfg.why("output_dir")
    cfg = resolve("paper", output_dir=str(tmp_path / "mine"))
    assert cfg.profile == "paper" and cfg.why("profile") == "given explicitly (it wins over BLOODCELL_PROFILE=smoke)"
    assert cfg.output_dir == str(tmp_path / "mine") and "it wins over BLOODCELL_OUTPUT" in cfg.why("output_dir")


def test_environment_profile_overrides_only_an_unset_or_auto_profile(monkeypatch):
    monkeypatch.setenv("BLOODCELL_PROFILE", "smoke")
    for implicit in (None, "auto"):
        cfg = resolve(implicit, arch="vgg16")
        assert cfg.profile == "smoke" and cfg.epochs == PROFILES["smoke"]["epochs"] and cfg.arch == "vgg16"
        assert "BLOODCELL_PROFILE" in cfg.why("profile")


def test_notebook_auto_profile_follows_the_environment_and_explicit_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("BLOODCELL_PROFILE", "smoke")
    data = tmp_path / "data"
    data.mkdir()
    assert configure("vgg16", profile="auto", data_dir=str(data), output_dir=str(tmp_path)).profile == "smoke"
    cfg = configure("vgg16", profile="paper", data_dir=str(data), output_dir=str(tmp_path))
    assert cfg.profile == "paper" and "Profile      : paper (given explicitly" in describe(cfg)


def test_unknown_profile_and_parameter_are_clear_errors():
    with pytest.raises(ConfigError, match="paper, demo, smoke"):
        resolve("fast")
    with pytest.raises(ConfigError, match="colour"):
        resolve("smoke", colour="red")


def test_replace_rejects_unknown_fields():
    with pytest.raises(ConfigError, match="colour"):
        RunConfig().replace(colour="red")


def test_a_preset_image_size_below_the_minimum_is_raised_with_a_note_an_explicit_one_is_refused():
    xception = get_arch("xception")
    cfg = resolve("smoke", spec=xception)
    assert cfg.image_size == xception.min_size == 71
    assert cfg.why("image_size").startswith("32 → 71: the smallest Xception accepts")
    assert "NOTE: image_size 32 → 71" in "\n".join(cfg.note_lines())
    assert resolve("smoke", spec=get_arch("vgg16")).why("image_size") is None  # 32 fits: nothing to say
    with pytest.raises(ConfigError, match="at least 71×71"):
        resolve("smoke", spec=xception, image_size=32)
    with pytest.raises(ConfigError, match="the limit is 598"):
        resolve("paper", spec=xception, image_size="1000")


def test_the_image_size_rule():
    vgg = get_arch("vgg16")
    assert check_image_size(vgg, "native") == check_image_size(vgg, None) == 224
    assert check_image_size(vgg, "64") == 64
    assert check_image_size(vgg, MAX_SIZE_FACTOR * 224) == 448
    for refused in (31, 449, "big"):
        with pytest.raises(ConfigError):
            check_image_size(vgg, refused)


def test_without_a_dataset_the_stand_in_is_chosen_and_noted_but_paper_needs_the_real_one(tmp_path):
    cfg = resolve("auto", stand_in=True, output_dir=str(tmp_path))
    assert cfg.profile == "demo" and cfg.why("profile") == "the default without a dataset"
    assert cfg.data_dir == str(tmp_path / SYNTHETIC_FOLDER) and "no dataset given" in cfg.why("data_dir")
    assert resolve("auto", stand_in=True, data_dir=str(tmp_path)).profile == "paper"
    with pytest.raises(ConfigError, match="pass --data-dir"):
        resolve("paper", stand_in=True)
    assert resolve("paper").data_dir is None  # no stand-in allowed: nothing is made up


def test_unreachable_imagenet_weights_fall_back_loudly_in_the_demo_only():
    offline = lambda arch: False  # noqa: E731
    cfg = resolve("demo", spec=get_arch("vgg16"), imagenet_reachable=offline)
    assert cfg.weights is None and "IMAGENET WEIGHTS ARE NOT REACHABLE" in cfg.why("weights")
    assert resolve("paper", spec=get_arch("vgg16"), imagenet_reachable=offline).weights == "imagenet"
    assert resolve("demo", spec=get_arch("vgg16"), imagenet_reachable=lambda arch: True).weights == "imagenet"


def test_output_folder_of_the_notebooks_explicit_wins_auto_follows_the_environment(monkeypatch):
    assert output_dir_override("auto") == str(REPO / "Saved Models")
    assert output_dir_override("elsewhere") == "elsewhere"
    monkeypatch.setenv("BLOODCELL_OUTPUT", "/tmp/elsewhere")
    assert output_dir_override("auto") == output_dir_override(None) == "/tmp/elsewhere"
    assert output_dir_override("../Saved Models") == "../Saved Models"


def test_a_recorded_configuration_comes_back_with_overrides_and_notes():
    recorded = {**resolve("smoke", seed=7).to_dict(), "from_a_newer_version": 1, "extra": {"notes": []}}
    cfg = RunConfig.from_dict(recorded, bootstrap=None, gradcam_images=3)
    assert (cfg.profile, cfg.seed, cfg.bootstrap, cfg.gradcam_images) == ("smoke", 7, 100, 3)
    assert cfg.why("profile") == "given explicitly"
    with pytest.raises(ConfigError):
        RunConfig.from_dict(recorded, no_such_parameter=1)


def test_auto_output_is_the_repositorys_saved_models_wherever_the_kernel_starts(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # Colab starts the kernel in /content: "../Saved Models" would be /Saved Models
    cfg = resolve("smoke", spec=get_arch("vgg16"), default_output="auto")
    assert cfg.output_dir == str(REPO / "Saved Models") and cfg.output_path.is_absolute()
    assert cfg.source("output_dir") == "resolve (see NOTE)" and "the repository's" in cfg.why("output_dir")
    assert output_dir_override("auto") == output_dir_override(None) == str(REPO / "Saved Models")
    # Installed from a wheel (no checkout around the package): the current folder's Saved Models.
    monkeypatch.setattr(config, "__file__", str(tmp_path / "site-packages" / "bloodcell_lib" / "config.py"))
    assert output_dir_override("auto") == str(tmp_path / "Saved Models")


def test_every_setting_that_changes_the_result_has_a_source(monkeypatch, tmp_path):
    monkeypatch.setenv("BLOODCELL_OUTPUT", str(tmp_path))
    cfg = resolve("smoke", spec=get_arch("vgg16"), batch_size=8, augment_contrast=0.2, lr_factor=0.5)
    sources = {name: source for _, name, _, source in cfg.settings()}
    assert sources["batch_size"] == sources["augment_contrast"] == sources["lr_factor"] == "parameter"
    assert sources["epochs"] == "profile smoke" and sources["augment_brightness"] == sources["min_lr"] == "default"
    assert sources["image_size"] == "profile smoke"
    assert resolve("smoke", spec=get_arch("xception")).source("image_size") == "resolve (see NOTE)"  # 32 → 71
    assert cfg.source("output_dir") == "environment (BLOODCELL_OUTPUT)" and cfg.source("profile") == "parameter"
    groups = {group for group, *_ in cfg.settings()}
    assert {"augmentation", "learning rate", "training", "model", "data", "evaluation"} == groups
    assert set(config.SETTING_GROUPS["augmentation"]) == {"augment_brightness", "augment_contrast"}
    assert {"lr_factor", "lr_patience", "min_lr", "scratch_learning_rate"} <= set(config.SETTING_GROUPS["learning rate"])
    # The fields cache, run_eagerly (speed), output_dir and study_dir (where) and the bookkeeping are the only ones
    # left out.
    listed = {name for names in config.SETTING_GROUPS.values() for name in names}
    assert set(config._FIELDS) - listed == {"cache", "run_eagerly", "output_dir", "study_dir", "profile", "notes",
                                            "sources"}
    # Recorded and read back (evaluate's evaluation_config), the sources come along.
    assert RunConfig.from_dict(cfg.to_dict()).source("augment_contrast") == "parameter"


def test_describe_prints_every_setting_grouped_with_its_source(tmp_path):
    text = describe(configure("vgg16", profile="smoke", output_dir=str(tmp_path), augment_brightness=0.05))
    assert "Recipe       : from scratch (1 phase)" in text
    for line in ("augment_brightness    = 0.05  [parameter]", "augment_contrast      = 0.1  [default]",
                 "lr_factor             = 0.2  [default]", "lr_patience           = None  [default]",
                 "min_lr                = 1e-07  [default]",
                 "scratch_learning_rate = 0.0001  [resolve (see NOTE)]",  # VGG16's registry factor 0.1
                 "epochs                = 1  [profile smoke]", "recipe                = auto → from scratch (1 phase)"):
        assert line in text
    assert text.index("  augmentation") < text.index("augment_brightness")
    assert text.index("  learning rate") < text.index("lr_factor")


def test_the_recipe_follows_the_weights_unless_given():
    scratch = RunConfig(epochs=6, weights=None)
    assert scratch.training_recipe == "scratch" and scratch.phase_epochs == (6, 0)
    assert scratch.recipe_label == "from scratch (1 phase)" and scratch.phase_learning_rates[0] == 1e-3
    tuned = RunConfig(epochs=6, weights="imagenet")
    assert tuned.training_recipe == "fine-tune" and tuned.phase_epochs == (3, 3)
    assert tuned.recipe_label == "fine-tune (2 phases)" and tuned.phase_learning_rates == (1e-3, 5e-5)
    assert RunConfig(epochs=6, weights="/some/file.h5").training_recipe == "fine-tune"
    assert RunConfig(epochs=6, weights=None, recipe="fine-tune").phase_epochs == (3, 3)
    assert RunConfig(epochs=2, head_epochs=2).recipe_label == "fine-tune (head only, 1 phase)"
    assert RunConfig(weights=None, scratch_learning_rate=3e-4).phase_learning_rates == (3e-4, 3e-4)
    with pytest.raises(ConfigError, match="recipe"):
        RunConfig(recipe="transfer")


def test_schedule_and_augmentation_fields_keep_the_old_constants_and_check_their_values():
    cfg = RunConfig(patience=4)
    assert (cfg.lr_factor, cfg.reduce_lr_patience, cfg.min_lr) == (0.2, 2, 1e-7)
    assert RunConfig(patience=1).reduce_lr_patience == 1 and RunConfig(lr_patience=5).reduce_lr_patience == 5
    assert cfg.augment_brightness == 0.1 and cfg.contrast_range == pytest.approx((0.9, 1.1))
    for bad in (dict(lr_factor=1.0), dict(lr_factor=0), dict(lr_patience=0), dict(augment_brightness=1.5),
                dict(augment_contrast=1.0), dict(augment_contrast=-0.1)):
        with pytest.raises(ConfigError):
            RunConfig(**bad)


def test_a_network_without_batchnorm_trains_from_scratch_at_its_registry_share_of_the_rate():
    from bloodcell_lib.registry import get_arch

    vgg = resolve("smoke", spec=get_arch("vgg16"))
    assert vgg.scratch_learning_rate == pytest.approx(1e-4) and vgg.source("scratch_learning_rate") == config.RULE
    assert "registry scratch_lr_factor" in vgg.why("scratch_learning_rate")
    assert resolve("smoke", spec=get_arch("resnet50")).scratch_learning_rate == 1e-3  # BatchNorm: the run's rate
    assert resolve("smoke", spec=get_arch("vgg16"), scratch_learning_rate=3e-3).scratch_learning_rate == 3e-3
    tuned = resolve("paper", spec=get_arch("vgg16"), data_dir="/data")  # pretrained: fine-tuning rates untouched
    assert tuned.scratch_learning_rate == 1e-3 and tuned.why("scratch_learning_rate") is None
