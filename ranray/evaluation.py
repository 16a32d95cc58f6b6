"""Offline evaluation of a trained RAN on a prepared split, in one process (no Ray needed), and
the accuracy pass that fine-tuning's validation runs too.

    evaluate(model, data_dir, split)   accuracy, per class, per subset flag, confusion matrix
                                       -> EvalReport (+ JSON and confusion PNG in an output folder)
    evaluate_loader(net, loader, ...)  those numbers for any loader: offline here, and inside
                                       training (ranray.train.finetune) on every rank
    plot_split_attention(...)          a split's clean and occluded faces with each region's attention

The model is loaded by ranray.inference (a file, a folder, a run directory or models:/...).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ranray.config import CLASS_NAMES
from ranray.data.schema import SUBSET_FLAGS, SUBSET_MASK
from ranray.inference import TrainedModel, load_trained_model, region_names, to_grey
from ranray.pretrained import is_shipped
from ranray.models import RegionAttentionNetwork
from ranray.train.metrics import EvalAccumulator, EvalResult
from ranray.train.optim import PRECISIONS

PROGRESS_STREAMS = {True: lambda: sys.stderr, False: lambda: None}  # evaluate(progress=...): else a stream


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
                 for s in SUBSET_FLAGS if f"{pre}acc_{s}" in self.metrics]
        lines = [f"{self.split} split of {self.data_dir} with {self.checkpoint}", f"  {'':<18}{'accuracy':>9}{'rows':>7}"]
        lines += [f"  {name:<18}{acc:>9.4f}{'' if n is None else n:>7}" for name, acc, n in rows]
        return "\n".join(lines)


@torch.no_grad()
def evaluate_loader(net: RegionAttentionNetwork, loader: Any, autocast: Callable[[], Any],
                    use_landmarks: bool, num_classes: int, prefix: str = "val", reduce: bool = True,
                    class_names: Sequence[str] | None = None, progress: Any = None,
                    grey: bool = False) -> EvalResult:
    """Accuracy (majority labels), per class, per subset flag and the confusion matrix of `loader`.

    Runs the bare module (no DDP collectives per batch); EvalAccumulator all-reduces the counts
    once at the end when a process group is up, so every rank gets the whole split's numbers.
    progress: a stream to draw a progress bar on when it is a terminal (offline evaluation);
    validation inside training passes none. grey: faces made grey first (a model trained on grey
    faces, ranray.inference.Preprocessing), as prediction does.
    """
    names = tuple(class_names) if class_names else CLASS_NAMES[:num_classes]
    acc = EvalAccumulator(num_classes, names, prefix=prefix, reduce=reduce)
    clean = EvalAccumulator(num_classes, names, prefix=prefix, reduce=reduce)  # rows with no subset flag
    was_training = net.training
    net.eval()
    loader.set_epoch(0)
    for batch in batch_progress(loader, progress, desc=f"evaluating {prefix}"):
        with autocast():
            images = to_grey(batch["images"]) if grey else batch["images"]
            out = net(images, batch["landmarks"] if use_landmarks else None)
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


def evaluate(checkpoint: str | Path | None, data_dir: str | Path, split: str = "test", *, batch_size: int = 64,
             out_dir: str | Path | None = None, backend: str = "torch", num_threads: int = 0,
             precision: str = "fp32", subset: str = "all", tracking_uri: str | None = None,
             progress: Any = True, attention_faces: int = 0) -> EvalReport:
    """Evaluate a trained model on a prepared split; writes eval_<split>.json and the confusion PNG
    (default folder: eval_<split> beside the weights, or ./eval_<split> for a registered or shipped model);
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
    dtype = PRECISIONS[precision].dtype
    autocast: Callable[[], Any] = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype else nullcontext
    result = evaluate_loader(trained.net, loader, autocast, trained.uses_landmarks,
                             num_classes=trained.cfg.model.num_classes, prefix=split,
                             class_names=trained.class_names,
                             progress=PROGRESS_STREAMS.get(progress, lambda: progress)(),
                             grey=trained.preprocessing.grey)
    report = EvalReport(split=split, metrics=result.metrics, confusion=result.confusion.tolist(),
                        class_names=list(result.class_names), checkpoint=trained.source,
                        data_dir=str(data_dir), skipped=loader.skipped, trained_on=trained.data)
    # A registered or shipped model's folder is not the user's to write into.
    beside = Path.cwd() if trained.weights is None or is_shipped(trained.weights) else trained.weights.parent
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
