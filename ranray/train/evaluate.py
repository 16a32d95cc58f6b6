"""Offline evaluation and prediction with a trained RAN, in one process (no Ray needed).

    load_trained_model(path)   an exported model (model/best.pt, model/final.pt + the .yaml beside
                               it), a training checkpoint folder (state.pt, config inside), a run
                               directory (its best model), or a registered MLflow model
                               (models:/NAME/VERSION, ranray.model_store)
    evaluate(...)              accuracy, per class, per subset flag, confusion matrix -> EvalReport
                               (+ JSON and confusion PNG in an output folder)
    predict(...)               dlib detection + alignment (ranray.data.align) + RAN, per image: every
                               face's box, class, probabilities, attention per region, or why the
                               image gave none (missing, not an image, no face); annotated images
    classify_aligned(...)      the RAN on aligned faces: what predict and the MLflow model share
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from ranray.config import CLASS_NAMES, TrainConfig, class_names_of, from_dict
from ranray.data.schema import SUBSET_FLAGS, normalize
from ranray.models import RegionAttentionNetwork, build_ran
from ranray.model_card import read_data_card
from ranray.models.ran import LANDMARK_GROUPS
from ranray.train.checkpoint import (STATE_FILE, CheckpointError, load_checkpoint, manifest_path,
                                     resolve_state_file)
from ranray.train.metrics import EvalAccumulator, EvalResult
from ranray.train.run_dir import RunDir

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
PROGRESS_STREAMS = {True: lambda: sys.stderr, False: lambda: None}  # evaluate(progress=...): else a stream
SUBSET_MASK = sum(SUBSET_FLAGS.values())  # "clean" rows: no occlusion and no large pose


# ---------------------------------------------------------------------------------------------
# Loading a trained model
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainedModel:
    net: RegionAttentionNetwork
    cfg: TrainConfig
    source: str  # what was loaded: the weights file, or the models:/ URI
    data: dict[str, Any] = field(default_factory=dict)  # what it was trained on (ranray.model_card)
    weights: Path | None = None  # the local weights file (None when it came from the registry)

    @property
    def class_names(self) -> tuple[str, ...]:
        return class_names_of(self.cfg.model)

    @property
    def uses_landmarks(self) -> bool:
        return self.cfg.model.region_mode == "landmark"


def resolve_weights(path: str | Path) -> Path:
    """The weights file behind what a user may point at: a file, a checkpoint folder, a run dir."""
    p = Path(path)
    candidates = [p, p / STATE_FILE, RunDir(p).best_model, RunDir(p).final_model]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"no model at {p}: expected a .pt file, a checkpoint folder with {STATE_FILE}, "
                            "or a run directory with model/best.pt")


def load_trained_model(path: str | Path, device: str | torch.device = "cpu",
                       tracking_uri: str | None = None) -> TrainedModel:
    """A file, folder or run directory; or models:/NAME/VERSION (also /latest, @alias) from the
    MLflow registry at `tracking_uri` (default MLFLOW_TRACKING_URI)."""
    if str(path).startswith("models:/"):
        from ranray.model_store import load_registered_model

        return load_registered_model(str(path), tracking_uri, device)
    weights = resolve_weights(path)
    state = _load_weights(weights)
    if "model" in state and "config" in state:  # a training checkpoint carries its config
        cfg_dict, model_state = state["config"], state["model"]
    else:
        cfg_file = weights.with_suffix(".yaml")
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{weights} is a bare state_dict and {cfg_file} (its config) is missing")
        cfg_dict, model_state = yaml.safe_load(cfg_file.read_text()), state
    cfg = from_dict(TrainConfig, cfg_dict)
    # The weights already hold the fine-tuned backbone: do not read init_backbone again.
    net = build_ran(replace(cfg.model, init_backbone=""))
    net.load_state_dict(model_state, strict=True)
    return TrainedModel(net=net.to(device).eval(), cfg=cfg, source=str(weights),
                        data=read_data_card(weights, cfg), weights=weights)


def _load_weights(path: Path) -> dict[str, Any]:
    # Files from this project carry a manifest and are verified; a copy without one (e.g. an
    # MLflow artifact download) is still read safely with weights_only.
    if manifest_path(resolve_state_file(path)).is_file():
        return load_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} could not be loaded with weights_only=True: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalReport:
    split: str
    metrics: dict[str, float]  # <split>_accuracy, <split>_acc_<class>, <split>_acc_<subset>, ...
    confusion: list[list[int]]
    class_names: list[str]
    checkpoint: str
    data_dir: str
    skipped: int = 0
    files: dict[str, str] = field(default_factory=dict)
    trained_on: dict[str, Any] = field(default_factory=dict)  # the model's data card

    @property
    def accuracy(self) -> float:
        return self.metrics[f"{self.split}_accuracy"]

    def subset_accuracy(self, subset: str) -> float:
        return self.metrics.get(f"{self.split}_acc_{subset}", math.nan)

    def table(self) -> str:
        pre = f"{self.split}_"
        rows = [("accuracy", self.accuracy, int(self.metrics.get(pre + "samples", 0)))]
        support = np.asarray(self.confusion).sum(axis=1)
        rows += [(f"  {name}", self.metrics.get(f"{pre}acc_{name}", math.nan), int(n))
                 for name, n in zip(self.class_names, support)]
        rows += [(f"subset {s}", self.metrics[f"{pre}acc_{s}"], None)
                 for s in ("occlusion", "pose30", "pose45") if f"{pre}acc_{s}" in self.metrics]
        lines = [f"{self.split} split of {self.data_dir} with {self.checkpoint}", f"  {'':<18}{'accuracy':>9}{'rows':>7}"]
        lines += [f"  {name:<18}{acc:>9.4f}{'' if n is None else n:>7}" for name, acc, n in rows]
        return "\n".join(lines)


@torch.no_grad()
def evaluate_loader(net: RegionAttentionNetwork, loader: Any, autocast: Callable[[], Any],
                    use_landmarks: bool, num_classes: int, prefix: str = "val", reduce: bool = True,
                    class_names: Sequence[str] | None = None, progress: Any = None) -> EvalResult:
    """Accuracy (majority labels), per class, per subset flag and the confusion matrix of `loader`.

    Runs the bare module (no DDP collectives per batch); EvalAccumulator all-reduces the counts
    once at the end when a process group is up, so every rank gets the whole split's numbers.
    progress: a stream to draw a progress bar on when it is a terminal (offline evaluation);
    validation inside training passes none.
    """
    names = tuple(class_names) if class_names else CLASS_NAMES[:num_classes]
    acc = EvalAccumulator(num_classes, names, prefix=prefix, reduce=reduce)
    clean = EvalAccumulator(num_classes, names, prefix=prefix, reduce=reduce)  # rows with no subset flag
    was_training = net.training
    net.eval()
    loader.set_epoch(0)
    for batch in batch_progress(loader, progress, desc=f"evaluating {prefix}"):
        with autocast():
            out = net(batch["images"], batch["landmarks"] if use_landmarks else None)
        logits = out.logits.float()
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
        acc.update(logits, batch["labels"], batch["flags"], loss=loss)
        keep = (batch["flags"] & SUBSET_MASK) == 0
        clean.update(logits[keep], batch["labels"][keep])
    net.train(was_training)
    result = acc.compute()
    clean_result = clean.compute()
    if clean_result.metrics[f"{prefix}_samples"] > 0:
        result.metrics[f"{prefix}_acc_clean"] = clean_result.metrics[f"{prefix}_accuracy"]
    return result


def batch_progress(loader: Any, stream: Any, desc: str) -> Any:
    """`loader`, with a tqdm bar on `stream` when that is a terminal (batches, rate, ETA)."""
    if stream is None or not stream.isatty():
        return loader
    from tqdm import tqdm

    return tqdm(loader, total=len(loader), desc=desc, unit="batch", file=stream, dynamic_ncols=True)


def evaluate(checkpoint: str | Path, data_dir: str | Path, split: str = "test", *, batch_size: int = 64,
             out_dir: str | Path | None = None, backend: str = "torch", num_threads: int = 0,
             precision: str = "fp32", subset: str = "all", tracking_uri: str | None = None,
             progress: Any = True, attention_faces: int = 0) -> EvalReport:
    """Evaluate a trained model on a prepared split; writes eval_<split>.json and the confusion PNG
    (default folder: eval_<split> beside the weights, or ./eval_<split> for a registered model);
    attention_faces=N also draws N clean and N occluded faces of the split with their attention;
    progress: True for a bar on stderr when that is a terminal, False for none, or a stream."""
    from ranray.data.loader import build_loader
    from ranray.data.schema import read_manifest
    from ranray.train.plots import plot_confusion_matrix

    trained = load_trained_model(checkpoint, tracking_uri=tracking_uri)
    manifest = read_manifest(data_dir)
    if manifest.get("num_classes") != trained.cfg.model.num_classes:
        raise ValueError(f"{data_dir} has {manifest.get('num_classes')} classes, the model "
                         f"{trained.cfg.model.num_classes}")
    loader = build_loader(data_dir, split, batch_size=batch_size, training=False, backend=backend,
                          num_threads=num_threads, subset=subset)
    dtype = PRECISIONS[precision]
    autocast: Callable[[], Any] = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype else nullcontext
    result = evaluate_loader(trained.net, loader, autocast, trained.uses_landmarks,
                             num_classes=trained.cfg.model.num_classes, prefix=split,
                             class_names=trained.class_names,
                             progress=PROGRESS_STREAMS.get(progress, lambda: progress)())
    report = EvalReport(split=split, metrics=result.metrics, confusion=result.confusion.tolist(),
                        class_names=list(result.class_names), checkpoint=trained.source,
                        data_dir=str(data_dir), skipped=loader.skipped, trained_on=trained.data)
    beside = trained.weights.parent if trained.weights is not None else Path.cwd()
    out = Path(out_dir) if out_dir else beside / f"eval_{split}"
    png = plot_confusion_matrix(result.confusion, result.class_names, out / f"confusion_{split}.png",
                                title=f"{split}: accuracy {report.accuracy:.3f}")
    report.files = {"json": str(out / f"eval_{split}.json"), "confusion": str(png)}
    if attention_faces > 0:
        report.files["attention"] = str(plot_split_attention(trained, loader, attention_faces,
                                                             out / f"attention_{split}.png"))
    (out / f"eval_{split}.json").write_text(json.dumps(asdict(report), indent=1))
    return report


@torch.no_grad()
def plot_split_attention(trained: TrainedModel, loader: Any, per_group: int, path: Path) -> Path:
    """The attention picture of the first `per_group` clean and occluded faces of `loader`."""
    from ranray.data.schema import FLAG_OCCLUSION
    from ranray.train.plots import plot_attention_faces

    wanted = {False: [], True: []}  # occluded? -> (image, landmarks, label, flags) rows
    loader.set_epoch(0)
    for batch in loader:
        for i, flags in enumerate(batch["flags"].tolist()):
            group = wanted[bool(flags & FLAG_OCCLUSION)]
            if len(group) < per_group:
                group.append((batch["images"][i], batch["landmarks"][i], int(batch["labels"][i]), flags))
        if all(len(g) >= per_group for g in wanted.values()):
            break
    rows = wanted[False] + wanted[True]
    if not rows:
        raise ValueError("the split has no faces to draw")
    images = torch.stack([r[0] for r in rows])
    landmarks = torch.stack([r[1] for r in rows]) if trained.uses_landmarks else None
    out = trained.net(images, landmarks)
    boxes = trained.net.region_boxes(images, landmarks) * images.shape[-1]
    return plot_attention_faces(images, boxes, out.mu, out.nu, out.logits.argmax(1).tolist(), [r[2] for r in rows],
                                path, class_names=trained.class_names, flags=[r[3] for r in rows],
                                region_names=region_names(trained.cfg.model.region_mode, boxes.shape[1]))


# ---------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------


@dataclass
class FaceResult:
    """The RAN's answer for one aligned face."""

    label: str
    probabilities: dict[str, float]
    attention: list[dict[str, Any]]  # per region: name, box (aligned face pixels), mu, nu


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


_FIXED_NAMES = ("whole face", "top-left", "top-right", "centre-bottom", "centre 0.90", "centre 0.85")
# In eval mode random regions are the fixed boxes (ranray.models.ran), so they share names.
REGION_NAMES: dict[str, tuple[str, ...]] = {
    "fixed": _FIXED_NAMES,
    "random": _FIXED_NAMES,
    "landmark": ("whole face", *(name for name, _ in LANDMARK_GROUPS)),
}


def region_names(mode: str, k: int) -> list[str]:
    return list(REGION_NAMES[mode][:k])


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
    from ranray.data.align import AlignOptions, FaceAligner

    trained = (checkpoint if isinstance(checkpoint, TrainedModel)
               else load_trained_model(checkpoint, tracking_uri=tracking_uri))
    # Boxes come from detect_faces; the aligner fits landmarks inside each ("given" mode), and puts the
    # face where the model's training faces sat (their data card's template).
    aligner = FaceAligner(AlignOptions(detector="given", template=trained.data.get("align_template", "insightface")))
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


def _predict_image(trained: TrainedModel, aligner: Any, image: Image.Image, name: str, detector: str) -> ImageResult:
    from ranray.data.sources.common import RowReject

    result = ImageResult(name)
    for box in detect_faces(np.asarray(image.convert("L")), detector):
        try:
            aligned = aligner.align(image, box=box)
        except RowReject as exc:
            result.skipped.append(f"face at {tuple(round(v) for v in box)} not aligned: {exc}")
            continue
        landmarks = torch.from_numpy(aligned.landmarks)[None]
        (face,) = classify_aligned(trained, face_tensor(aligned.image), landmarks)
        result.faces.append(FacePrediction(image=name, box=tuple(round(v, 1) for v in box), label=face.label,
                                           probabilities=face.probabilities, attention=face.attention,
                                           fallback=bool(aligned.fallback)))
    if not result.faces:
        hint = "" if detector == "given" else " (for face crops use --detector given)"
        result.error = f"no face found in {name}{hint}" + (f"; {'; '.join(result.skipped)}" if result.skipped else "")
    return result


def face_tensor(face: Image.Image | np.ndarray) -> torch.Tensor:
    """(1, 3, S, S) float32 model input for one aligned RGB face, normalised as the loaders do."""
    return normalize(torch.from_numpy(np.asarray(face, dtype=np.float32)).permute(2, 0, 1)[None])


@torch.no_grad()
def classify_aligned(trained: TrainedModel, images: torch.Tensor,
                     landmarks: torch.Tensor | None = None) -> list[FaceResult]:
    """Class, probabilities and per-region attention of aligned faces: images (N, 3, S, S)
    normalised (face_tensor), landmarks (N, 68, 2) aligned pixels (needed by landmark regions)."""
    if trained.uses_landmarks and landmarks is None:
        raise ValueError("this model cuts its regions at landmarks (model.region_mode=landmark): "
                         "pass the 68 aligned landmarks of every face")
    landmarks = landmarks if trained.uses_landmarks else None
    out = trained.net(images, landmarks)
    probs = torch.softmax(out.logits.float(), 1).tolist()
    boxes = (trained.net.region_boxes(images, landmarks) * images.shape[-1]).tolist()
    names = region_names(trained.cfg.model.region_mode, len(boxes[0]))
    classes = trained.class_names
    results = []
    for p, b, mu, nu in zip(probs, boxes, out.mu.tolist(), out.nu.tolist()):
        attention = [{"region": n, "box": [round(v, 1) for v in box], "mu": float(m), "nu": float(v)}
                     for n, box, m, v in zip(names, b, mu, nu)]
        results.append(FaceResult(label=classes[int(np.argmax(p))],
                                  probabilities={c: round(x, 4) for c, x in zip(classes, p)}, attention=attention))
    return results


def annotate(image: Image.Image, preds: Sequence[FacePrediction], path: Path) -> Path:
    """The input image with a box per face, its class and probability written above it (below
    when the face touches the top), and the region with the most attention named under it."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    width = max(2, round(max(out.size) / 200))
    font = ImageFont.load_default(size=max(12, round(max(out.size) / 40)))
    for p in preds:
        x0, y0, x1, y1 = p.box
        draw.rectangle([x0, y0, x1, y1], outline=ANNOTATION_COLOUR, width=width)
        _label(draw, f"{p.label} {p.probabilities[p.label]:.2f}", (x0, y0), font, above=True)
        top = max(p.attention[1:] or p.attention, key=lambda a: a["mu"])
        _label(draw, f"{top['region']} mu {top['mu']:.2f}", (x0, y1), font, above=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path


ANNOTATION_COLOUR = (255, 40, 40)


def _label(draw: ImageDraw.ImageDraw, text: str, corner: tuple[float, float], font: Any, above: bool) -> None:
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
