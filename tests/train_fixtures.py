"""A tiny prepared dataset that a tiny RAN can learn in two epochs, and a matching train config.

shard_fixtures draws the same face for every class; here each class also gets a coloured mouth
patch, so "loss falls" and "accuracy beats chance" are checks of the training loop, not of luck.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw
from shard_fixtures import draw_face, write_dataset

from ranray.config import TrainConfig, load_config

NUM_CLASSES = 4
CLASS_COLOURS = ((230, 30, 30), (30, 200, 30), (30, 30, 230), (240, 240, 30))
SPLITS = {"train": 96, "val": 32, "test": 32}  # multiples of NUM_CLASSES, see ClassPainter
INPUT_SIZE = 64  # tiny_config's backbone input: the 112-px faces resampled (see tiny_config)


class ClassPainter:
    """write_dataset labels row i with i % num_classes and draws rows in order, split after split;
    with every split a multiple of NUM_CLASSES long, a call counter gives each face its label."""

    def __init__(self):
        self.calls = 0

    def __call__(self, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
        img, landmarks = draw_face(rng)
        label = self.calls % NUM_CLASSES
        self.calls += 1
        ImageDraw.Draw(img).rectangle([38, 78, 74, 98], fill=CLASS_COLOURS[label])
        return img, landmarks


def learnable_dataset(root: Path) -> Path:
    assert all(n % NUM_CLASSES == 0 for n in SPLITS.values())
    return write_dataset(root, SPLITS, num_classes=NUM_CLASSES, draw=ClassPainter())


def tiny_config(data_dir: Path, storage: Path, name: str, *overrides: str, hooks: tuple[str, ...] = ()) -> TrainConfig:
    """2 workers, batch 8: 6 steps per epoch; a checkpoint every 2 steps, the loss logged every step,
    every step recorded in steps/rank<r>.log (step_hooks.StepsLog). The 112-px faces reach the
    backbone at 64 px: the mouth patch is still 20 px wide there, and a step costs a third."""
    return load_config(TrainConfig, None, [
        f"data.dir={data_dir}", f"run.storage_path={storage}", f"run.name={name}",
        "data.loader=torch", "data.num_threads=0", "data.augment.enabled=false",
        "model.backbone=iresnet_tiny", f"model.num_classes={NUM_CLASSES}", "model.num_regions=3",
        f"model.input_size={INPUT_SIZE}",
        "optim.name=sgd", "optim.lr=0.05", "optim.schedule=cosine", "optim.weight_decay=0.0",
        "epochs=2", "batch_size=8", "precision=fp32",
        "scaling.num_workers=2", "checkpoint.every_n_steps=2", "checkpoint.keep=2", "log_every_n_steps=1",
        "tracking.experiment=ranray-test", *hooks_override("step_hooks:StepsLog", *hooks), *overrides])


def hooks_override(*hooks: str) -> list[str]:
    """`run.hooks=[...]` as a key=value override (JSON is YAML)."""
    return [f"run.hooks={json.dumps(list(hooks))}"]


def first_face_file(data_dir: Path, out: Path, split: str = "test") -> Path:
    """The split's first aligned face, written as an image file (what `ranray predict --detector given` reads)."""
    row = pq.read_table(sorted((data_dir / split).glob("*.parquet"))[0]).slice(0, 1).to_pylist()[0]
    Image.open(io.BytesIO(row["image"])).save(out)
    return out


def calibrated(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """Set BN running stats to this batch's statistics (one cumulative pass), then eval: no batch coupling."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()
