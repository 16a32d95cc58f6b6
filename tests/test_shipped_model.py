"""The real-FERPlus model shipped inside the package (ranray.pretrained): small enough to ship,
verified on load, its data and model card complete, right on a real photograph, the default of
predict and evaluate, and the same probabilities through predict's classifier, evaluate and the
MLflow model."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from shard_fixtures import write_dataset
from skimage import data

from ranray.cli import main
from ranray.evaluation import evaluate
from ranray.inference import classify_aligned, face_tensor, faces_tensor, load_trained_model, to_grey
from ranray.model_store import save_pyfunc
from ranray.prediction import predict
from ranray.pretrained import DEFAULT_MODEL, SHIPPED

SHIPPED_MODEL = SHIPPED[DEFAULT_MODEL]
MODEL_DIR = SHIPPED_MODEL.folder
WEIGHTS = SHIPPED_MODEL.weights
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
    assert (m.backbone, m.input_size, m.variant, m.num_regions, m.region_features) == (
        "iresnet_tiny", 64, "ran", 6, "pooled")


def test_the_data_card_names_the_real_data(trained):
    card = trained.data
    assert (card["source"], card["synthetic"], card["label_mode"]) == ("ferplus", False, "majority")
    assert card["label_files"] == LABEL_SHA256
    assert card["align_template"] == "fer2013"
    assert card["rows"] == {"train": 25045, "val": 3191, "test": 3137}
    measured = SHIPPED_MODEL.figures
    assert measured["test_samples"] == 3137 and measured["test_accuracy"] > 0.81  # 81.19% as trained
    assert min(measured[f"test_acc_{s}"] for s in ("occlusion", "pose30", "pose45")) > 0.75


def test_the_model_card_says_how_it_was_trained_and_what_a_photo_goes_through(trained):
    card = SHIPPED_MODEL.card
    assert card["name"] == DEFAULT_MODEL and card["protocol"].startswith("clean")
    assert card["training"]["command"].startswith("ranray train --config jobs/ferplus_cpu.yaml")
    assert card["training"]["seconds"] > 0
    recipe = trained.preprocessing
    # FER2013's faces are grey: photographs are made grey, aligned to FER2013's frame, as in training.
    assert (recipe.colour, recipe.align_template, recipe.aligned_size, recipe.input_size) == (
        "grey", "fer2013", 112, 64)
    assert (recipe.mean, recipe.std) == (127.5, 127.5)


def test_ranray_models_names_the_shipped_model_with_its_figures(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    figures = SHIPPED_MODEL.figures
    assert f"{DEFAULT_MODEL} (default)" in out
    assert f"{100 * figures['test_accuracy']:.2f}%" in out and f"{100 * figures['test_acc_occlusion']:.2f}%" in out
    assert "colour                        grey" in out
    assert main(["models", "no_such_model"]) == 2


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


def test_predict_uses_the_shipped_model_when_no_model_is_given(tmp_path, capsys):
    photo = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(photo)
    assert main(["predict", str(photo), "--json"]) == 0
    (face,) = json.loads(capsys.readouterr().out)
    assert face["label"] == "happiness"


def test_a_colour_face_is_seen_grey_as_the_training_faces_were(trained):
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
    grey = np.asarray(Image.fromarray(colour).convert("L").convert("RGB"))
    (a,), (b,) = classify_aligned(trained, face_tensor(colour)), classify_aligned(trained, face_tensor(grey))
    # PIL rounds its luma to integers; the model's luma is exact: the same up to that rounding.
    assert max(abs(a.probabilities[c] - b.probabilities[c]) for c in trained.class_names) < 5e-3


@pytest.fixture(scope="module")
def faces_8_classes(tmp_path_factory):
    """A prepared test split of 16 faces in FERPlus's 8 classes, and its faces as arrays."""
    root = write_dataset(tmp_path_factory.mktemp("faces8") / "ds", {"test": 16}, num_classes=8)
    rows = [r for shard in sorted((root / "test").glob("*.parquet")) for r in pq.read_table(shard).to_pylist()]
    faces = np.stack([np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in rows])
    return root, faces, [r["label"] for r in rows]


def test_predict_evaluate_and_the_mlflow_model_agree_on_the_same_faces(trained, faces_8_classes, tmp_path):
    import mlflow

    root, faces, labels = faces_8_classes
    classified = classify_aligned(trained, faces_tensor(faces))  # what predict runs on every aligned face
    pyfunc = mlflow.pyfunc.load_model(str(save_pyfunc(WEIGHTS, tmp_path / "pyfunc")))
    served = pyfunc.predict(faces)
    assert [r["probabilities"] for r in served] == [r.probabilities for r in classified]
    assert [r["label"] for r in served] == [r.label for r in classified]
    report = evaluate(None, root, "test", out_dir=tmp_path / "eval", progress=False)  # the shipped model
    assert report.checkpoint == str(WEIGHTS)
    confusion = np.zeros((8, 8), dtype=int)
    for label, r in zip(labels, classified):
        confusion[label, trained.class_names.index(r.label)] += 1
    assert report.confusion == confusion.tolist()
    # evaluate's loss is the cross-entropy of these faces' probabilities unrounded: it saw them grey too
    with torch.no_grad():
        logits = trained.net(to_grey(faces_tensor(faces))).logits.float()
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(labels)).item()
    assert report.metrics["test_loss"] == pytest.approx(loss, rel=1e-5)


def test_ranray_evaluate_uses_the_shipped_model_when_no_model_is_given(faces_8_classes, tmp_path, capsys,
                                                                      monkeypatch):
    root, _, _ = faces_8_classes
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--data", str(root)]) == 0
    assert f"with {WEIGHTS}" in capsys.readouterr().out
    # Its report goes to ./eval_test: the package's folder is not the user's to write into.
    assert (tmp_path / "eval_test" / "eval_test.json").is_file() and not (MODEL_DIR / "eval_test").exists()
