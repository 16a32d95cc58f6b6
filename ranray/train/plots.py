"""Pictures logged with a run: the confusion matrix and faces with their attention weights.

Built on `matplotlib.figure.Figure` with the Agg canvas and never pyplot, so nothing touches
the global backend or needs a display, and Ray workers can draw concurrently.
Sizes are figsize x dpi exactly (no tight bounding box), so callers know the pixel size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ranray.data.schema import FLAG_OCCLUSION, denormalize

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


# ---------------------------------------------------------------------------------------------
# Attention: one row per face, one small panel per region with its share
# ---------------------------------------------------------------------------------------------

PANEL_INCHES = 1.15
PANEL_SIDE_INCHES = 1.0  # the image inside its panel; the rest is space between panels
PANEL_BELOW_INCHES = 0.2  # under each image: its mu and nu
ROW_EXTRA_INCHES = 0.45  # the titles above each row's panels
CARD_GAP_INCHES = 0.3  # between the clean and the occluded column
GROUP_TITLE_INCHES = 0.3  # "clean faces" / "occluded faces" above their columns
TITLE_PAD_INCHES = 0.08  # between a picture and its title
GROUPS = (("clean", False), ("occluded", True))


def region_shares(mu: np.ndarray, nu: np.ndarray) -> np.ndarray:
    """Each region's share of the final face representation: the RAN pools region features with
    weights mu * nu (self- times relation-attention), normalised to sum to 1 per face."""
    w = mu * nu
    return w / np.maximum(w.sum(axis=-1, keepdims=True), 1e-12)


def attention_columns(num_faces: int, flags: Any = None) -> list[tuple[str | None, list[int]]]:
    """The picture's columns as (title, face indices): every face in one untitled column, or with
    flags the clean faces and the occluded ones side by side. A group without a face gets no column
    (an occlusion-only evaluation draws the occluded column alone)."""
    if flags is None:
        return [(None, list(range(num_faces)))]
    occluded = (_np(flags).astype(np.int64) & FLAG_OCCLUSION) != 0
    columns = [(f"{name} faces", [i for i in range(num_faces) if bool(occluded[i]) == want]) for name, want in GROUPS]
    return [c for c in columns if c[1]] or columns[:1]


def attention_figure_size(num_faces: int, num_regions: int = 6, flags: Any = None) -> tuple[float, float]:
    return _figure_size(attention_columns(num_faces, flags), num_regions)


def _figure_size(columns: list[tuple[str | None, list[int]]], num_regions: int) -> tuple[float, float]:
    cards = len(columns)
    rows = max(1, max(len(faces) for _, faces in columns))
    width = cards * (num_regions + 1) * PANEL_INCHES + (cards - 1) * CARD_GAP_INCHES
    return width, rows * (PANEL_INCHES + ROW_EXTRA_INCHES) + _title_band(columns)


def _title_band(columns: list[tuple[str | None, list[int]]]) -> float:
    """The height above the columns for their titles: none when the faces are not grouped."""
    return GROUP_TITLE_INCHES if any(title for title, _ in columns) else 0.0


def plot_attention_faces(images: Any, boxes: Any, mu: Any, nu: Any, preds: Sequence[int],
                         labels: Sequence[int], path: str | os.PathLike,
                         class_names: Sequence[str] | None = None, flags: Any = None,
                         region_names: Sequence[str] | None = None) -> Path:
    """Which region carried each face's decision, readable on a 112-pixel face.

    Per face a row: the face with the box of the region that carried most of the decision, then
    one small panel per region: its crop, its share of the final representation (mu * nu
    normalised, region_shares) in large type, mu and nu below; the largest share is framed red. With `flags` (the loader's) the clean faces go in a
    left column and the occluded ones in a right column, side by side (attention_columns).

    images (N, 3, H, W) normalised as the loader yields them (ranray.data.schema.normalize);
    boxes (N, K, 4) as (x0, y0, x1, y1) pixels, region 0 the whole face; mu / nu (N, K).
    """
    images, boxes, mu, nu = _np(images), _np(boxes), _np(mu), _np(nu)
    n = images.shape[0]
    if not (boxes.shape[:2] == mu.shape == nu.shape and boxes.shape[0] == n == len(preds) == len(labels)):
        raise ValueError(f"shapes disagree: images {images.shape}, boxes {boxes.shape}, mu {mu.shape}, "
                         f"nu {nu.shape}, {len(preds)} preds, {len(labels)} labels")
    k = mu.shape[1]
    names = list(region_names) if region_names is not None else ["whole face", *(f"region {i}" for i in range(1, k))]
    classes = list(class_names) if class_names is not None else None
    shares = region_shares(mu, nu)
    columns = attention_columns(n, flags)
    width, height = _figure_size(columns, k)
    fig = Figure(figsize=(width, height), dpi=DPI)
    # One canvas in inches for every image and label: one matplotlib Axes per panel (56 for 8 faces)
    # cost a second of a run's end to build and draw.
    canvas = fig.add_axes((0, 0, 1, 1))
    top = height - _title_band(columns)
    for c, (title, faces) in enumerate(columns):
        left = c * ((k + 1) * PANEL_INCHES + CARD_GAP_INCHES)
        if title:
            canvas.text(left + (k + 1) * PANEL_INCHES / 2, top + 0.05, title, ha="center", va="bottom",
                        fontsize=10, fontweight="bold")
        for r, face in enumerate(faces):
            bottom = top - (r + 1) * (PANEL_INCHES + ROW_EXTRA_INCHES) + PANEL_BELOW_INCHES
            lefts = [left + j * PANEL_INCHES + (PANEL_INCHES - PANEL_SIDE_INCHES) / 2 for j in range(k + 1)]
            _face_row(canvas, lefts, bottom, images[face], boxes[face], shares[face], mu[face], nu[face], names,
                      _title(int(preds[face]), int(labels[face]), classes), int(preds[face]) == int(labels[face]))
    canvas.set_xlim(0, width)
    canvas.set_ylim(0, height)
    canvas.set_aspect("auto")
    canvas.set_axis_off()
    return _save(fig, path)


def _title(pred: int, label: int, classes: list[str] | None) -> str:
    def name(i: int) -> str:
        return classes[i] if classes and 0 <= i < len(classes) else str(i)

    return f"pred {name(pred)}\ntrue {name(label)}"


def _face_row(canvas: Any, lefts: Sequence[float], bottom: float, image: np.ndarray, boxes: np.ndarray,
              shares: np.ndarray, mu: np.ndarray, nu: np.ndarray, names: list[str], title: str, correct: bool) -> None:
    """The face and its regions' crops, each fitted into a PANEL_SIDE_INCHES square at `lefts`[j]."""
    rgb = denormalize(image.transpose(1, 2, 0))
    best = int(np.argmax(shares))
    x, y, scale = _panel(canvas, rgb, lefts[0], bottom)
    top = y + rgb.shape[0] * scale
    x0, y0, x1, y1 = boxes[best]
    canvas.add_patch(Rectangle((x + x0 * scale, top - y1 * scale), (x1 - x0) * scale, (y1 - y0) * scale,
                               fill=False, edgecolor="red", linewidth=2.5))
    centre = lefts[0] + PANEL_SIDE_INCHES / 2
    canvas.text(centre, top + TITLE_PAD_INCHES, title, ha="center", va="bottom", fontsize=8,
                color="darkgreen" if correct else "firebrick")
    for j, left in enumerate(lefts[1:]):
        x0, y0, x1, y1 = (int(round(v)) for v in boxes[j])
        crop = rgb[max(0, y0):max(y0 + 1, y1), max(0, x0):max(x0 + 1, x1)]
        x, y, scale = _panel(canvas, crop, left, bottom)
        w, h = crop.shape[1] * scale, crop.shape[0] * scale
        centre = left + PANEL_SIDE_INCHES / 2
        canvas.text(centre, y + h + TITLE_PAD_INCHES, f"{names[j]}\n{shares[j]:.0%}", ha="center", va="bottom",
                    fontsize=8, fontweight="bold" if j == best else "normal",
                    color="firebrick" if j == best else "black")
        canvas.text(centre, y - 0.04, f"μ {mu[j]:.2f}  ν {nu[j]:.2f}", ha="center", va="top", fontsize=6.5)
        if j == best:
            canvas.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="red", linewidth=3, clip_on=False))


def _panel(canvas: Any, picture: np.ndarray, left: float, bottom: float) -> tuple[float, float, float]:
    """`picture` fitted and centred in the square at (left, bottom): its corner (x, y) and inches per pixel."""
    h, w = picture.shape[:2]
    scale = PANEL_SIDE_INCHES / max(h, w)
    x, y = left + (PANEL_SIDE_INCHES - w * scale) / 2, bottom + (PANEL_SIDE_INCHES - h * scale) / 2
    canvas.imshow(picture, extent=(x, x + w * scale, y, y + h * scale))
    return x, y, scale
