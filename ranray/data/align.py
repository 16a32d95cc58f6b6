"""dlib face detection, 68 landmarks and 5-point similarity alignment to the insightface 112x112 face.

FaceAligner holds the dlib models; build one per process (Ray Data actors hold one each) and call
`align(image, box=None, hint=None)`. It returns an Aligned face or raises RowReject with a reason.

Detectors (AlignOptions.detector):
  hog    dlib's HOG frontal face detector; the largest face wins.
  cnn    dlib's CNN (mmod) detector: slower on a CPU, finds more profile and small faces.
  given  no detection: the image is a face crop (FER2013, RAF-DB aligned) or the row gives a face
         box (AffectNet); the landmark model runs inside that box.

Landmark fits are checked before they are trusted (`fit_problem`): the fitted face must keep to the
box it started from (size and position), be upright within 45 degrees, and its five points must
fit the template's shape. In detector modes a failed check rejects the row ("landmark_implausible").
In given mode the row is kept with a *fallback* alignment instead and flagged FLAG_ALIGN_FALLBACK:
the box is treated as a detector box around an average face (dlib's mean shape), or the row's own
landmarks (AffectNet's) are used when they pass the check. Why keep them: a benchmark's test set is
defined by its labels, not by our aligner, so dropping rows would make FERPlus or AffectNet test
figures incomparable; the flag lets training or evaluation exclude them, and the manifest counts them.

Coordinates are dlib's and the template's: pixel indices, pixel i's centre at i (as cv2.warpAffine,
which insightface aligns with). Landmarks in the output are in the aligned 112x112 face.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ranray.data.schema import FACE_SIZE, NUM_LANDMARKS
from ranray.data.sources.common import RowReject

# insightface's arcface_dst: eye centres, nose tip, mouth corners in a 112x112 face (image left first).
# Framed for face recognition: the eyes 31% of the frame apart, forehead and chin included.
TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                         [41.5493, 92.3655], [70.7299, 92.2041]])
TEMPLATE_IOD = float(np.linalg.norm(TEMPLATE_112[1] - TEMPLATE_112[0]))
# Where FER2013's own 48x48 crops put the face: the mean 5 points of dlib's fits on 2,990 random
# FER2013Train faces, mapped to 112 pixels (pixel centres kept) and made left-right symmetric. The
# crops are tighter than the insightface frame (eyes 37% of the side apart, higher up): warped to
# insightface's template a FER face shrank to 0.84 of the frame and the median aligned face was 31%
# black padding (docs/REAL_FACES.md); warped to this one the crop keeps its own framing and only
# each face's own tilt and offset is corrected.
TEMPLATE_FER2013_112 = np.array([[34.75, 41.21], [76.26, 41.21], [55.5, 64.08],
                                 [37.91, 85.84], [73.09, 85.84]])
TEMPLATES = {"insightface": TEMPLATE_112, "fer2013": TEMPLATE_FER2013_112}
PREDICTOR_68 = "shape_predictor_68_face_landmarks.dat"
CNN_DETECTOR = "mmod_human_face_detector.dat"


def model_path(name: str) -> Path:
    """A dlib model file shipped by face-recognition-models.

    Found through importlib's spec, without importing the package: its __init__ needs
    pkg_resources, which current setuptools no longer provides.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("face-recognition-models is not installed (pip install face-recognition-models)")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    if not path.is_file():
        raise RuntimeError(f"dlib model {name} not found at {path}")
    return path


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """Eye centres, nose tip and mouth corners from 68 iBUG points, in the template's order."""
    lm = np.asarray(landmarks, dtype=np.float64).reshape(NUM_LANDMARKS, 2)
    return np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]])


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The least-squares similarity (rotation, uniform scale, translation) src -> dst, as a 2x3 matrix.

    Umeyama (1991); a reflection is never returned.
    """
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    u, sv, vt = np.linalg.svd(d.T @ s / len(src))
    sign = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rot = u @ sign @ vt
    scale = float((sv * np.diag(sign)).sum() / ((s ** 2).sum() / len(src)))
    return np.hstack([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]])


def transform(matrix: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ matrix[:, :2].T + matrix[:, 2]


def warp(image: Image.Image, matrix: np.ndarray, size: int = FACE_SIZE) -> Image.Image:
    """Warp so that input pixel index p lands at matrix @ p (cv2.warpAffine's meaning).

    PIL samples at pixel centres in continuous coordinates (pixel i spans [i, i+1)), so the
    index-space matrix is shifted by half a pixel on both sides before inverting.
    """
    a = matrix[:, :2]
    t = matrix[:, 2] + 0.5 - a @ np.array([0.5, 0.5])
    inv = np.linalg.inv(a)
    coeffs = np.hstack([inv, (-inv @ t)[:, None]]).ravel()
    return image.transform((size, size), Image.Transform.AFFINE, tuple(coeffs),
                           resample=Image.Resampling.BICUBIC, fillcolor=0)


def roll_degrees(matrix: np.ndarray) -> float:
    return math.degrees(math.atan2(matrix[1, 0], matrix[0, 0]))


# ---------------------------------------------------------------------------------------------
# Aligner
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlignOptions:
    detector: str = "hog"  # hog | cnn | given
    template: str = "insightface"  # a key of TEMPLATES: where the five points land
    size: int = FACE_SIZE
    upsample: int = -1  # detector upsampling; -1: once for images under 800 px, else none
    min_box_px: int = 160  # small crops are upscaled until the face box is this big for the predictor
    refits: int = 1  # re-run the predictor in a box re-centred on its own fit (framing-independent)
    fallback: bool = True  # given mode: an implausible fit falls back (flagged) instead of a reject
    # Plausibility limits of a fit, relative to the box the predictor started from. Measured on
    # clean, occluded and 45-55 degree yaw synthetic faces (all well inside) and real photographs.
    box_scale: tuple[float, float] = (0.4, 1.4)
    max_offset: float = 0.35  # of the box side, per axis
    max_roll: float = 45.0  # degrees
    max_residual: float = 0.3  # mean 5-point distance to the template after alignment, in IODs


@dataclass
class Aligned:
    image: Image.Image  # RGB, size x size
    landmarks: np.ndarray  # (68, 2) float32 in aligned pixel coordinates
    matrix: np.ndarray  # 2x3, input pixel indices -> aligned pixel indices
    fallback: bool  # given mode only: the fit failed its check and the fallback alignment was used
    detail: str = ""  # why the fallback was used


Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixel indices


class FaceAligner:
    def __init__(self, options: AlignOptions = AlignOptions()):
        import dlib

        if options.template not in TEMPLATES:
            raise ValueError(f"unknown alignment template '{options.template}'; known: {', '.join(TEMPLATES)}")
        self.options = options
        self._dlib = dlib
        self._predictor = _load(dlib.shape_predictor, PREDICTOR_68)
        self._detect = DETECTORS[options.detector](dlib)
        self._mean_shape = self._predictor_mean_shape()

    def _predictor_mean_shape(self) -> np.ndarray:
        """dlib's starting shape in unit-box coordinates.

        On a featureless image every split of the regression trees sees equal pixels, so the
        predictor returns (very nearly) its mean shape: where a face sits in a detector box.
        """
        side = 200
        flat = np.full((side, side), 128, dtype=np.uint8)
        return self._fit(flat, (0, 0, side - 1, side - 1)) / (side - 1)

    # -- public ------------------------------------------------------------------------------

    def align(self, image: Image.Image, box: Box | None = None, hint: np.ndarray | None = None) -> Aligned:
        """Align the largest face (or the face in `box`); RowReject when there is none."""
        gray = np.asarray(image.convert("L"))
        start = self._detect(gray, box, self._upsample(gray))
        lm, problem = self._landmarks(gray, start)
        fallback_detail = ""
        if problem:
            if self.options.detector != "given" or not self.options.fallback:
                raise RowReject("landmark_implausible", problem)
            lm, fallback_detail = self._fallback(start, hint, problem)
        matrix = similarity(five_points(lm), TEMPLATES[self.options.template] * self.options.size / FACE_SIZE)
        face = warp(image.convert("RGB"), matrix, self.options.size)
        return Aligned(image=face, landmarks=transform(matrix, lm).astype(np.float32), matrix=matrix,
                       fallback=bool(problem), detail=fallback_detail)

    # -- steps -------------------------------------------------------------------------------

    def _upsample(self, gray: np.ndarray) -> int:
        if self.options.upsample >= 0:
            return self.options.upsample
        return 1 if max(gray.shape) < 800 else 0

    def _landmarks(self, gray: np.ndarray, start: Box) -> tuple[np.ndarray, str]:
        """Fit, re-centre the box on the fit and fit again; return the fit and its problem, if any.

        The predictor works on a window around the box (so a small face in a large photo costs
        what a crop costs), upscaled until the box is min_box_px wide: dlib samples single pixels,
        and a 48-pixel face gives it too few.
        """
        x0, y0 = _window(gray.shape, start)
        window = gray[y0:_window_end(gray.shape[0], start[1], start[3]),
                      x0:_window_end(gray.shape[1], start[0], start[2])]
        scale = max(1, math.ceil(self.options.min_box_px / _side(start)))
        big = _upscale(window, scale) if scale > 1 else window
        local = (start[0] - x0, start[1] - y0, start[2] - x0, start[3] - y0)
        lm = self._fit(big, _scale_box(local, scale))
        for _ in range(self.options.refits):
            lm = self._fit(big, self._box_for(lm))
        lm = (lm + 0.5) / scale - 0.5 + np.array([x0, y0])  # back to the image's pixel indices
        return lm, self.fit_problem(lm, start)

    def _fit(self, gray: np.ndarray, box: Box) -> np.ndarray:
        rect = self._dlib.rectangle(*(int(round(v)) for v in box))
        shape = self._predictor(gray, rect)
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)

    def _box_for(self, lm: np.ndarray) -> Box:
        """The box in which dlib's mean shape best overlays this fit (scale and position only)."""
        mean5, fit5 = five_points(self._mean_shape), five_points(lm)
        m = similarity(mean5, fit5)
        side = math.hypot(m[0, 0], m[1, 0])
        x0, y0 = fit5.mean(0) - side * mean5.mean(0)
        return (x0, y0, x0 + side, y0 + side)

    def fit_problem(self, lm: np.ndarray, start: Box) -> str:
        """"" for a plausible fit, else what is wrong with it."""
        o = self.options
        side = max(start[2] - start[0], 1.0)
        fit_box = self._box_for(lm)
        ratio = (fit_box[2] - fit_box[0]) / side
        dx = ((fit_box[0] + fit_box[2]) - (start[0] + start[2])) / 2 / side
        dy = ((fit_box[1] + fit_box[3]) - (start[1] + start[3])) / 2 / side
        pts5 = five_points(lm)
        m = similarity(pts5, TEMPLATE_112)
        residual = float(np.linalg.norm(transform(m, pts5) - TEMPLATE_112, axis=1).mean() / TEMPLATE_IOD)
        checks = {
            f"face size {ratio:.2f} of the box": not o.box_scale[0] <= ratio <= o.box_scale[1],
            f"face off the box centre by ({dx:.2f}, {dy:.2f})": max(abs(dx), abs(dy)) > o.max_offset,
            f"roll {roll_degrees(m):.0f} deg": abs(roll_degrees(m)) > o.max_roll,
            f"5-point residual {residual:.2f} IOD": residual > o.max_residual,
        }
        return "; ".join(what for what, bad in checks.items() if bad)

    def _fallback(self, start: Box, hint: np.ndarray | None, problem: str) -> tuple[np.ndarray, str]:
        if hint is not None and len(hint) == 2 * NUM_LANDMARKS:
            given = np.asarray(hint, dtype=np.float64).reshape(NUM_LANDMARKS, 2)
            if not self.fit_problem(given, start):
                return given, f"{problem}; used the row's own landmarks"
        x0, y0, x1, y1 = start
        side = max(x1 - x0, y1 - y0)
        return self._mean_shape * side + np.array([x0, y0]), f"{problem}; used the box's mean-shape alignment"


WINDOW_MARGIN = 0.5  # of the box side, around the box: room for the re-fit to move


def _side(box: Box) -> float:
    return max(box[2] - box[0], 1.0)


def _window(shape: tuple[int, ...], box: Box) -> tuple[int, int]:
    """Top-left corner of the predictor's window (inside the image)."""
    m = WINDOW_MARGIN * _side(box)
    return max(0, int(math.floor(box[0] - m))), max(0, int(math.floor(box[1] - m)))


def _window_end(limit: int, lo: float, hi: float) -> int:
    """Exclusive end of the window along one axis (inside the image)."""
    return min(limit, int(math.ceil(hi + WINDOW_MARGIN * max(hi - lo, 1.0))) + 1)


@lru_cache(maxsize=None)
def _load(kind, name: str):
    """A dlib model, loaded once per process (the 68-point predictor is 100 MB and takes seconds)."""
    return kind(str(model_path(name)))


def _upscale(gray: np.ndarray, k: int) -> np.ndarray:
    h, w = gray.shape
    return np.asarray(Image.fromarray(gray).resize((w * k, h * k), Image.Resampling.BICUBIC))


def _scale_box(box: Box, k: int) -> Box:
    """Pixel-index box in an image upscaled k times (pixel i's centre goes to (i + 0.5) k - 0.5)."""
    return tuple((v + 0.5) * k - 0.5 for v in box)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Detectors: (gray image, given box or None, upsample) -> the box the predictor starts from
# ---------------------------------------------------------------------------------------------

Detector = Callable[[np.ndarray, "Box | None", int], Box]


def _largest(rects, detector: str, up: int) -> Box:
    if len(rects) == 0:
        raise RowReject("no_face", f"the {detector} detector found no face (upsample {up})")
    r = max(rects, key=lambda r: r.width() * r.height())
    return (float(r.left()), float(r.top()), float(r.right()), float(r.bottom()))


def _hog(dlib) -> Detector:
    detector = dlib.get_frontal_face_detector()
    return lambda gray, box, up: _largest(detector(gray, up), "hog", up)


def _cnn(dlib) -> Detector:
    detector = _load(dlib.cnn_face_detection_model_v1, CNN_DETECTOR)

    def detect(gray, box, up):
        rgb = np.repeat(gray[:, :, None], 3, axis=2)  # the mmod network takes RGB
        return _largest([d.rect for d in detector(rgb, up)], "cnn", up)

    return detect


def _given(dlib) -> Detector:
    def given(gray, box, up):
        h, w = gray.shape
        if box is None:
            return (0.0, 0.0, float(w - 1), float(h - 1))
        x0, y0, x1, y1 = box
        # A box may reach past the border (AffectNet's do); it must still overlap the image.
        if x1 <= x0 or y1 <= y0 or x1 < 0 or y1 < 0 or x0 > w - 1 or y0 > h - 1:
            raise RowReject("bad_box", f"face box {tuple(round(v, 1) for v in box)} outside the {w}x{h} image")
        return (float(x0), float(y0), float(x1), float(y1))

    return given


DETECTORS: dict[str, Callable[..., Detector]] = {"hog": _hog, "cnn": _cnn, "given": _given}
