"""A trained RAN as an MLflow model: logged with its run, registered, loaded back by URI.

    log_best_model(tracker, best, cfg)      at the end of fine-tuning (rank 0): the best model as an
                                            MLflow pyfunc model under the run's `ran_model/`,
                                            registered as a new version of tracking.register_model
                                            (when that is set); returns the version
    load_registered_model("models:/NAME/VERSION", tracking_uri)   -> TrainedModel (also
                                            models:/NAME/latest and models:/NAME@alias)
    RanPyfunc                               the pyfunc: predict(aligned faces) -> per face its
                                            class, probabilities and attention per region

The model folder holds the exported weights (best.pt), their config (best.yaml) and the data card
(best.data.json, ranray.model_card) as pyfunc artifacts; the same files load_trained_model reads.
Loading needs ranray installed (the pyfunc's code is ranray's), as serving any ranray model does.
Besides ranray.tracking this is the only module that imports mlflow.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch
from mlflow.artifacts import download_artifacts
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ranray.model_card import card_path, write_data_card

MODEL_ARTIFACT = "ran_model"
WEIGHTS, CONFIG, CARD = "weights", "config", "data_card"
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))$")


class RanPyfunc(mlflow.pyfunc.PythonModel):
    """predict(model_input) with model_input one of
        (N, S, S, 3) uint8 RGB aligned faces (as `ranray prepare` stores them),
        {"images": that, "landmarks": (N, 68, 2) aligned pixels}  (landmark-region models need them)
    returns one dict per face: label, probabilities {class: p}, attention [{region, box, mu, nu}]."""

    def load_context(self, context: Any) -> None:
        from ranray.train.evaluate import load_trained_model

        self.trained = load_trained_model(context.artifacts[WEIGHTS])

    # No type hints here: MLflow would read them as an input schema (and warn that it cannot).
    def predict(self, context, model_input, params=None):
        from dataclasses import asdict

        from ranray.train.evaluate import classify_aligned

        images, landmarks = _faces_input(model_input)
        return [asdict(r) for r in classify_aligned(self.trained, images, landmarks)]


def _faces_input(model_input: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    from ranray.data.schema import FACE_SIZE, normalize

    raw = model_input.get("images") if isinstance(model_input, dict) else model_input
    faces = np.asarray(raw)
    if faces.ndim == 3:
        faces = faces[None]
    if faces.ndim != 4 or faces.shape[1:] != (FACE_SIZE, FACE_SIZE, 3):
        raise ValueError(f"expected aligned RGB faces of shape (N, {FACE_SIZE}, {FACE_SIZE}, 3), "
                         f"got {faces.shape}")
    images = normalize(torch.from_numpy(faces.astype(np.float32)).permute(0, 3, 1, 2))
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


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, version or "latest" or None, alias or None) of models:/NAME/VERSION or models:/NAME@ALIAS."""
    m = _MODEL_URI.match(uri)
    if not m:
        raise ValueError(f"{uri!r} is not models:/NAME/VERSION, models:/NAME/latest or models:/NAME@ALIAS")
    return m["name"], m["version"], m["alias"]


def resolve_version(client: MlflowClient, uri: str) -> Any:
    """The ModelVersion a models:/ URI means; ValueError naming the model when there is none."""
    name, version, alias = parse_model_uri(uri)
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        if version == "latest":
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise ValueError(f"registered model {name!r} has no versions")
            return max(versions, key=lambda v: int(v.version))
        return client.get_model_version(name, version)
    except MlflowException as exc:
        raise ValueError(f"{uri}: {exc.message}") from exc


def load_registered_model(uri: str, tracking_uri: str | None = None, device: str | torch.device = "cpu") -> Any:
    """Download a registered RAN (models:/...) and load it as ranray.train.evaluate.TrainedModel."""
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not tracking_uri:
        raise ValueError(f"{uri} names a registered model: give the MLflow store with --tracking-uri "
                         "or MLFLOW_TRACKING_URI")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = resolve_version(client, uri)
    source = client.get_model_version_download_uri(version.name, version.version)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per file, on any stream
    with tempfile.TemporaryDirectory(prefix="ranray-model-") as tmp:
        local = download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=tracking_uri)
        try:
            model = mlflow.pyfunc.load_model(local).unwrap_python_model()
        except MlflowException as exc:
            raise ValueError(f"{uri} is not an MLflow model ({exc.message})") from exc
        if not isinstance(model, RanPyfunc):
            raise ValueError(f"{uri} is a {type(model).__name__}, not a ranray RAN model")
    trained = model.trained
    trained.net.to(device)
    trained.source, trained.weights = f"{uri} (run {version.run_id})", None
    return trained
