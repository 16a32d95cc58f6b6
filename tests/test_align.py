"""dlib alignment: geometry conventions, a real photograph, synthetic faces, rejects and fallbacks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ranray.data.align import (TEMPLATE_112, TEMPLATES, AlignOptions, FaceAligner, five_points, similarity,
                               transform, warp)
from ranray.data.sources import RowReject
from ranray.data.synth import Sample, SynthOptions, draw, sample_spec


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())  # NASA portrait of Eileen Collins: a real face


@pytest.fixture(scope="module")
def hog() -> FaceAligner:
    return FaceAligner(AlignOptions(detector="hog"))


@pytest.fixture(scope="module")
def given() -> FaceAligner:
    return FaceAligner(AlignOptions(detector="given"))


def test_warp_puts_pixel_index_p_at_matrix_p():
    img = np.zeros((64, 64, 3), np.uint8)
    img[20, 10] = 255  # row 20, column 10: the point (10, 20)
    m = np.array([[2.0, 0.0, 5.0], [0.0, 2.0, 3.0]])
    out = np.asarray(warp(Image.fromarray(img), m, 112)).astype(float)[..., 0]
    ys, xs = np.nonzero(out)
    w = out[ys, xs]
    centroid = np.array([(xs * w).sum(), (ys * w).sum()]) / w.sum()
    assert centroid == pytest.approx(transform(m, np.array([[10.0, 20.0]]))[0], abs=0.05)


def test_similarity_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    a, s = 0.3, 1.7
    true = np.array([[s * np.cos(a), -s * np.sin(a), 4.0], [s * np.sin(a), s * np.cos(a), -7.0]])
    assert similarity(src, transform(true, src)) == pytest.approx(true, abs=1e-9)


def test_astronaut_eyes_land_on_the_template(hog, astronaut):
    face = hog.align(astronaut)
    assert face.image.size == (112, 112) and not face.fallback
    pts = five_points(face.landmarks)
    eye_error = np.linalg.norm(pts[:2] - TEMPLATE_112[:2], axis=1)
    assert eye_error.max() < 5.0, eye_error  # a smiling face: the 5-point fit trades eyes for mouth
    assert np.linalg.norm(pts - TEMPLATE_112, axis=1).max() < 8.0


def test_the_fer2013_template_frames_the_face_tighter(astronaut):
    """The same face, aligned to each template: the points land on the chosen one, and the tighter
    FER2013 frame shows it larger (eyes further apart) with less of the frame outside the photo."""
    faces = {t: FaceAligner(AlignOptions(detector="hog", template=t)).align(astronaut) for t in TEMPLATES}
    for t, face in faces.items():
        assert np.linalg.norm(five_points(face.landmarks) - TEMPLATES[t], axis=1).max() < 8.0, t
    iod = {t: np.linalg.norm(np.subtract(*five_points(f.landmarks)[:2])) for t, f in faces.items()}
    assert iod["fer2013"] / iod["insightface"] == pytest.approx(41.51 / 35.24, rel=0.03)
    with pytest.raises(ValueError, match="unknown alignment template 'arcface'.*insightface, fer2013"):
        FaceAligner(AlignOptions(template="arcface"))


def test_cnn_detector_agrees_with_hog(hog, astronaut):
    cnn = FaceAligner(AlignOptions(detector="cnn", upsample=0))  # mmod on a CPU: keep the image small
    assert np.abs(five_points(cnn.align(astronaut).landmarks) - five_points(hog.align(astronaut).landmarks)).max() < 3.0


def test_given_box_mode_on_a_face_crop(given, hog, astronaut):
    detected = hog.align(astronaut)
    # A loose crop around the face, as face-crop datasets ship them; no detector runs.
    crop = astronaut.crop((150, 40, 300, 200))
    face = given.align(crop)
    assert not face.fallback
    assert np.abs(five_points(face.landmarks) - five_points(detected.landmarks)).max() < 4.0


def test_dlib_finds_the_synthetic_faces(given):
    """The predictor lands on drawn 48x48 faces close to their ground-truth landmarks."""
    opts = SynthOptions(seed=5, occlusion_frac=0.0, large_pose_frac=0.0)
    errors = []
    for i in range(16):
        img, truth = draw(Sample("k", "train", i % 8, sample_spec(opts, i, i % 8)), 48)
        face = given.align(img.convert("L"))
        truth_aligned = transform(face.matrix, five_points(truth))
        errors.append(np.linalg.norm(five_points(face.landmarks) - truth_aligned, axis=1).mean())
    iod = np.linalg.norm(TEMPLATE_112[1] - TEMPLATE_112[0])
    assert np.mean(errors) / iod < 0.2, errors


def test_no_face_is_a_reject(hog):
    with pytest.raises(RowReject) as err:
        hog.align(Image.new("RGB", (200, 200), (128, 128, 128)))
    assert err.value.reason == "no_face"


def test_given_box_outside_the_image_is_a_reject(given, astronaut):
    with pytest.raises(RowReject) as err:
        given.align(astronaut, box=(600, 600, 700, 700))
    assert err.value.reason == "bad_box"


def test_implausible_fit_falls_back_in_given_mode_and_rejects_with_a_detector(astronaut):
    # No real fit has a zero residual: every fit counts as implausible.
    strict = dict(max_residual=0.0)
    crop = astronaut.crop((150, 40, 300, 200))
    face = FaceAligner(AlignOptions(detector="given", **strict)).align(crop)
    assert face.fallback and "residual" in face.detail and face.image.size == (112, 112)
    # The fallback treats the crop as a detector box around dlib's mean face: a sane, centred face.
    assert np.abs(five_points(face.landmarks) - TEMPLATE_112).max() < 1.0
    with pytest.raises(RowReject) as err:
        FaceAligner(AlignOptions(detector="given", fallback=False, **strict)).align(crop)
    assert err.value.reason == "landmark_implausible"
    with pytest.raises(RowReject) as err:
        FaceAligner(AlignOptions(detector="hog", **strict)).align(astronaut)
    assert err.value.reason == "landmark_implausible" and "residual" in err.value.detail
