"""Classification metrics, and an evaluation accumulator that sums across DDP ranks.

Everything a metric needs is in the confusion matrix plus, per subset flag, the number of rows
and of correct rows, so ranks exchange a few integers instead of their predictions.
Labels < 0 (rows without a majority label) are ignored everywhere.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ranray.config import CLASS_NAMES
from ranray.data.schema import SUBSET_FLAGS
from ranray.train.collectives import collective_device, distributed

ArrayLike = Any  # numpy array, torch tensor, or a sequence of ints


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        return (x.float() if x.is_floating_point() else x).cpu().numpy()  # numpy has no bf16
    return np.asarray(x)


def _labelled(preds: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p, y = _np(preds).astype(np.int64).ravel(), _np(labels).astype(np.int64).ravel()
    if p.shape != y.shape:
        raise ValueError(f"preds and labels differ in length: {p.shape[0]} vs {y.shape[0]}")
    keep = y >= 0
    return p[keep], y[keep], keep


def accuracy(preds: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of correct predictions; NaN when there is no labelled row."""
    p, y, _ = _labelled(preds, labels)
    return float((p == y).mean()) if y.size else math.nan


def confusion_matrix(preds: ArrayLike, labels: ArrayLike, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts, rows = true class, columns = predicted class."""
    p, y, _ = _labelled(preds, labels)
    if y.size and (max(p.max(), y.max()) >= num_classes or p.min() < 0):
        raise ValueError(f"a class index is outside 0..{num_classes - 1}")
    return np.bincount(y * num_classes + p, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes).astype(np.int64)


def per_class_accuracy(preds: ArrayLike, labels: ArrayLike, num_classes: int) -> np.ndarray:
    """Recall of each class (C,); NaN for a class with no rows."""
    return per_class_from_confusion(confusion_matrix(preds, labels, num_classes))


def per_class_from_confusion(cm: np.ndarray) -> np.ndarray:
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def mean_class_accuracy(cm: np.ndarray) -> float:
    """Mean of the per-class recalls over the classes with rows (FERPlus is unbalanced: contempt and
    disgust hold a few percent of the faces, so overall accuracy hides them); NaN with no rows."""
    recalls = per_class_from_confusion(cm)
    return float(np.nanmean(recalls)) if not np.isnan(recalls).all() else math.nan


def subset_accuracy(preds: ArrayLike, labels: ArrayLike, flags: ArrayLike, flag_bit: int) -> float:
    """Accuracy on the rows whose `flags` have `flag_bit` set; NaN when there are none."""
    p, y, keep = _labelled(preds, labels)
    f = _np(flags).astype(np.int64).ravel()[keep]
    chosen = (f & flag_bit) != 0
    return float((p[chosen] == y[chosen]).mean()) if chosen.any() else math.nan


@dataclasses.dataclass
class EvalResult:
    metrics: dict[str, float]  # flat name -> float, ready for ray.train.report / MLflow
    confusion: np.ndarray  # (C, C) int64, rows true, columns predicted
    class_names: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "confusion": self.confusion.tolist(),
                "class_names": list(self.class_names)}


class EvalAccumulator:
    """Sums per-batch results; `compute()` all-reduces across ranks when torch.distributed is up.

    Every rank must call `compute()` (it is a collective, unless reduce=False). Metric names, with `prefix="val"`:
        val_accuracy, val_loss (if losses were given), val_samples,
        val_mean_class_accuracy (the mean of the per-class recalls, classes with rows),
        val_acc_<class> for each class with rows, val_acc_<subset> for each flag that occurs.
    """

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None, prefix: str = "val",
                 reduce: bool = True):
        self.num_classes = num_classes
        self.reduce = reduce  # False: this rank's rows only (one rank evaluating alone must not wait on the rest)
        self.class_names = tuple(class_names) if class_names is not None else tuple(CLASS_NAMES[:num_classes])
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {num_classes} classes")
        self.prefix = prefix
        self.reset()

    def reset(self) -> None:
        self._cm = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self._subset = np.zeros((len(SUBSET_FLAGS), 2), dtype=np.int64)  # rows, correct
        self._loss_sum = 0.0
        self._loss_rows = 0

    def update(self, outputs: ArrayLike, labels: ArrayLike, flags: ArrayLike | None = None,
               loss: float | torch.Tensor | None = None) -> None:
        """`outputs` are class indices (B,) or logits / probabilities (B, C); `loss` a batch mean."""
        if isinstance(outputs, torch.Tensor) and outputs.ndim == 2:
            outputs = outputs.argmax(dim=1)  # on the device: only B indices cross to the host
        out = _np(outputs)
        preds = out.argmax(axis=1) if out.ndim == 2 else out
        p, y, keep = _labelled(preds, labels)
        self._cm += confusion_matrix(p, y, self.num_classes)
        if flags is not None:
            f = _np(flags).astype(np.int64).ravel()[keep]
            correct = p == y
            for i, bit in enumerate(SUBSET_FLAGS.values()):
                chosen = (f & bit) != 0
                self._subset[i] += (int(chosen.sum()), int(correct[chosen].sum()))
        if loss is not None:
            self._loss_sum += float(loss) * y.size
            self._loss_rows += y.size

    def compute(self) -> EvalResult:
        cm, subset, loss_sum, loss_rows = self._reduced()
        total = int(cm.sum())
        pre = self.prefix
        metrics = {f"{pre}_accuracy": float(np.trace(cm) / total) if total else math.nan,
                   f"{pre}_samples": float(total)}
        if loss_rows:
            metrics[f"{pre}_loss"] = loss_sum / loss_rows
        if total:
            metrics[f"{pre}_mean_class_accuracy"] = mean_class_accuracy(cm)
        for name, acc in zip(self.class_names, per_class_from_confusion(cm)):
            if not math.isnan(acc):
                metrics[f"{pre}_acc_{name}"] = float(acc)
        for name, (rows, correct) in zip(SUBSET_FLAGS, subset):
            if rows:
                metrics[f"{pre}_acc_{name}"] = float(correct / rows)
        return EvalResult(metrics, cm, self.class_names)

    def _reduced(self) -> tuple[np.ndarray, np.ndarray, float, int]:
        if not (self.reduce and distributed()):
            return self._cm, self._subset, self._loss_sum, self._loss_rows
        # One packed int64 tensor, one collective. The loss sum travels as float64 separately.
        counts = np.concatenate([self._cm.ravel(), self._subset.ravel(), [self._loss_rows]])
        device = collective_device()
        packed = torch.from_numpy(counts).to(device)
        loss = torch.tensor([self._loss_sum], dtype=torch.float64, device=device)
        dist.all_reduce(packed)
        dist.all_reduce(loss)
        packed = packed.cpu().numpy()
        c2 = self.num_classes * self.num_classes
        cm = packed[:c2].reshape(self.num_classes, self.num_classes)
        subset = packed[c2:-1].reshape(-1, 2)
        return cm, subset, float(loss.item()), int(packed[-1])
