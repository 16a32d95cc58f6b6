"""The real-FERPlus model kept in the repository (models/ferplus_ran_cpu): small enough to ship,
verified on load, its data card complete, and right on a real photograph."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from skimage import data

from ranray.inference import load_trained_model
from ranray.prediction import predict

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "ferplus_ran_cpu"
WEIGHTS = MODEL_DIR / "best.pt"
# FERPlus's label.csv files as microsoft/FERPlus ships them (and tessav/crowd-emotion copies them)
LABEL_SHA256 = {
    "FER2013Train/label.csv": "a82c40c825505cd30e139195c246bc38f8ac39de0e8968cbf15e1dab7837658c",
    "FER2013Valid/label.csv": "aad6298bed23cad816550362c2c00ae49b99513c7cae7d49651f347afd9ab860",
    "FER2013Test/label.csv": "425142295cc23872651271be9f45a99dac11af426f948d1b60967c8845b7bdf2",
}


@pytest.fixture(scope="module")
def trained():
    return load_trained_model(WEIGHTS)


def test_the_shipped_files_are_small_and_the_weights_verify(trained):
    assert sum(p.stat().st_size for p in MODEL_DIR.iterdir()) < 20 * 2**20
    meta = json.loads((MODEL_DIR / "best.pt.meta.json").read_text())
    assert meta["size"] == WEIGHTS.stat().st_size
    m = trained.cfg.model
    assert (m.backbone, m.input_size, m.variant, m.num_regions) == ("iresnet_tiny", 64, "ran", 6)


def test_the_data_card_names_the_real_data(trained):
    card = trained.data
    assert (card["source"], card["synthetic"], card["label_mode"]) == ("ferplus", False, "majority")
    assert card["label_files"] == LABEL_SHA256
    assert card["align_template"] == "fer2013"
    assert card["rows"] == {"train": 25045, "val": 3191, "test": 3137}
    measured = json.loads((MODEL_DIR / "test_metrics.json").read_text())
    assert measured["test_samples"] == 3137 and measured["test_accuracy"] > 0.79  # 79.98% as trained


def test_a_smiling_astronaut_is_happiness(trained, tmp_path):
    """scikit-image's astronaut (Eileen Collins, smiling): a real photograph, detected, aligned to
    the model's own template and classified."""
    photo = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(photo)
    (result,) = predict(trained, [photo])
    assert len(result.faces) == 1, result.error
    face = result.faces[0]
    assert face.label == "happiness", face.probabilities
    assert sum(face.probabilities.values()) == pytest.approx(1.0, abs=1e-3)
    shares = torch.tensor([a["mu"] * a["nu"] for a in face.attention])
    assert len(shares) == 6 and torch.all(shares > 0)
