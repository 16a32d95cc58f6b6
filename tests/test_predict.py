"""`ranray predict` on real photographs: scikit-image's astronaut (Eileen Collins, a frontal face)
through the default HOG detector, a photograph without a face, a missing file, a file that is not
an image, and several images in one call with bad ones among them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from train_fixtures import NUM_CLASSES, tiny_config

from ranray.cli import main
from ranray.config import CLASS_NAMES
from ranray.prediction import ANNOTATION_COLOUR
from ranray.train.checkpoint import export_model

# The astronaut's face in the 512 x 512 picture (looked up by eye: brow to chin, ear to ear);
# dlib's HOG box must sit on it.
FACE = (172, 70, 268, 170)


@pytest.fixture(scope="module")
def model(tmp_path_factory, data_dir) -> Path:
    """An exported (untrained) tiny RAN: prediction's plumbing does not need a good one."""
    from ranray.models import build_ran

    root = tmp_path_factory.mktemp("predict")
    # The untrained model's class decides the label's width: seed 0 (not the suite's RNG state), at
    # the input size the plate check below was measured with.
    cfg = tiny_config(data_dir, root / "runs", "predict", "model.input_size=112")
    torch.manual_seed(0)
    path, _ = export_model(build_ran(cfg.model).state_dict(), cfg, root / "model" / "best.pt")
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("photos")
    files = {"astronaut": root / "astronaut.png", "coffee": root / "coffee.jpg", "notes": root / "notes.jpg"}
    Image.fromarray(data.astronaut()).save(files["astronaut"])
    Image.fromarray(data.coffee()).save(files["coffee"])
    files["notes"].write_text("a text file with an image's name\n")
    return files


def predict_json(capsys, *args: str) -> tuple[int, list[dict], str]:
    code = main(["predict", "--json", *args])
    out = capsys.readouterr()
    return code, json.loads(out.out), out.err


def test_astronaut_face_is_found_classified_and_drawn(model, photos, tmp_path, capsys):
    code, faces, err = predict_json(capsys, "--model", str(model), "--out", str(tmp_path), str(photos["astronaut"]))
    assert code == 0, err
    (face,) = faces
    x0, y0, x1, y1 = face["box"]
    assert max(abs(a - b) for a, b in zip((x0, y0, x1, y1), FACE)) <= 12, face["box"]
    assert face["image"] == str(photos["astronaut"]) and not face["fallback"]
    probs = face["probabilities"]
    assert list(probs) == list(CLASS_NAMES[:NUM_CLASSES]) and sum(probs.values()) == pytest.approx(1.0, abs=1e-3)
    assert face["label"] == max(probs, key=probs.get)
    assert [a["region"] for a in face["attention"]] == ["whole face", "top-left", "top-right"]
    assert all(0.0 < a["mu"] < 1.0 and 0.0 < a["nu"] < 1.0 for a in face["attention"])
    assert face["attention"][0]["box"] == [0.0, 0.0, 112.0, 112.0]

    # The annotated picture: the input, with the red box on the face and the label above it.
    drawn = np.asarray(Image.open(tmp_path / "astronaut_ran.png").convert("RGB")).astype(int)
    original = data.astronaut().astype(int)
    assert drawn.shape == original.shape
    red = np.all(drawn == ANNOTATION_COLOUR, axis=2)
    bx0, by0, bx1, by1 = (round(v) for v in face["box"])
    assert red[by0:by1, bx0].mean() > 0.9 and red[by0:by1, bx1].mean() > 0.9  # the box's sides
    assert red[by0 - 12:by0 - 2, bx0 + 2:bx0 + 40].mean() > 0.4  # the label's red plate above the box
    changed = np.any(drawn != original, axis=2)
    ys, xs = np.nonzero(changed)
    assert ys.min() >= by0 - 40 and ys.max() <= by1 + 40 and xs.min() >= bx0 - 3 and xs.max() <= bx1 + 200
    assert changed.mean() < 0.1  # the rest of the photograph is untouched
    assert "annotated image" in err


def test_a_photograph_without_a_face_exits_nonzero_saying_so(model, photos, capsys):
    code, faces, err = predict_json(capsys, "--model", str(model), str(photos["coffee"]))
    assert code == 1 and faces == []
    assert f"no face found in {photos['coffee']}" in err


@pytest.mark.parametrize("name, message", [("missing.jpg", "no such file"), ("notes", "is not an image")])
def test_missing_and_non_image_files_get_their_own_message(model, photos, tmp_path, capsys, name, message):
    path = photos.get(name, tmp_path / name)
    code, faces, err = predict_json(capsys, "--model", str(model), str(path))
    assert code == 1 and faces == []
    assert f"ranray predict: {path}" in err and message in err
    assert "Traceback" not in err


def test_several_images_with_bad_ones_still_give_the_good_results(model, photos, tmp_path, capsys):
    second = tmp_path / "astronaut_small.jpg"
    Image.fromarray(data.astronaut()).resize((384, 384)).save(second)
    missing = tmp_path / "gone.png"
    code, faces, err = predict_json(capsys, "--model", str(model), str(photos["astronaut"]), str(missing),
                                    str(photos["coffee"]), str(photos["notes"]), str(second))
    assert code == 1
    assert [f["image"] for f in faces] == [str(photos["astronaut"]), str(second)]
    small = np.array(faces[1]["box"]) * 512 / 384
    assert np.abs(small - np.array(faces[0]["box"])).max() <= 12  # the same face, found at both sizes
    for bad, message in ((missing, "no such file"), (photos["coffee"], "no face found in"),
                         (photos["notes"], "is not an image")):
        assert any(str(bad) in line and message in line for line in err.splitlines()), (bad, err)


def test_a_model_that_is_not_there_is_refused_before_any_image(photos, tmp_path, capsys):
    assert main(["predict", "--model", str(tmp_path / "nope.pt"), str(photos["astronaut"])]) == 2
    assert "no model at" in capsys.readouterr().err
