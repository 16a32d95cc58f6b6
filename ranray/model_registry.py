"""The MLflow Model Registry side of a ranray model: a models:/ URI made into a local weights file.

    parse_model_uri(uri)                   (name, version or "latest", alias) of models:/NAME/VERSION,
                                           models:/NAME/latest or models:/NAME@ALIAS
    resolve_version(client, uri)           the registered ModelVersion the URI means
    download_weights(uri, tracking_uri, dst)   the model folder downloaded into dst: its weights
                                           file (the .yaml config and data card beside it), and
                                           the version

A registered ranray model is an MLflow pyfunc folder (written by ranray.model_store) whose
artifacts are the exported weights (WEIGHTS), their config and data card; its MLmodel file names
them. The weights are read from the folder as any exported model is (ranray.inference), never by
unpickling the pyfunc class. mlflow is imported inside the functions that talk to the store, so
importing this module (as ranray.inference does) costs nothing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

WEIGHTS, CONFIG, CARD = "weights", "config", "data_card"  # the pyfunc's artifact keys
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))$")


def is_model_uri(path: str | os.PathLike) -> bool:
    return str(path).startswith("models:/")


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, version or "latest" or None, alias or None) of models:/NAME/VERSION or models:/NAME@ALIAS."""
    m = _MODEL_URI.match(uri)
    if not m:
        raise ValueError(f"{uri!r} is not models:/NAME/VERSION, models:/NAME/latest or models:/NAME@ALIAS")
    return m["name"], m["version"], m["alias"]


def resolve_version(client: Any, uri: str) -> Any:
    """The ModelVersion a models:/ URI means; ValueError naming the model when there is none."""
    from mlflow.exceptions import MlflowException

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


def download_weights(uri: str, tracking_uri: str | None, dst: str | os.PathLike) -> tuple[Path, Any]:
    """Download the registered model `uri` from the store at `tracking_uri` (default
    MLFLOW_TRACKING_URI) into `dst`: (its weights file, the ModelVersion)."""
    from mlflow.artifacts import download_artifacts
    from mlflow.tracking import MlflowClient

    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not tracking_uri:
        raise ValueError(f"{uri} names a registered model: give the MLflow store with --tracking-uri "
                         "or MLFLOW_TRACKING_URI")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = resolve_version(client, uri)
    source = client.get_model_version_download_uri(version.name, version.version)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per file, on any stream
    local = download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=tracking_uri)
    return weights_in_model_folder(Path(local), uri), version


def weights_in_model_folder(folder: Path, uri: str) -> Path:
    """The weights file an MLflow model folder's MLmodel names; ValueError naming `uri` otherwise."""
    mlmodel = folder / "MLmodel"
    if not mlmodel.is_file():
        raise ValueError(f"{uri} is not an MLflow model (no MLmodel file in it)")
    flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
    weights = (flavor.get("artifacts") or {}).get(WEIGHTS, {}).get("path")
    if not weights or not (folder / weights).is_file():
        raise ValueError(f"{uri} is not a ranray RAN model (its MLmodel names no '{WEIGHTS}' artifact)")
    return folder / weights
