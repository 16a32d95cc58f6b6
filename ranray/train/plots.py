"""Pictures logged with a run: the confusion matrix and faces with their attention weights.

Built on `matplotlib.figure.Figure` with the Agg canvas and never pyplot, so nothing touches
the global backend or needs a display, and Ray workers can draw concurrently.
Sizes are figsize x dpi exactly (no tight bounding box), so callers know the pixel size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ranray.data.schema import denormalize

DPI = 100
FACE_INCHES = 2.4


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def confusion_figure_size(num_classes: int) -> tuple[float, float]:
    side = max(4.0, 0.55 * num_classes + 2.0)
    return 2 * side + 1.0, side + 1.1  # the extra height holds the rotated class names


def plot_confusion_matrix(cm: Any, class_names: Sequence[str], path: str | os.PathLike,
                          title: str = "") -> Path:
    """Two panels: counts and row-normalised (recall per true class), values in every cell."""
    cm = _np(cm).astype(np.int64)
    n = cm.shape[0]
    if cm.shape != (n, n) or len(class_names) != n:
        raise ValueError(f"confusion matrix {cm.shape} does not match {len(class_names)} class names")
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    fig = Figure(figsize=confusion_figure_size(n), dpi=DPI, layout="constrained")
    left, right = fig.subplots(1, 2)
    _matrix_panel(left, cm, class_names, f"counts (n={int(cm.sum())})", cm.max() or 1, "{:d}")
    _matrix_panel(right, norm, class_names, "row-normalised (recall)", 1.0, "{:.2f}")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _matrix_panel(ax: Any, values: np.ndarray, names: Sequence[str], title: str, vmax: float,
                  fmt: str) -> None:
    ax.imshow(values, cmap="Blues", vmin=0, vmax=vmax)
    n = len(names)
    ax.set_xticks(range(n), names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    font = 9 if n <= 8 else 7
    for i in range(n):
        for j in range(n):
            # Dark text on light cells, white on dark, so every value stays readable.
            colour = "white" if values[i, j] > 0.6 * vmax else "black"
            ax.text(j, i, fmt.format(values[i, j].item()), ha="center", va="center",
                    color=colour, fontsize=font)


def attention_grid_shape(num_faces: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(max_cols, num_faces)
    return math.ceil(num_faces / cols), cols


def attention_figure_size(num_faces: int, max_cols: int = 4) -> tuple[float, float]:
    rows, cols = attention_grid_shape(num_faces, max_cols)
    return cols * FACE_INCHES, rows * (FACE_INCHES + 0.35)


def plot_attention_faces(images: Any, boxes: Any, mu: Any, nu: Any, preds: Sequence[int],
                         labels: Sequence[int], path: str | os.PathLike,
                         class_names: Sequence[str] | None = None, max_cols: int = 4) -> Path:
    """A grid of faces, each region drawn as a box labelled with its attention weights.

    images (N, 3, H, W) normalised as the loader yields them (ranray.data.schema.normalize);
    boxes (N, K, 4) as (x0, y0, x1, y1) pixels, region 0 the whole face; mu / nu (N, K) self- and
    relation-attention weights. Box colour and line width grow with mu; the whole face's weights
    go in the title because its box is the image border.
    """
    images, boxes, mu, nu = _np(images), _np(boxes), _np(mu), _np(nu)
    n = images.shape[0]
    if not (boxes.shape[:2] == mu.shape == nu.shape and boxes.shape[0] == n == len(preds) == len(labels)):
        raise ValueError(f"shapes disagree: images {images.shape}, boxes {boxes.shape}, mu {mu.shape}, "
                         f"nu {nu.shape}, {len(preds)} preds, {len(labels)} labels")
    names = list(class_names) if class_names is not None else None
    rows, cols = attention_grid_shape(n, max_cols)
    fig = Figure(figsize=attention_figure_size(n, max_cols), dpi=DPI, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i < n:
            _face_panel(ax, images[i], boxes[i], mu[i], nu[i], int(preds[i]), int(labels[i]), names)
    return _save(fig, path)


def _face_panel(ax: Any, image: np.ndarray, boxes: np.ndarray, mu: np.ndarray, nu: np.ndarray,
                pred: int, label: int, names: list[str] | None) -> None:
    rgb = denormalize(image.transpose(1, 2, 0))
    ax.imshow(rgb)
    span = float(mu.max() - mu.min()) or 1.0
    for k in range(1, boxes.shape[0]):
        x0, y0, x1, y1 = boxes[k]
        strength = (mu[k] - mu.min()) / span
        colour = (1.0, 1.0 - strength, 0.0)  # yellow (weakest) to red (strongest)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour,
                               linewidth=1.0 + 2.0 * strength))
        ax.text(x0 + 1, y0 + 1, f"μ{mu[k]:.2f} ν{nu[k]:.2f}", color="white" if strength > 0.5 else "black",
                fontsize=6.5, va="top",
                bbox={"facecolor": colour, "alpha": 0.75, "pad": 0.5, "linewidth": 0})
    pred_name = names[pred] if names else str(pred)
    true_name = names[label] if names and 0 <= label < len(names) else str(label)
    ax.set_title(f"pred {pred_name} / true {true_name}\nwhole face μ{mu[0]:.2f} ν{nu[0]:.2f}",
                 fontsize=8, color="darkgreen" if pred == label else "firebrick")
