"""Every file of a run, named once: the run directory, storage_path/run_name.

Beside the checkpoint_* folders (written by Ray Train, or by the local runtime: ranray.train.local)
and Ray Train's checkpoint_manager_snapshot.json (ranray.train.commits):

    config.yaml                       the job's config; a resumed run is checked against it
    model/best.pt, model/final.pt     fine-tuning's exported models (+ .yaml beside each)
    model/backbone_best.pt, model/backbone.pt    pretraining's exported backbones (+ .yaml)
    model/test_metrics.json           the clean protocol's one test of model/best.pt
    plots/confusion_val.png, plots/attention_faces.png
    logs/rank<r>.log                  each worker's stderr (ranray.failures)
    mlflow.db, mlartifacts/           the default MLflow store and its artifacts (ranray.tracking)
    tracking.json                     the MLflow run of this directory, so a re-run resumes it
    metrics.jsonl                     what the tracker kept while MLflow was unreachable
    metrics.synced.jsonl              those records once pushed (`ranray track sync`, or the run's end)
A Tune search's summary directory is a RunDir too (its tracking files only).

Exported models are plain state_dicts, never read as checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def __fspath__(self) -> str:
        return os.fspath(self.root)

    def __truediv__(self, other: str | os.PathLike) -> Path:
        return self.root / other

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def best_model(self) -> Path:
        return self.model / "best.pt"

    @property
    def final_model(self) -> Path:
        return self.model / "final.pt"

    @property
    def best_backbone(self) -> Path:
        return self.model / "backbone_best.pt"

    @property
    def backbone(self) -> Path:
        return self.model / "backbone.pt"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def confusion(self) -> Path:
        return self.plots / "confusion_val.png"

    @property
    def attention(self) -> Path:
        return self.plots / "attention_faces.png"

    @property
    def test_metrics(self) -> Path:
        return self.model / "test_metrics.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def worker_log(self, rank: int) -> Path:
        return self.logs / f"rank{rank}.log"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def tracking_record(self) -> Path:
        return self.root / "tracking.json"

    @property
    def offline_metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def synced_metrics(self) -> Path:
        return self.root / "metrics.synced.jsonl"
