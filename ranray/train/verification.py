"""Face verification on pairs, the way face-recognition work reports LFW / CFP-FP / AgeDB.

A pairs file holds one pair a line: "key_a key_b same" (same = 1 or 0; '#' starts a comment).
Embeddings are L2-normalised and compared by squared distance (0 .. 4).

- 10-fold accuracy as insightface's verification.py (calculate_roc): contiguous folds (sklearn
  KFold without shuffle: the first N % 10 folds get one pair more), thresholds 0, 0.01, .., 3.99;
  for each fold the threshold with the best accuracy on the other 9 folds is applied to it.
- TAR @ FAR = 1e-3 over all pairs: the threshold accepts at most floor(FAR x negatives) negative
  pairs; TAR is the share of positive pairs it accepts. Fewer than 1/FAR negative pairs make it
  TAR @ FAR = 0 (`far_achieved` says which FAR was actually met).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

THRESHOLDS = np.arange(0.0, 4.0, 0.01)


@dataclass(frozen=True)
class Pair:
    a: str
    b: str
    same: bool


@dataclass(frozen=True)
class VerificationResult:
    accuracy: float  # mean 10-fold accuracy
    accuracy_std: float
    threshold: float  # mean of the folds' best squared-distance thresholds
    tar_at_far: float
    far_target: float
    far_achieved: float
    num_pairs: int
    num_positive: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def read_pairs(path: str | os.PathLike) -> list[Pair]:
    pairs: list[Pair] = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        fields = text.split()
        if len(fields) != 3 or fields[2] not in ("0", "1"):
            raise ValueError(f"{path}:{n}: expected 'key_a key_b same(0/1)', got {line!r}")
        pairs.append(Pair(fields[0], fields[1], fields[2] == "1"))
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


def write_pairs(path: str | os.PathLike, pairs: Sequence[Pair]) -> Path:
    p = Path(path)
    p.write_text("".join(f"{x.a} {x.b} {int(x.same)}\n" for x in pairs))
    return p


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pair_distances(embeddings: Mapping[str, np.ndarray], pairs: Sequence[Pair]) -> tuple[np.ndarray, np.ndarray]:
    """Squared distances of the normalised embeddings of each pair, and the same/different flags."""
    missing = sorted({k for p in pairs for k in (p.a, p.b) if k not in embeddings})
    if missing:
        raise KeyError(f"{len(missing)} pair key(s) have no embedding, e.g. {missing[:3]}")
    a = _normalise(np.stack([embeddings[p.a] for p in pairs]))
    b = _normalise(np.stack([embeddings[p.b] for p in pairs]))
    return np.square(a - b).sum(axis=1), np.array([p.same for p in pairs])


def fold_slices(n: int, folds: int) -> list[slice]:
    """sklearn KFold(n_splits=folds, shuffle=False): contiguous, the first n % folds one larger."""
    sizes = [n // folds + (1 if i < n % folds else 0) for i in range(folds)]
    starts = np.cumsum([0] + sizes)
    return [slice(int(starts[i]), int(starts[i + 1])) for i in range(folds)]


def kfold_accuracy(dist: np.ndarray, same: np.ndarray, folds: int = 10,
                   thresholds: np.ndarray = THRESHOLDS) -> tuple[np.ndarray, np.ndarray]:
    """Per-fold test accuracy at the threshold best on the other folds; and those thresholds."""
    if len(dist) < folds:
        raise ValueError(f"{len(dist)} pairs cannot make {folds} folds")
    # correct[i, t]: pair i is classified right at threshold t (same <=> dist < threshold).
    correct = (dist[:, None] < thresholds[None, :]) == same[:, None]
    accuracy, best = [], []
    for test in fold_slices(len(dist), folds):
        train = np.ones(len(dist), dtype=bool)
        train[test] = False
        t = int(np.argmax(correct[train].mean(axis=0)))  # first best, as np.argmax in insightface
        accuracy.append(correct[test, t].mean())
        best.append(thresholds[t])
    return np.array(accuracy), np.array(best)


def tar_at_far(dist: np.ndarray, same: np.ndarray, far: float = 1e-3) -> tuple[float, float]:
    """(TAR, achieved FAR) at the loosest threshold accepting at most floor(far x negatives)."""
    neg, pos = np.sort(dist[~same]), dist[same]
    if len(neg) == 0 or len(pos) == 0:
        raise ValueError("TAR@FAR needs both positive and negative pairs")
    allowed = math.floor(far * len(neg))
    threshold = neg[allowed]  # accept dist < threshold: exactly `allowed` negatives (ties: fewer)
    return float((pos < threshold).mean()), float((neg < threshold).mean())


def evaluate_verification(embeddings: Mapping[str, np.ndarray], pairs: Sequence[Pair], folds: int = 10,
                          far: float = 1e-3) -> VerificationResult:
    dist, same = pair_distances(embeddings, pairs)
    acc, best = kfold_accuracy(dist, same, folds)
    tar, far_met = tar_at_far(dist, same, far)
    return VerificationResult(float(acc.mean()), float(acc.std()), float(best.mean()), tar, far, far_met,
                              len(pairs), int(same.sum()))
