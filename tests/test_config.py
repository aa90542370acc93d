import pytest

from bloodcell_lib.config import PROFILES, RunConfig, profile_config
from bloodcell_lib.errors import ConfigError


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


def test_environment_profile_overrides_only_an_unset_or_auto_profile(monkeypatch):
    monkeypatch.setenv("BLOODCELL_PROFILE", "smoke")
    for implicit in (None, "auto"):
        cfg = profile_config(implicit, arch="vgg16")
        assert cfg.profile == "smoke" and cfg.epochs == PROFILES["smoke"]["epochs"] and cfg.arch == "vgg16"
        assert "BLOODCELL_PROFILE" in cfg.extra["profile_source"]
    # Explicit beats implicit: a profile the user typed is never replaced silently, and the notice says so.
    cfg = profile_config("paper", arch="vgg16")
    assert cfg.profile == "paper" and "wins over BLOODCELL_PROFILE=smoke" in cfg.extra["profile_source"]


def test_notebook_auto_profile_follows_the_environment_and_explicit_wins(monkeypatch, tmp_path):
    from bloodcell_lib.study import configure, describe

    monkeypatch.setenv("BLOODCELL_PROFILE", "smoke")
    data = tmp_path / "data"
    data.mkdir()
    assert configure("vgg16", profile="auto", data_dir=str(data), output_dir=str(tmp_path)).profile == "smoke"
    cfg = configure("vgg16", profile="paper", data_dir=str(data), output_dir=str(tmp_path))
    assert cfg.profile == "paper" and "Profile      : paper (given explicitly" in describe(cfg)


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(ConfigError, match="paper, demo, smoke"):
        profile_config("fast")


def test_replace_rejects_unknown_fields():
    with pytest.raises(ConfigError, match="colour"):
        RunConfig().replace(colour="red")


def test_output_environment_variable_overrides_the_notebook_folder(monkeypatch):
    from bloodcell_lib.config import output_dir_override

    assert output_dir_override("../Saved Models") == "../Saved Models"
    monkeypatch.setenv("BLOODCELL_OUTPUT", "/tmp/elsewhere")
    assert output_dir_override("../Saved Models") == "/tmp/elsewhere"


def test_a_recorded_configuration_comes_back_with_overrides():
    recorded = {**profile_config("smoke", seed=7).to_dict(), "from_a_newer_version": 1}
    cfg = RunConfig.from_dict(recorded, bootstrap=None, gradcam_images=3)
    assert (cfg.profile, cfg.seed, cfg.bootstrap, cfg.gradcam_images) == ("smoke", 7, 100, 3)
    with pytest.raises(ConfigError):
        RunConfig.from_dict(recorded, no_such_parameter=1)
