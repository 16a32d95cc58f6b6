"""The one driver for both jobs and both runtimes: checks before any work, a whole run.

    preflight(cfg)          every check of a fine-tuning config that can fail without workers: data
                            dir, splits, subset rows, classes, the model and a strict load of
                            model.init_backbone (pretraining has its own: pretrain.preflight)
    run_training(cfg, runtime="ray")     the runtime's refusals, preflight, the runtime (Ray, or
                            this process with runtime="local": ranray.train.runtime), the MLflow
                            run (or the local journal without MLflow), fit, the exported model
    run_pretraining(cfg, runtime="ray")  the same for pretraining

A run lives in `storage_path/run_name` (the run directory, ranray.run_dir.RunDir): the
checkpoint_* folders (and Ray's snapshot), plus ours: config.yaml, model/, plots/, logs/, the
MLflow store. Running the same command with the same run.name resumes that run from its newest
good checkpoint (Ray Train V2 reloads the run's checkpoint snapshot from `storage_path/name`; the
local runtime reads the checkpoint folders). The TorchTrainer itself: ranray.train.ray_train.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ranray.config import ConfigError, PretrainConfig, TrainConfig, flatten, save_config
from ranray.data.schema import SUBSET_FLAGS
from ranray.run_tracker import open_tracker
from ranray.tracking_access import check_store
from ranray.train import preflight as preflight_checks
from ranray.train.summary import summary_rows
from ranray.train.jobs import JOBS, resolve_run_name, resolve_storage_path, run_dir_for
from ranray.train.protocols import protocol_splits
from ranray.run_dir import RunDir
from ranray.train.runtime import Launcher, load_launcher

log = logging.getLogger("ranray.train")


@dataclass
class TrainingResult:
    run_name: str
    run_dir: Path
    metrics: dict[str, Any]  # rank 0's last report (the final epoch's)
    checkpoint: str | None  # the newest checkpoint
    final_model: Path | None
    best_model: Path | None
    tracking_uri: str
    mlflow_run_id: str | None
    ui_command: str
    elapsed_s: float
    resumed: bool = False
    artifacts: dict[str, Path] = field(default_factory=dict)
    protocol: str = ""  # fine-tuning's evaluation protocol (ranray.train.protocols)


# ---------------------------------------------------------------------------------------------
# Checks before any work
# ---------------------------------------------------------------------------------------------


def preflight(cfg: TrainConfig) -> dict[str, Any]:
    """Refuse, with the config key in the message, whatever would fail later inside the workers.

    Returns the dataset manifest. Costs a model build (a second for r50) and reading the flags
    column when a subset is asked for; no workers.
    """
    manifest = preflight_checks.prepared_dataset(cfg, "a dataset written by `ranray prepare`")
    _check_splits(cfg)
    _check_labels(cfg, manifest)
    _check_model(cfg)
    preflight_checks.hardware(cfg)
    return manifest


def _check_splits(cfg: TrainConfig) -> None:
    from ranray.data.schema import DatasetError
    from ranray.data.shards import build_index

    subset = cfg.data.train_subset
    flagged = f" flagged '{subset}' (data.train_subset)" if subset != "all" else ""
    splits = protocol_splits(cfg.protocol, cfg.data)  # protocol ran: train + val, watch test
    watched = "data.val_split" if splits.monitor == cfg.data.val_split else "data.test_split"
    try:
        for key, split in (("data.train_split", splits.train), (watched, splits.monitor)):
            rows = build_index(cfg.data.dir, split, subset).num_rows
            if rows == 0:
                raise ConfigError(f"config key '{key}': split '{split}' of {cfg.data.dir} has no rows{flagged}")
            if key == "data.train_split":
                preflight_checks.rows_per_step(cfg, split, rows, flagged)
    except DatasetError as exc:
        raise ConfigError(f"config key 'data.dir': {exc}") from exc


def _check_labels(cfg: TrainConfig, manifest: dict[str, Any]) -> None:
    if manifest.get("num_classes") != cfg.model.num_classes:
        raise ConfigError(f"config key 'model.num_classes' is {cfg.model.num_classes} but {cfg.data.dir} has "
                          f"{manifest.get('num_classes')} classes")
    names = list(manifest.get("class_names") or [])
    if cfg.model.class_names and names and cfg.model.class_names != names:
        raise ConfigError(f"config key 'model.class_names' is {cfg.model.class_names} but {cfg.data.dir} has "
                          f"{names}")
    if names and not cfg.model.class_names:
        cfg.model.class_names = names  # saved with the run and every exported model
    prepared = manifest.get("label_mode")
    if prepared is not None and prepared != cfg.loss.label_mode:
        # The label mode decides which rows a dataset keeps (majority drops faces without one) and what
        # its targets hold; training in another mode would use them silently wrong.
        raise ConfigError(f"config key 'loss.label_mode' is {cfg.loss.label_mode!r} but {cfg.data.dir} was prepared "
                          f"with label_mode={prepared!r}: train with loss.label_mode={prepared} or prepare again "
                          f"with label_mode={cfg.loss.label_mode}")


def _check_model(cfg: TrainConfig) -> None:
    from ranray.models import build_ran
    from ranray.models.ran import VARIANTS

    build_ran(cfg.model)  # a ConfigError names the key; also loads model.init_backbone strictly
    if cfg.model.region_mode == "random" and VARIANTS[cfg.model.variant].rb_loss:
        log.warning("model.region_mode random with the RB loss trained to chance in the occlusion study (no random "
                    "region covers the whole face, and the loss asks one to outweigh it); consider "
                    "model.variant=no_rb_loss (docs/OCCLUSION.md)")


# ---------------------------------------------------------------------------------------------
# A whole run
# ---------------------------------------------------------------------------------------------


def open_run(cfg: Any, name: str, run_dir: Path, final: Path, tags: dict[str, str],
             launcher: Launcher) -> tuple[bool, Any, str]:
    """Refuse a finished run; save the config (or check it against a resumed run's), open the
    runtime (start or join Ray) and the MLflow run (the same one again when resumed):
    (resumed, tracker, MLflow run id)."""
    if final.exists():
        raise ConfigError(f"run '{name}' already finished ({final}); set run.name to start a new run")
    resumed = RunDir(run_dir).config.exists()
    _record_config(cfg, run_dir, resumed)
    launcher.open()
    tracker = open_tracker(cfg.tracking, run_dir)
    run_id = tracker.start(name, params=flatten(cfg), tags=tags, resume=True)
    tracker.log_artifact(RunDir(run_dir).config)
    return resumed, tracker, run_id


def run_training(cfg: TrainConfig, *, run_name: str | None = None, runtime: str = "ray") -> TrainingResult:
    """Check, open the runtime (`ray`, or `local`: this process), fine-tune, and return where
    everything is."""
    launcher = load_launcher(runtime)
    launcher.check(cfg)
    preflight(cfg)
    return run_job(cfg, launcher, run_name=run_name)


def run_pretraining(cfg: PretrainConfig, *, run_name: str | None = None, runtime: str = "ray") -> TrainingResult:
    """Check, open the runtime, pretrain, and return where everything is."""
    from ranray.train.pretrain import preflight as pretrain_preflight

    launcher = load_launcher(runtime)
    launcher.check(cfg)
    return run_job(cfg, launcher, run_name=run_name, plan=pretrain_preflight(cfg))


def run_job(cfg: TrainConfig | PretrainConfig, launcher: Launcher, *, run_name: str | None,
            plan: Any = None) -> TrainingResult:
    job = JOBS[type(cfg)]
    name = run_name or resolve_run_name(cfg)
    storage = resolve_storage_path(cfg)
    run_dir = run_dir_for(storage, name)
    check_store(cfg.tracking, run_dir)  # no SQLite on a network mount; a server that knows this job's user
    files = RunDir(run_dir)
    final, best = (getattr(files, key) for key in job.outputs[:2])
    resumed, tracker, run_id = open_run(cfg, name, run_dir, final, tags={"job": job.tag, **job.tags(cfg)},
                                        launcher=launcher)
    started = time.perf_counter()
    with tracker:  # FAILED if fit raises
        result = launcher.fit(cfg, name, storage, tracking_run_id=run_id, plan=plan)
        if job.logs_model and best.exists():  # here, so no worker imports MLflow's pyfunc
            tracker.log_model(best, cfg)  # registered too when tracking.register_model is set
    outputs = {key: getattr(files, key) for key in ("config", *job.outputs)}
    artifacts = {key: path for key, path in outputs.items() if path.exists()}
    metrics = dict(result.metrics)
    if files.test_metrics.is_file():  # the clean protocol's one test, after the last report
        metrics.update(json.loads(files.test_metrics.read_text()))
    return TrainingResult(
        run_name=name, run_dir=run_dir, metrics=metrics, protocol=getattr(cfg, "protocol", ""),
        checkpoint=result.checkpoint,
        final_model=final if final.exists() else None, best_model=best if best.exists() else None,
        tracking_uri=tracker.tracking_uri, mlflow_run_id=run_id, ui_command=tracker.ui_command(),
        elapsed_s=time.perf_counter() - started, resumed=resumed, artifacts=artifacts)


def _record_config(cfg: TrainConfig, run_dir: Path, resumed: bool) -> None:
    path = RunDir(run_dir).config
    if resumed:
        old = flatten(yaml.safe_load(path.read_text()) or {})
        changed = sorted(k for k, v in flatten(cfg).items() if old.get(k, v) != v)
        log.warning("resuming run %s from its newest checkpoint%s", run_dir.name,
                    f"; changed config keys: {', '.join(changed)}" if changed else "")
    save_config(cfg, path)


PROTOCOL_LINES = {"clean": "clean (best epoch on val, tested once)",
                  "ran": "ran (trained on train + val, last epoch on test)"}


def describe(result: TrainingResult) -> list[tuple[str, str]]:
    """Rows of the summary table `ranray train` prints."""
    m = result.metrics
    scores = []
    if "val_accuracy" in m:
        scores.append(("val accuracy (last / best)", f"{m['val_accuracy']:.4f} / "
                                                     f"{m.get('best_val_accuracy', float('nan')):.4f}"))
    if "test_accuracy" in m:
        scores.append(("test accuracy", f"{m['test_accuracy']:.4f}"))
    scores += [(f"{k.split('_acc_')[0]} accuracy, {k.split('_acc_')[1]}", f"{v:.4f}") for k, v in m.items()
               if k.split("_acc_")[-1] in SUBSET_FLAGS and k.startswith(("val_", "test_"))]
    return summary_rows(result, [("protocol", PROTOCOL_LINES.get(result.protocol, result.protocol))], scores)




