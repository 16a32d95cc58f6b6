"""What each job kind is and where its run lives; shared by the driver (launch) and both runtimes.

    JOBS              TrainConfig / PretrainConfig -> Job: the workers' function, the files a run
                      leaves, its MLflow tags, whether its best model becomes an MLflow model
    run names         cfg.run.name, else `<tag>-<timestamp>`
    storage           cfg.run.storage_path made absolute (or a URI), and the local run directory
    worker_config     the dict every worker's function gets (Ray's train_loop_config)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ranray.config import PretrainConfig, TrainConfig, to_dict
from ranray.train.progress import resolve_progress


@dataclass(frozen=True)
class Job:
    """What the driver needs to know of a job: its workers' function and the files it leaves."""

    verb: str  # in messages: "training failed: ..."
    tag: str  # MLflow's "job" tag, and the prefix of a generated run name
    worker: str  # "module:function(config, runtime)" that every worker runs
    # RunDir properties of what a run leaves, the final model first (a run that has it is finished),
    # then the best model; they name the result's artifacts
    outputs: tuple[str, ...]
    tags: Callable[[Any], dict[str, str]] = lambda cfg: {}
    logs_model: bool = False  # the driver logs the best model as an MLflow model after fit (tracker.log_model)


def training_tags(cfg: TrainConfig) -> dict[str, str]:
    """A fine-tuning run's MLflow tags, set by the driver when it opens the run and again by the task."""
    return {"train_subset": cfg.data.train_subset, "protocol": cfg.protocol, "model_variant": cfg.model.variant}


JOBS: dict[type, Job] = {
    TrainConfig: Job("training", "train", "ranray.train.finetune:train_func_per_worker",
                     ("final_model", "best_model", "confusion", "attention"), tags=training_tags,
                     logs_model=True),
    PretrainConfig: Job("pretraining", "pretrain", "ranray.train.pretrain:train_func_per_worker",
                        ("backbone", "best_backbone")),
}


def is_uri(path: str) -> bool:
    return "://" in path


def resolve_run_name(cfg: TrainConfig | PretrainConfig) -> str:
    return cfg.run.name or time.strftime(f"{JOBS[type(cfg)].tag}-%Y%m%d-%H%M%S")


def resolve_storage_path(cfg: TrainConfig | PretrainConfig) -> str:
    """Ray wants an absolute local path or a URI (s3://, gs://, ...)."""
    path = cfg.run.storage_path or "runs"
    return path if is_uri(path) else str(Path(path).expanduser().resolve())


def run_dir_for(storage_path: str, run_name: str) -> Path:
    """Where the workers write side files: Ray's run folder, or with URI storage (where a sqlite
    MLflow store cannot live) a local ./runs/<name>."""
    return (Path("runs").resolve() if is_uri(storage_path) else Path(storage_path)) / run_name


def worker_config(cfg: TrainConfig | PretrainConfig, run_name: str, run_dir: Path, *,
                  tracking_run_id: str | None = None, parent_run_id: str | None = None,
                  plan: Any = None) -> dict[str, Any]:
    """What every worker's function gets: the config (run.progress resolved here, where the
    user's terminal is: workers never have one), the run's name and directory, the MLflow run to
    log into, pretraining's plan."""
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, progress=resolve_progress(cfg.run.progress)))
    config = {"config": to_dict(cfg), "run_name": run_name, "run_dir": str(run_dir),
              "tracking_run_id": tracking_run_id, "parent_run_id": parent_run_id}
    if plan is not None:
        config["plan"] = asdict(plan)
    return config
