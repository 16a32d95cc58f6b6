"""A trained RAN as an MLflow model: the pyfunc class, its folder, logged with its run and registered.

    log_best_model(tracker, best, cfg)      after fine-tuning (the driver, ranray.tracking.Tracker.log_model):
                                            the best model as an MLflow pyfunc under the run's
                                            `ran_model/`, registered as a new version of
                                            tracking.register_model (when that is set); returns the version
    save_pyfunc(best, out)                  that model folder, written locally
    RanPyfunc                               the pyfunc: predict(aligned faces) -> per face its
                                            class, probabilities and attention per region

The model folder holds the exported weights (best.pt), their config (best.yaml) and the data card
(best.data.json, ranray.model_card) as pyfunc artifacts; the same files ranray.inference reads.
Loading a registered model back (models:/...) is ranray.inference's (with ranray.model_registry),
which reads those files and never unpickles this class. Serving the pyfunc needs ranray installed
(its code is ranray's). This module depends on ranray.inference, never the reverse.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch

from ranray.data.schema import FACE_SIZE
from ranray.inference import classify_aligned, faces_tensor, load_trained_model
from ranray.model_card import card_path, write_data_card
from ranray.model_registry import CARD, CONFIG, WEIGHTS

MODEL_ARTIFACT = "ran_model"


class RanPyfunc(mlflow.pyfunc.PythonModel):
    """predict(model_input) with model_input one of
        (N, S, S, 3) uint8 RGB aligned faces (as `ranray prepare` stores them),
        {"images": that, "landmarks": (N, 68, 2) aligned pixels}  (landmark-region models need them)
    returns one dict per face: label, probabilities {class: p}, attention [{region, box, mu, nu}]."""

    def load_context(self, context: Any) -> None:
        self.trained = load_trained_model(context.artifacts[WEIGHTS])

    # No type hints here: MLflow would read them as an input schema (and warn that it cannot).
    def predict(self, context, model_input, params=None):
        images, landmarks = _faces_input(model_input)
        return [asdict(r) for r in classify_aligned(self.trained, images, landmarks)]


def _faces_input(model_input: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    raw = model_input.get("images") if isinstance(model_input, dict) else model_input
    faces = np.asarray(raw)
    if faces.ndim == 3:
        faces = faces[None]
    if faces.ndim != 4 or faces.shape[1:] != (FACE_SIZE, FACE_SIZE, 3):
        raise ValueError(f"expected aligned RGB faces of shape (N, {FACE_SIZE}, {FACE_SIZE}, 3), "
                         f"got {faces.shape}")
    images = faces_tensor(faces)
    lm = model_input.get("landmarks") if isinstance(model_input, dict) else None
    landmarks = torch.as_tensor(np.asarray(lm, dtype=np.float32)) if lm is not None else None
    return images.contiguous(), landmarks


def save_pyfunc(best: str | os.PathLike, out: str | os.PathLike, data_dir: str | os.PathLike = "") -> Path:
    """The MLflow model folder of an exported RAN (best.pt + best.yaml) at `out`."""
    best = Path(best)
    artifacts = {WEIGHTS: str(best), CONFIG: str(best.with_suffix(".yaml"))}
    card = card_path(best)
    if not card.is_file() and data_dir and Path(data_dir).is_dir():
        card = write_data_card(best, data_dir)
    if card.is_file():
        artifacts[CARD] = str(card)
    # pip_requirements given: MLflow's inference would import-trace a subprocess (slow, and it
    # cannot see that ranray itself is the code).
    mlflow.pyfunc.save_model(path=str(out), python_model=RanPyfunc(), artifacts=artifacts,
                             pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "ranray"])
    return Path(out)


def log_best_model(tracker: Any, best: str | os.PathLike, cfg: Any, name: str | None = None) -> str | None:
    """Log `best` (an exported model) as the run's MLflow model and register it under `name`
    (default: cfg.tracking.register_model; empty: logged, not registered). Returns the version
    (None when not registered, or the store is unreachable: the tracker keeps it for a sync)."""
    name = name if name is not None else getattr(cfg.tracking, "register_model", "")
    model_dir = Path(best).parent / MODEL_ARTIFACT  # kept: offline, a later sync uploads it
    shutil.rmtree(model_dir, ignore_errors=True)
    save_pyfunc(best, model_dir, data_dir=cfg.data.dir)
    tracker.log_artifact(model_dir, MODEL_ARTIFACT)
    return tracker.register_model(name, MODEL_ARTIFACT) if name else None
