"""The training history: JSON read by default, the seed's pickle only on request; its place beside the model."""

import pickle

import numpy as np
import pytest

from bloodcell_lib.errors import ConfigError
from bloodcell_lib.history import best_epoch, history_path, load_history, save_history


def test_history_json_is_read_by_default_and_pickle_only_on_request(tmp_path):
    history = {"epoch": [1, 2], "phase": [1, 2], "loss": [1.5, np.float32(1.25)], "meta": {"weights_used": "imagenet"}}
    path = save_history(history, tmp_path / "vgg16_training_history.json", meta={"image_size": 224})
    saved = load_history(path)
    assert saved["loss"] == [1.5, 1.25] and saved["meta"] == {"weights_used": "imagenet", "image_size": 224}
    pkl = path.with_suffix(".pkl")
    with pytest.raises(ConfigError, match="allow_pickle=True"):
        load_history(pkl)
    assert load_history(pkl, allow_pickle=True) == {"epoch": [1, 2], "phase": [1, 2], "loss": [1.5, 1.25]}
    assert pickle.loads(pkl.read_bytes()) == load_history(pkl, allow_pickle=True)  # the seed's plain dict of lists


def test_the_history_sits_beside_the_model_and_names_its_best_epoch(tmp_path):
    assert history_path(tmp_path / "vgg16.keras") == tmp_path / "vgg16_training_history.json"
    assert best_epoch({"epoch": [1, 2, 3], "val_loss": [0.9, float("nan"), 0.7], "loss": [0.1, 0.1, 0.1]}) == 3
    assert best_epoch({"epoch": [1, 2], "val_loss": [None, None], "loss": [0.5, 0.4]}) == 2  # no validation data
    assert best_epoch({"epoch": [1, 2], "loss": [0.5, 0.6]}) == 1
    assert best_epoch({"epoch": [], "loss": []}) is None
