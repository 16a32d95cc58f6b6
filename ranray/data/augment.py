"""What both pixel backends (ranray.data.loader's torch path, ranray.data.dali_pipeline) share: the
per-sample augmentation parameters, drawn in numpy from (seed, epoch, rank, batch) so both backends
and a resumed run draw the same ones, the landmark transform, and HostBatch (a batch before pixels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ranray.config import AugmentConfig
from ranray.data.schema import FACE_SIZE
from ranray.data.shards import Rows

# iBUG 68-point scheme: the index each point takes after a horizontal flip (jaw, brows, nose, eyes,
# outer and inner lips mirror; the nose bridge and the lips' centre line stay).
FLIP_68 = np.array(
    list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30] + [35, 34, 33, 32, 31]
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55] + [64, 63, 62, 61, 60, 67, 66, 65])

CENTRE = FACE_SIZE / 2.0  # rotation / flip centre in continuous image coordinates


# ---------------------------------------------------------------------------------------------
# Augmentation parameters (shared by both backends)
# ---------------------------------------------------------------------------------------------


@dataclass
class AugmentParams:
    """Per-sample parameters; arrays have the batch as their first axis."""

    flip: np.ndarray  # bool
    linear: np.ndarray  # (n, 2, 2) forward map about the centre: scale * rotation * flip
    brightness: np.ndarray
    contrast: np.ndarray
    saturation: np.ndarray
    blur_sigma: np.ndarray  # 0: no blur
    erase_box: np.ndarray  # (n, 4) y, x, h, w in pixels; h = w = 0: no patch
    erase_fill: np.ndarray  # (n, 3) RGB of the occluding patch

    def select(self, keep: np.ndarray) -> "AugmentParams":
        return AugmentParams(**{f: getattr(self, f)[keep] for f in self.__dataclass_fields__})

    def inverse_matrices(self) -> np.ndarray:
        """(n, 2, 3) destination -> source maps in pixel units (DALI warp_affine's `matrix`)."""
        inv = np.linalg.inv(self.linear)
        shift = CENTRE - inv @ np.array([CENTRE, CENTRE])
        return np.concatenate([inv, shift[:, :, None]], axis=2).astype(np.float32)

    def grid_theta(self) -> torch.Tensor:
        """(n, 2, 3) for F.affine_grid: the same map in [-1, 1] coordinates (square image, so no shift)."""
        inv = np.linalg.inv(self.linear)
        return torch.from_numpy(np.concatenate([inv, np.zeros((len(inv), 2, 1))], axis=2)).float()


def sample_augment(cfg: AugmentConfig, n: int, rng: np.random.Generator) -> AugmentParams:
    """Draw every random number in a fixed order, so switching one augmentation off leaves the others."""
    flip = rng.random(n) < 0.5
    angle = np.deg2rad(rng.uniform(-1.0, 1.0, n) * cfg.rotate_deg)
    scale = rng.uniform(cfg.scale_min, cfg.scale_max, n)
    jitter = rng.uniform(-1.0, 1.0, (3, n))
    blur_on, sigma = rng.random(n) < cfg.blur_prob, rng.uniform(0.5, 1.5, n)
    erase_on, box, fill = rng.random(n) < cfg.erase_prob, _erase_boxes(cfg, n, rng), rng.integers(0, 256, (n, 3))
    flip &= cfg.flip
    cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
    linear = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], 1)
    linear[:, :, 0] *= np.where(flip, -1.0, 1.0)[:, None]  # mirror x before rotating
    return AugmentParams(
        flip=flip, linear=linear,
        brightness=np.maximum(0.0, 1.0 + cfg.brightness * jitter[0]).astype(np.float32),
        contrast=np.maximum(0.0, 1.0 + cfg.contrast * jitter[1]).astype(np.float32),
        saturation=np.maximum(0.0, 1.0 + cfg.saturation * jitter[2]).astype(np.float32),
        blur_sigma=np.where(blur_on, sigma, 0.0).astype(np.float32),
        erase_box=np.where(erase_on[:, None], box, 0.0).astype(np.float32),
        erase_fill=fill.astype(np.float32))


def _erase_boxes(cfg: AugmentConfig, n: int, rng: np.random.Generator) -> np.ndarray:
    """Random-erasing rectangles: area 2%..erase_max_frac of the face, aspect 0.3..3.3, inside it."""
    area = rng.uniform(0.02, max(0.02, cfg.erase_max_frac), n) * FACE_SIZE ** 2
    aspect = np.exp(rng.uniform(math.log(0.3), math.log(3.3), n))
    h = np.clip(np.round(np.sqrt(area * aspect)), 1, FACE_SIZE)
    w = np.clip(np.round(np.sqrt(area / aspect)), 1, FACE_SIZE)
    y = np.floor(rng.random(n) * (FACE_SIZE - h + 1))
    x = np.floor(rng.random(n) * (FACE_SIZE - w + 1))
    return np.stack([y, x, h, w], axis=1)


def transform_landmarks(landmarks: np.ndarray, params: AugmentParams) -> np.ndarray:
    """Move (n, 68, 2) pixel-index landmarks with the images' affine; swap left/right on a flip."""
    pivot = CENTRE - 0.5  # the centre in pixel-index coordinates
    moved = (landmarks - pivot) @ params.linear.transpose(0, 2, 1) + pivot
    moved[params.flip] = moved[params.flip][:, FLIP_68]
    return moved.astype(np.float32)


@dataclass
class HostBatch:
    """One batch before pixels: good rows only, their augmentation, and what was skipped."""

    index: int
    rows: Rows
    params: AugmentParams | None
    pixels: np.ndarray | None = None  # (n, H, W, 3) uint8 when decoded on the host (torch path)
    skipped: list[str] = field(default_factory=list)  # one "file row N (key): reason" per bad row
