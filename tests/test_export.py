"""`ranray export --onnx`: the whole RAN as one ONNX graph with a dynamic batch, its card and recipe in
the metadata, equal to torch in onnxruntime on real faces (the shipped model and freshly trained tiny
ones, both region_features modes), and a checkpoint that does not verify refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from skimage import data
from train_fixtures import tiny_config

from ranray.cli import main
from ranray.data.schema import FACE_SIZE, PIXEL_MEAN, PIXEL_STD
from ranray.export import (META_MODEL_CARD, META_MODEL_CARD_MD, META_PREPROCESSING, META_VERSION,
                           META_WEIGHTS_SHA256, OUTPUTS, TOLERANCE, OnnxMismatch, check_onnx, dataset_faces,
                           export_onnx, exported, output_error, photo_faces, read_metadata)
from ranray.train.checkpoint import read_manifest
from ranray.inference import classify_aligned, load_trained_model
from ranray.pretrained import shipped_weights
from ranray.train.launch import run_training

SHIPPED = shipped_weights()


@pytest.fixture(scope="module")
def shipped():
    return load_trained_model(SHIPPED)


def astronaut(trained):
    return photo_faces(trained, [("astronaut", Image.fromarray(data.astronaut()))])


def run_onnx(path: Path, trained, images: torch.Tensor, landmarks: torch.Tensor) -> tuple[dict, dict]:
    """onnxruntime's and torch's outputs, by name."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"images": images.numpy()}
    if trained.uses_landmarks:
        feeds["landmarks"] = landmarks.numpy()
    got = dict(zip(OUTPUTS, session.run(list(OUTPUTS), feeds)))
    with torch.no_grad():
        expected = exported(trained)(images, landmarks if trained.uses_landmarks else None)
    return got, {name: e.numpy() for name, e in zip(OUTPUTS, expected)}


def assert_within_tolerance(got: dict, expected: dict) -> None:
    for name in OUTPUTS:
        assert got[name].shape == expected[name].shape, name
        assert output_error(name, got[name], expected[name]) <= TOLERANCE[name], name
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-3, err_msg=name)
    np.testing.assert_array_equal(got["probabilities"].argmax(1), expected["probabilities"].argmax(1))


# ---------------------------------------------------------------------------------------------
# The shipped model
# ---------------------------------------------------------------------------------------------


def test_the_shipped_model_exports_with_its_card_and_recipe(shipped, data_dir, tmp_path):
    faces = astronaut(shipped) + dataset_faces(data_dir, "test", 4)
    report = export_onnx(shipped, tmp_path / "ran.onnx", faces)
    assert report.check.batches == [1, 5] and report.check.faces == 5
    assert all(report.check.max_error[k] <= TOLERANCE[k] for k in OUTPUTS)
    assert report.inputs == ["images"] and report.outputs == list(OUTPUTS)

    meta = read_metadata(report.path)
    recipe = json.loads(meta[META_PREPROCESSING])
    assert recipe["input_size"] == [FACE_SIZE, FACE_SIZE] and recipe["region_input_size"] == 64
    assert recipe["mean"] == [PIXEL_MEAN] * 3 and recipe["std"] == [PIXEL_STD] * 3
    assert recipe["class_names"] == list(shipped.class_names) and recipe["align_template"] == "fer2013"
    assert recipe["channels"] == "RGB" and recipe["colour"] == "grey" and len(recipe["regions"]) == 6
    card = json.loads(meta[META_MODEL_CARD])
    assert card["data_card"] == shipped.data and card["model"]["backbone"] == "iresnet_tiny"
    assert meta[META_WEIGHTS_SHA256] == read_manifest(SHIPPED)["sha256"] == report.weights_sha256
    assert meta[META_VERSION] and meta[META_MODEL_CARD_MD].startswith("# ferplus_ran_pooled")

    graph = onnx.load(str(report.path)).graph
    assert [i.name for i in graph.input] == ["images"]
    assert [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [
        "batch", 3, FACE_SIZE, FACE_SIZE]

    # The smiling astronaut through onnxruntime: torch's answer, happiness.
    smile = astronaut(shipped)
    got, expected = run_onnx(report.path, shipped, smile.images, smile.landmarks)
    assert_within_tolerance(got, expected)
    assert shipped.class_names[int(got["probabilities"][0].argmax())] == "happiness"
    # ...and predict's: the graph makes the face grey as classify_aligned does for this model.
    (predicted,) = classify_aligned(shipped, smile.images)
    assert [round(float(p), 4) for p in got["probabilities"][0]] == pytest.approx(
        [predicted.probabilities[c] for c in shipped.class_names], abs=2e-4)
    assert got["self_attention"].shape == got["relation_attention"].shape == (1, 6)


def test_an_export_that_disagrees_with_its_model_is_reported_by_output(shipped, tmp_path):
    faces = astronaut(shipped)
    report = export_onnx(shipped, tmp_path / "ran.onnx", faces)
    other = load_trained_model(SHIPPED)
    with torch.no_grad():
        other.net.classifier.bias += 0.01
    with pytest.raises(OnnxMismatch, match=r"the graph's output logits differs from torch by \d\.\d\de-0[34] of the "
                                           r"largest \|logit\| at batch 1 \(tolerance 1e-04\)"):
        check_onnx(other, report.path, faces)


def test_the_cli_exports_the_shipped_model_by_default(tmp_path, capsys):
    out = tmp_path / "sub" / "shipped.onnx"
    assert main(["export", "--onnx", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert f"-> {out} (opset 17" in stdout and "scikit-image's astronaut" in stdout
    assert read_metadata(out)[META_WEIGHTS_SHA256] == read_manifest(SHIPPED)["sha256"]
    assert [p.name for p in out.parent.iterdir()] == ["shipped.onnx"]  # no temp file left


def test_a_tampered_checkpoint_is_refused_naming_the_file(tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(SHIPPED.parent, model)
    weights = model / "best.pt"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 8] = bytes(b ^ 0xFF for b in raw[len(raw) // 2: len(raw) // 2 + 8])
    weights.write_bytes(bytes(raw))
    out = tmp_path / "tampered.onnx"
    assert main(["export", "--model", str(weights), "--onnx", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(weights) in err[0] and "corrupt: sha256" in err[0], err
    assert not out.exists()


def test_a_photo_without_a_face_is_refused_by_name(tmp_path, capsys):
    blank = tmp_path / "blank.png"
    Image.new("RGB", (200, 200), (128, 128, 128)).save(blank)
    out = tmp_path / "x.onnx"
    assert main(["export", "--onnx", str(out), "--faces", str(blank)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ranray export: no face found in {blank} (HOG detector, as `ranray predict` runs it)"]
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# A freshly trained tiny model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("features,region_mode", [("crops", "fixed"), ("pooled", "landmark")])
def test_a_freshly_trained_tiny_model_exports_with_a_dynamic_batch(features, region_mode, data_dir, tmp_path,
                                                                   capsys):
    cfg = tiny_config(data_dir, tmp_path / "runs", f"onnx_{features}", "scaling.num_workers=1", "epochs=1",
                      f"model.region_features={features}", f"model.region_mode={region_mode}")
    run = run_training(cfg, runtime="local")
    out = tmp_path / "tiny.onnx"
    assert main(["export", "--model", str(run.run_dir), "--onnx", str(out)]) == 0
    assert f"from {data_dir} (test)" in capsys.readouterr().out  # checked on its own test faces too

    trained = load_trained_model(run.run_dir)
    assert trained.cfg.model.region_features == features
    recipe = json.loads(read_metadata(out)[META_PREPROCESSING])
    assert recipe["inputs"] == (["images", "landmarks"] if region_mode == "landmark" else ["images"])
    assert recipe["class_names"] == list(trained.class_names) and recipe["region_features"] == features
    faces = dataset_faces(data_dir, "test", 5) + astronaut(trained)
    for batch in (1, 5):
        got, expected = run_onnx(out, trained, faces.images[:batch], faces.landmarks[:batch])
        assert got["logits"].shape == (batch, len(trained.class_names))
        assert got["self_attention"].shape == (batch, 3)
        assert_within_tolerance(got, expected)
    # The trained model tells the fixture's classes apart, and so does its export.
    assert len({int(p.argmax()) for p in got["probabilities"]}) > 1
