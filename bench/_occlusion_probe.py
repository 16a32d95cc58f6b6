"""Does region attention follow the occlusion? Cover each region of clean test faces in turn, look again.

    measure_attention_shift(net, loader, use_landmarks) -> AttentionShift
        for every clean face (no subset flag) and every part region k >= 1: cover region k's box
        with a flat grey card (0 in normalised pixels) and run the model again;
        delta[face, k] = mu_k(covered) - mu_k(clean), plus how every other region's mu moved and
        whether the prediction is still right. If region attention works, covering a region lowers
        its own weight, and more than it lowers the others'.
    measure_trained(weights, data_dir, split) -> AttentionShift     the same for a trained model file
    measure_region_shares(net, loader, use_landmarks) -> RegionShares
        each region's mean share of the decision (mu * nu normalised over the K regions, the
        pooling weights: ranray.train.plots.region_shares) over all faces, clean faces (no subset
        flag) and each flagged subset (occlusion, pose30, pose45) of a split; on real faces this
        shows whether attention moves away from a covered or turned part, or has collapsed onto
        one region whatever the face
    shares_trained(weights, data_dir, split) -> RegionShares       the same for a trained model file
    plot_attention_shift(net, images, labels, landmarks, path) -> png
        per face one row: the clean face, then the face with each region covered, every box
        labelled with its mu (the covered box drawn dashed)

The fixed layout's regions overlap (the two centred crops hold most of the face), so covering one
also covers parts of others: `others` is reported beside `own` so the two can be told apart.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ranray.data.schema import SUBSET_FLAGS, SUBSET_MASK
from ranray.inference import TrainedModel, load_trained_model, region_names
from ranray.models.ran import RegionAttentionNetwork

FILL = 0.0  # normalised pixels: the dataset's mean grey, a card with no texture


def cover_box(images: torch.Tensor, boxes: torch.Tensor, fill: float = FILL) -> torch.Tensor:
    """images (B,3,H,W); boxes (B,4) normalised (x0,y0,x1,y1): every pixel whose centre is inside set to fill."""
    h, w = images.shape[-2:]
    ys = (torch.arange(h, device=images.device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=images.device, dtype=torch.float32) + 0.5) / w
    x0, y0, x1, y1 = (boxes[:, i, None, None] for i in range(4))
    inside = (xs >= x0) & (xs <= x1) & (ys[:, None] >= y0) & (ys[:, None] <= y1)  # (B,H,W)
    return torch.where(inside[:, None], torch.as_tensor(fill, dtype=images.dtype), images)


@dataclass
class AttentionShift:
    """Per covered region k (1..K-1), over the faces: own[k] = its mu change, others[k] = the mean change
    of the other part regions, whole[k] = the whole face's, right[k] = faces still classified right."""

    region_names: list[str]
    clean_mu: list[np.ndarray] = field(default_factory=list)  # (B, K) per batch
    own: dict[int, list[np.ndarray]] = field(default_factory=dict)
    others: dict[int, list[np.ndarray]] = field(default_factory=dict)
    whole: dict[int, list[np.ndarray]] = field(default_factory=dict)
    right: dict[int, list[np.ndarray]] = field(default_factory=dict)
    clean_right: list[np.ndarray] = field(default_factory=list)

    @property
    def faces(self) -> int:
        return int(sum(len(m) for m in self.clean_mu))

    def add(self, k: int, clean: torch.Tensor, covered: torch.Tensor, correct: torch.Tensor) -> None:
        delta = (covered - clean).float().cpu().numpy()
        rest = [j for j in range(1, delta.shape[1]) if j != k]
        for store, value in ((self.own, delta[:, k]), (self.whole, delta[:, 0]),
                             (self.others, delta[:, rest].mean(1) if rest else np.full(len(delta), math.nan)),
                             (self.right, correct.cpu().numpy())):
            store.setdefault(k, []).append(value)

    def summary(self) -> list[dict[str, Any]]:
        """One dict per covered region: mean and std of its mu change, the others', the whole face's,
        the share of faces where its mu fell, and the accuracy with it covered."""
        clean_mu = np.concatenate(self.clean_mu)
        rows = []
        for k in sorted(self.own):
            own, others = np.concatenate(self.own[k]), np.concatenate(self.others[k])
            rows.append({
                "region": k, "name": self.region_names[k], "clean_mu": float(clean_mu[:, k].mean()),
                "own_mean": float(own.mean()), "own_std": float(own.std()),
                "others_mean": float(np.nanmean(others)) if not np.isnan(others).all() else math.nan,
                "whole_mean": float(np.concatenate(self.whole[k]).mean()),
                "own_fell": float((own < 0).mean()),
                "accuracy_covered": float(np.concatenate(self.right[k]).mean()),
            })
        return rows

    @property
    def clean_accuracy(self) -> float:
        return float(np.concatenate(self.clean_right).mean())

    def table(self) -> tuple[list[str], list[list[object]]]:
        headers = ["covered region", "clean mu", "own mu change (mean +- std)", "others' change", "whole face's",
                   "faces where own mu fell", "accuracy covered"]
        rows = [[f"{r['region']} {r['name']}", f"{r['clean_mu']:.3f}", f"{r['own_mean']:+.3f} +- {r['own_std']:.3f}",
                 f"{r['others_mean']:+.3f}", f"{r['whole_mean']:+.3f}", f"{r['own_fell']:.0%}",
                 f"{r['accuracy_covered']:.3f} (clean {self.clean_accuracy:.3f})"] for r in self.summary()]
        return headers, rows


@torch.no_grad()
def measure_attention_shift(net: RegionAttentionNetwork, loader: Any, use_landmarks: bool,
                            region_names: list[str] | None = None, max_faces: int | None = None) -> AttentionShift:
    """Cover each part region of the loader's clean faces in turn (see the module docstring)."""
    if net.num_regions < 2:
        raise ValueError("a whole-face model has no regions to cover: measure a RAN variant with num_regions >= 2")
    was_training = net.training
    net.eval()
    k_all = net.num_regions
    shift = AttentionShift(region_names or [f"region {k}" for k in range(k_all)])
    loader.set_epoch(0)
    for batch in loader:
        keep = (batch["flags"] & SUBSET_MASK) == 0
        if max_faces is not None:
            keep &= torch.cumsum(keep.long(), 0) + shift.faces <= max_faces
        if not keep.any():
            continue
        images, labels = batch["images"][keep].float(), batch["labels"][keep]
        landmarks = batch["landmarks"][keep] if use_landmarks else None
        clean = net(images, landmarks)
        shift.clean_mu.append(clean.mu.float().cpu().numpy())
        shift.clean_right.append((clean.logits.argmax(1) == labels).cpu().numpy())
        boxes = net.region_boxes(images, landmarks)
        for k in range(1, k_all):
            covered = net(cover_box(images, boxes[:, k]), landmarks)
            shift.add(k, clean.mu, covered.mu, covered.logits.argmax(1) == labels)
        if max_faces is not None and shift.faces >= max_faces:
            break
    net.train(was_training)
    if shift.faces == 0:
        raise ValueError("no clean faces (without an occlusion or pose flag) to cover in this split")
    return shift


def _trained_on_split(weights: str | Path, data_dir: str | Path, split: str,
                      batch_size: int) -> tuple[TrainedModel, Any, list[str]]:
    """A trained model file, a torch loader (fp32, in this process) over the split, the region names."""
    from ranray.data.loader import build_loader

    trained = load_trained_model(weights)
    loader = build_loader(data_dir, split, batch_size=batch_size, training=False, backend="torch", num_threads=0)
    return trained, loader, region_names(trained.cfg.model.region_mode, trained.net.num_regions)


def measure_trained(weights: str | Path, data_dir: str | Path, split: str = "test",
                    max_faces: int | None = None, batch_size: int = 64) -> AttentionShift:
    """measure_attention_shift for a trained model file on a prepared split (torch loader, fp32)."""
    trained, loader, names = _trained_on_split(weights, data_dir, split, batch_size)
    return measure_attention_shift(trained.net, loader, trained.uses_landmarks, names, max_faces)


# ---------------------------------------------------------------------------------------------
# Each region's share of the decision, per subset of faces
# ---------------------------------------------------------------------------------------------

SHARE_SUBSETS = ("all", "clean", *SUBSET_FLAGS)  # clean: no subset flag (ranray.evaluation)


def subset_masks(flags: torch.Tensor) -> dict[str, torch.Tensor]:
    """Subset name -> which rows of a batch belong to it (a face may be in several: pose45 in pose30)."""
    masks = {"all": torch.ones_like(flags, dtype=torch.bool), "clean": (flags & SUBSET_MASK) == 0}
    return masks | {name: (flags & bit) != 0 for name, bit in SUBSET_FLAGS.items()}


@dataclass
class RegionShares:
    """Sums over faces of each region's share of the decision, per subset; means() divides."""

    region_names: list[str]
    sums: dict[str, np.ndarray] = field(default_factory=dict)  # subset -> (K,)
    faces: dict[str, int] = field(default_factory=dict)

    def add(self, shares: np.ndarray, masks: dict[str, torch.Tensor]) -> None:
        for name, mask in masks.items():
            keep = mask.cpu().numpy()
            self.sums[name] = self.sums.get(name, 0.0) + shares[keep].sum(0)
            self.faces[name] = self.faces.get(name, 0) + int(keep.sum())

    def means(self) -> dict[str, dict[str, float]]:
        """Subset -> region name -> mean share; only subsets with faces (each sums to 1)."""
        return {s: dict(zip(self.region_names, (self.sums[s] / self.faces[s]).tolist()))
                for s in SHARE_SUBSETS if self.faces.get(s)}

    def largest(self, subset: str = "all") -> tuple[str, float]:
        """The region with the largest mean share and that share: near 1 is a collapse onto it."""
        shares = self.means()[subset]
        name = max(shares, key=shares.get)
        return name, shares[name]

    def table(self) -> tuple[list[str], list[list[object]]]:
        means = self.means()
        headers = ["region", *(f"{s} ({self.faces[s]} faces)" for s in means)]
        rows = [[name, *(f"{means[s][name]:.3f}" for s in means)] for name in self.region_names]
        return headers, rows


@torch.no_grad()
def measure_region_shares(net: RegionAttentionNetwork, loader: Any, use_landmarks: bool,
                          region_names: list[str] | None = None) -> RegionShares:
    """Every face of the loader once: its regions' shares, summed into every subset it belongs to."""
    from ranray.train.plots import region_shares  # matplotlib: only where shares are measured

    was_training = net.training
    net.eval()
    totals = RegionShares(region_names or [f"region {k}" for k in range(net.num_regions)])
    loader.set_epoch(0)
    for batch in loader:
        out = net(batch["images"].float(), batch["landmarks"] if use_landmarks else None)
        # float64: the means over thousands of faces must still sum to 1
        shares = region_shares(out.mu.double().cpu().numpy(), out.nu.double().cpu().numpy())
        totals.add(shares, subset_masks(batch["flags"]))
    net.train(was_training)
    if not totals.faces.get("all"):
        raise ValueError("the split has no faces to measure")
    return totals


def shares_trained(weights: str | Path, data_dir: str | Path, split: str = "test",
                   batch_size: int = 64) -> RegionShares:
    """measure_region_shares for a trained model file on a prepared split (torch loader, fp32)."""
    trained, loader, names = _trained_on_split(weights, data_dir, split, batch_size)
    return measure_region_shares(trained.net, loader, trained.uses_landmarks, names)


@torch.no_grad()
def plot_attention_shift(net: RegionAttentionNetwork, images: torch.Tensor, labels: torch.Tensor,
                         landmarks: torch.Tensor | None, path: str | os.PathLike,
                         class_names: list[str] | None = None) -> Path:
    """Rows of faces: the clean face, then each region covered; every box labelled with its mu."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from ranray.data.schema import denormalize
    from ranray.train.plots import DPI, _save

    net.eval()
    n, k_all, side = images.shape[0], net.num_regions, images.shape[-1]
    boxes = net.region_boxes(images, landmarks)
    views = [images] + [cover_box(images, boxes[:, k]) for k in range(1, k_all)]
    outs = [net(v, landmarks) for v in views]
    fig = Figure(figsize=(1.9 * k_all, 2.0 * n), dpi=DPI, layout="constrained")
    axes = np.atleast_2d(fig.subplots(n, k_all, squeeze=False))
    px = boxes.float().cpu().numpy() * side
    for i in range(n):
        for c, (view, out) in enumerate(zip(views, outs)):
            ax = axes[i, c]
            ax.set_axis_off()
            ax.imshow(denormalize(view[i].float().cpu().numpy().transpose(1, 2, 0)))
            mu = out.mu[i].float().cpu().numpy()
            for k in range(1, k_all):
                x0, y0, x1, y1 = px[i, k]
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, linewidth=0.8 + 2 * mu[k],
                                       edgecolor=(1.0, 1.0 - mu[k], 0.0), linestyle="--" if k == c else "-"))
                ax.text(x0 + 1, y0 + 1 + 7 * (k % 2), f"{k}:{mu[k]:.2f}", fontsize=5.5, va="top",
                        color="black", bbox={"facecolor": "white", "alpha": 0.6, "pad": 0.3, "linewidth": 0})
            pred = int(out.logits[i].argmax())
            name = class_names[pred] if class_names else str(pred)
            truth = "ok" if pred == int(labels[i]) else "wrong"
            ax.set_title(f"{'clean' if c == 0 else f'cover {c}'}: {name} ({truth}) face mu {mu[0]:.2f}", fontsize=6)
    return _save(fig, path)


def report_trained(weights: str | Path, data_dir: str | Path, out_dir: str | Path, split: str = "test",
                   max_faces: int | None = None, picture_faces: int = 4, tracking_uri: str | None = None,
                   mlflow_run_id: str | None = None) -> tuple[AttentionShift, dict[str, Path]]:
    """measure_trained, plus attention_shift.json and attention_shift.png (the first clean faces) in
    out_dir; logged under plots/ of the MLflow run when one is given."""
    import json

    from ranray.data.loader import build_loader
    from ranray.tracking import log_run_artifacts

    shift = measure_trained(weights, data_dir, split, max_faces=max_faces)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trained = load_trained_model(weights)
    batch = next(iter(build_loader(data_dir, split, batch_size=64, training=False, backend="torch", num_threads=0)))
    keep = ((batch["flags"] & SUBSET_MASK) == 0).nonzero().flatten()[:picture_faces]
    landmarks = batch["landmarks"][keep] if trained.uses_landmarks else None
    files = {"json": out / "attention_shift.json", "png": out / "attention_shift.png"}
    files["json"].write_text(json.dumps({"faces": shift.faces, "clean_accuracy": shift.clean_accuracy,
                                         "regions": shift.summary()}, indent=1))
    plot_attention_shift(trained.net, batch["images"][keep].float(), batch["labels"][keep], landmarks, files["png"],
                         class_names=list(trained.class_names))
    if tracking_uri and mlflow_run_id:
        log_run_artifacts(tracking_uri, mlflow_run_id, files.values(), "plots")
    return shift, files
