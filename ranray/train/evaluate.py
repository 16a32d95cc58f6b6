"""Offline evaluation and prediction with a trained RAN, in one process (no Ray needed).

    load_trained_model(path)   an exported model (model/best.pt, model/final.pt + the .yaml beside
                               it), a training checkpoint folder (state.pt, config inside), or a run
                               directory (its best model)
    evaluate(...)              accuracy, per class, per subset flag, confusion matrix -> EvalReport
                               (+ JSON and confusion PNG in an output folder)
    predict(...)               dlib detection + alignment (ranray.data.align) + RAN, per face: box,
                               class, probabilities, attention per region; optional annotated image
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw

from ranray.config import CLASS_NAMES, TrainConfig, class_names_of, from_dict
from ranray.data.schema import SUBSET_FLAGS, normalize
from ranray.models import RegionAttentionNetwork, build_ran
from ranray.models.ran import LANDMARK_GROUPS
from ranray.train.checkpoint import (STATE_FILE, CheckpointError, load_checkpoint, manifest_path,
                                     resolve_state_file)
from ranray.train.metrics import EvalAccumulator, EvalResult
from ranray.train.run_dir import RunDir

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
SUBSET_MASK = sum(SUBSET_FLAGS.values())  # "clean" rows: no occlusion and no large pose


# ---------------------------------------------------------------------------------------------
# Loading a trained model
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainedModel:
    net: RegionAttentionNetwork
    cfg: TrainConfig
    source: Path  # the weights file that was loaded

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


def load_trained_model(path: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
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
    return TrainedModel(net=net.to(device).eval(), cfg=cfg, source=weights)


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
                    class_names: Sequence[str] | None = None) -> EvalResult:
    """Accuracy (majority labels), per class, per subset flag and the confusion matrix of `loader`.

    Runs the bare module (no DDP collectives per batch); EvalAccumulator all-reduces the counts
    once at the end when a process group is up, so every rank gets the whole split's numbers.
    """
    names = tuple(class_names) if class_names else CLASS_NAMES[:num_classes]
    acc = EvalAccumulator(num_classes, names, prefix=prefix, reduce=reduce)
    clean = EvalAccumulator(num_classes, names, prefix=prefix, reduce=reduce)  # rows with no subset flag
    was_training = net.training
    net.eval()
    loader.set_epoch(0)
    for batch in loader:
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


def evaluate(checkpoint: str | Path, data_dir: str | Path, split: str = "test", *, batch_size: int = 64,
             out_dir: str | Path | None = None, backend: str = "torch", num_threads: int = 0,
             precision: str = "fp32", subset: str = "all") -> EvalReport:
    """Evaluate a trained model on a prepared split; writes eval_<split>.json and the confusion PNG."""
    from ranray.data.loader import build_loader
    from ranray.data.schema import read_manifest
    from ranray.train.plots import plot_confusion_matrix

    trained = load_trained_model(checkpoint)
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
                             class_names=trained.class_names)
    report = EvalReport(split=split, metrics=result.metrics, confusion=result.confusion.tolist(),
                        class_names=list(result.class_names), checkpoint=str(trained.source),
                        data_dir=str(data_dir), skipped=loader.skipped)
    out = Path(out_dir) if out_dir else trained.source.parent / f"eval_{split}"
    png = plot_confusion_matrix(result.confusion, result.class_names, out / f"confusion_{split}.png",
                                title=f"{split}: accuracy {report.accuracy:.3f}")
    report.files = {"json": str(out / f"eval_{split}.json"), "confusion": str(png)}
    (out / f"eval_{split}.json").write_text(json.dumps(asdict(report), indent=1))
    return report


# ---------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------


@dataclass
class FacePrediction:
    image: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in the input image's pixels
    label: str
    probabilities: dict[str, float]
    attention: list[dict[str, Any]]  # per region: name, box (aligned face pixels), mu, nu
    fallback: bool = False  # the landmark fit was implausible and the box alignment was used


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


def predict(checkpoint: str | Path, images: Sequence[str | Path], *, detector: str = "hog",
            out_dir: str | Path | None = None) -> list[FacePrediction]:
    """Detect, align and classify every face; with out_dir, write <name>_ran.png per image."""
    from ranray.data.align import AlignOptions, FaceAligner
    from ranray.data.sources.common import RowReject

    trained = load_trained_model(checkpoint)
    # Boxes come from detect_faces; the aligner fits landmarks inside each ("given" mode).
    aligner = FaceAligner(AlignOptions(detector="given"))
    predictions = []
    for image_path in images:
        image = Image.open(image_path).convert("RGB")
        faces = []
        for box in detect_faces(np.asarray(image.convert("L")), detector):
            try:
                aligned = aligner.align(image, box=box)
            except RowReject:
                continue
            faces.append((box, aligned))
        preds = [_classify(trained, str(image_path), box, aligned) for box, aligned in faces]
        if out_dir is not None:
            annotate(image, preds, Path(out_dir) / f"{Path(image_path).stem}_ran.png")
        predictions.extend(preds)
    return predictions


def face_tensor(face: Image.Image | np.ndarray) -> torch.Tensor:
    """(1, 3, S, S) float32 model input for one aligned RGB face, normalised as the loaders do."""
    return normalize(torch.from_numpy(np.asarray(face, dtype=np.float32)).permute(2, 0, 1)[None])


@torch.no_grad()
def _classify(trained: TrainedModel, image: str, box: tuple[float, ...], aligned: Any) -> FacePrediction:
    x = face_tensor(aligned.image)
    landmarks = torch.from_numpy(aligned.landmarks)[None] if trained.uses_landmarks else None
    out = trained.net(x, landmarks)
    probs = torch.softmax(out.logits[0].float(), 0).tolist()
    boxes = (trained.net.region_boxes(x, landmarks)[0] * x.shape[-1]).tolist()
    names = region_names(trained.cfg.model.region_mode, len(boxes))
    attention = [{"region": n, "box": [round(v, 1) for v in b], "mu": float(mu), "nu": float(nu)}
                 for n, b, mu, nu in zip(names, boxes, out.mu[0].tolist(), out.nu[0].tolist())]
    classes = trained.class_names
    return FacePrediction(image=image, box=tuple(round(v, 1) for v in box), label=classes[int(np.argmax(probs))],
                          probabilities={c: round(p, 4) for c, p in zip(classes, probs)}, attention=attention,
                          fallback=bool(aligned.fallback))


def annotate(image: Image.Image, preds: Sequence[FacePrediction], path: Path) -> Path:
    """The input image with a box per face and its class and probability written above it."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    width = max(1, round(max(out.size) / 200))
    for p in preds:
        x0, y0, x1, y1 = p.box
        draw.rectangle([x0, y0, x1, y1], outline=(255, 40, 40), width=width)
        text = f"{p.label} {p.probabilities[p.label]:.2f}"
        tx, ty = x0, max(0.0, y0 - 12)
        draw.rectangle(draw.textbbox((tx, ty), text), fill=(255, 40, 40))
        draw.text((tx, ty), text, fill=(255, 255, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path


def format_prediction(p: FacePrediction) -> str:
    top = sorted(p.probabilities.items(), key=lambda kv: -kv[1])
    lines = [f"{p.image} face at {tuple(p.box)}: {p.label}" + (" (fallback alignment)" if p.fallback else ""),
             "  probabilities: " + ", ".join(f"{c} {v:.3f}" for c, v in top),
             "  attention:     " + ", ".join(f"{a['region']} mu {a['mu']:.2f} nu {a['nu']:.2f}" for a in p.attention)]
    return "\n".join(lines)
