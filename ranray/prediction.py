"""Expressions of the faces in photos: dlib detection, alignment, the RAN, annotated images.

    predict(model, images)     per image: every face's box, class, probabilities, attention per
                               region (ranray.inference.classify_aligned on the face aligned by
                               ranray.data.align), or why the image gave none (missing, not an
                               image, no face); with out_dir, the image annotated
    annotate / format_prediction   the image with boxes and labels; a face's answer as text

dlib is imported when a photo's faces are detected, not with this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from ranray.inference import FaceResult, TrainedModel, classify_aligned, face_tensor, load_trained_model


@dataclass
class FacePrediction:
    image: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in the input image's pixels
    label: str
    probabilities: dict[str, float]
    attention: list[dict[str, Any]]  # per region: name, box (aligned face pixels), mu, nu
    fallback: bool = False  # the landmark fit was implausible and the box alignment was used


@dataclass
class ImageResult:
    """One input image: its faces, or why it gave none (`error`, a sentence naming the file)."""

    image: str
    faces: list[FacePrediction] = field(default_factory=list)
    error: str | None = None
    skipped: list[str] = field(default_factory=list)  # faces found but not aligned, with the reason
    annotated: str | None = None  # the image with boxes and labels drawn, when asked for


def detect_faces(gray: np.ndarray, detector: str) -> list[tuple[float, float, float, float]]:
    """Every face box dlib finds (the aligner itself keeps only the largest); given: the whole image."""
    import dlib

    h, w = gray.shape
    if detector == "given":
        return [(0.0, 0.0, float(w - 1), float(h - 1))]
    upsample = 1 if max(gray.shape) < 800 else 0
    if detector == "cnn":
        from ranray.data.align import CNN_DETECTOR, model_path

        net = dlib.cnn_face_detection_model_v1(str(model_path(CNN_DETECTOR)))
        rects = [d.rect for d in net(np.repeat(gray[:, :, None], 3, axis=2), upsample)]
    else:
        rects = list(dlib.get_frontal_face_detector()(gray, upsample))
    return [(float(r.left()), float(r.top()), float(r.right()), float(r.bottom())) for r in rects]


def open_image(path: str | Path) -> Image.Image:
    """The RGB image at `path`; FileNotFoundError / ValueError with a sentence naming the file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if p.is_dir():
        raise ValueError(f"{p} is a directory, not an image")
    try:
        with Image.open(p) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{p} is not an image this can read ({exc.__class__.__name__}: {exc})") from exc


def predict(checkpoint: str | Path | TrainedModel, images: Sequence[str | Path], *, detector: str = "hog",
            out_dir: str | Path | None = None, tracking_uri: str | None = None) -> list[ImageResult]:
    """Detect, align and classify every face of every image; with out_dir, write <name>_ran.png
    per image that has faces. An image that is missing, unreadable or has no face gets its error
    and the others still get their results."""
    trained = (checkpoint if isinstance(checkpoint, TrainedModel)
               else load_trained_model(checkpoint, tracking_uri=tracking_uri))
    aligner = face_aligner(trained)
    results = []
    for image_path in images:
        try:
            image = open_image(image_path)
        except (FileNotFoundError, ValueError) as exc:
            results.append(ImageResult(str(image_path), error=str(exc)))
            continue
        result = _predict_image(trained, aligner, image, str(image_path), detector)
        if result.faces and out_dir is not None:
            result.annotated = str(annotate(image, result.faces, Path(out_dir) / f"{Path(image_path).stem}_ran.png"))
        results.append(result)
    return results


def face_aligner(trained: TrainedModel) -> Any:
    """The aligner of photographs and video frames for `trained`: boxes come from detect_faces, it fits
    landmarks inside each ("given" mode) and puts the face where the model's training faces sat
    (their data card's template)."""
    from ranray.data.align import AlignOptions, FaceAligner

    return FaceAligner(AlignOptions(detector="given", template=trained.preprocessing.align_template))


@dataclass
class ImageFaces:
    """The faces of one image that aligned (model inputs, one row each) and, once classified as one
    batch, the model's answer for each."""

    boxes: list[tuple[float, ...]] = field(default_factory=list)
    images: torch.Tensor | None = None  # (N, 3, S, S) normalised (face_tensor); None when none aligned
    landmarks: torch.Tensor | None = None  # (N, 68, 2) aligned pixels
    fallbacks: list[bool] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # a box the landmark fit refused, and why
    results: list[FaceResult] = field(default_factory=list)


def align_faces(aligner: Any, image: Image.Image, boxes: Sequence[tuple[float, float, float, float]]) -> ImageFaces:
    """The face in every box of `image`, aligned as the model's training faces were (photos, video
    frames, and the faces an ONNX export is checked on)."""
    from ranray.data.sources.common import RowReject

    out, faces, landmarks = ImageFaces(), [], []
    for box in boxes:
        try:
            aligned = aligner.align(image, box=box)
        except RowReject as exc:
            out.skipped.append(f"face at {tuple(round(v) for v in box)} not aligned: {exc}")
            continue
        out.boxes.append(tuple(round(v, 1) for v in box))
        out.fallbacks.append(bool(aligned.fallback))
        faces.append(face_tensor(aligned.image))
        landmarks.append(torch.from_numpy(aligned.landmarks))
    if faces:
        out.images, out.landmarks = torch.cat(faces), torch.stack(landmarks)
    return out


def classify_faces(trained: TrainedModel, aligner: Any, image: Image.Image,
                   boxes: Sequence[tuple[float, float, float, float]]) -> ImageFaces:
    """Align the face in every box of `image` and classify them together (photos and video frames)."""
    out = align_faces(aligner, image, boxes)
    if out.boxes:
        out.results = classify_aligned(trained, out.images, out.landmarks)
    return out


def _predict_image(trained: TrainedModel, aligner: Any, image: Image.Image, name: str, detector: str) -> ImageResult:
    faces = classify_faces(trained, aligner, image, detect_faces(np.asarray(image.convert("L")), detector))
    result = ImageResult(name, skipped=faces.skipped)
    result.faces = [FacePrediction(image=name, box=box, label=face.label, probabilities=face.probabilities,
                                   attention=face.attention, fallback=fallback)
                    for box, face, fallback in zip(faces.boxes, faces.results, faces.fallbacks)]
    if not result.faces:
        hint = "" if detector == "given" else " (for face crops use --detector given)"
        result.error = f"no face found in {name}{hint}" + (f"; {'; '.join(result.skipped)}" if result.skipped else "")
    return result


def annotate(image: Image.Image, preds: Sequence[FacePrediction], path: Path) -> Path:
    """The input image with a box per face, its class and probability written above it (below
    when the face touches the top), and the region with the most attention named under it."""
    out = image.copy()
    draw, font, width = annotation_pen(out)
    for p in preds:
        x0, y0, x1, y1 = p.box
        draw.rectangle([x0, y0, x1, y1], outline=ANNOTATION_COLOUR, width=width)
        draw_label(draw, f"{p.label} {p.probabilities[p.label]:.2f}", (x0, y0), font, above=True)
        top = max(p.attention[1:] or p.attention, key=lambda a: a["mu"])
        draw_label(draw, f"{top['region']} mu {top['mu']:.2f}", (x0, y1), font, above=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path


ANNOTATION_COLOUR = (255, 40, 40)


def annotation_pen(image: Image.Image) -> tuple[ImageDraw.ImageDraw, Any, int]:
    """Drawing on `image` at its scale: (draw, label font, box line width); photos and video frames."""
    side = max(image.size)
    return ImageDraw.Draw(image), ImageFont.load_default(size=max(12, round(side / 40))), max(2, round(side / 200))


def draw_label(draw: ImageDraw.ImageDraw, text: str, corner: tuple[float, float], font: Any, above: bool) -> None:
    x, y = corner
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    height = bottom - top + 4
    ty = y - height if above and y - height >= 0 else y + (0 if above else 2)
    draw.rectangle([x, ty, x + right - left + 4, ty + height], fill=ANNOTATION_COLOUR)
    draw.text((x + 2, ty + 2 - top), text, fill=(255, 255, 255), font=font)


def format_prediction(p: FacePrediction) -> str:
    top = sorted(p.probabilities.items(), key=lambda kv: -kv[1])
    lines = [f"{p.image} face at {tuple(p.box)}: {p.label}" + (" (fallback alignment)" if p.fallback else ""),
             "  probabilities: " + ", ".join(f"{c} {v:.3f}" for c, v in top),
             "  attention:     " + ", ".join(f"{a['region']} mu {a['mu']:.2f} nu {a['nu']:.2f}" for a in p.attention)]
    return "\n".join(lines)
