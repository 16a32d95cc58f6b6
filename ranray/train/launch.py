"""The one driver for both trainers: checks before Ray, the TorchTrainer, a whole run.

    preflight(cfg)          every check of a fine-tuning config that can fail without Ray: data dir,
                            splits, subset rows, classes, the model and a strict load of
                            model.init_backbone (pretraining has its own: pretrain.preflight)
    build_trainer(cfg)      the TorchTrainer for a TrainConfig or a PretrainConfig (ScalingConfig,
                            RunConfig with a deterministic name and storage_path, CheckpointConfig,
                            FailureConfig); every worker runs the job's task on the engine. Tune's
                            trial calls this
    run_training(cfg)       preflight, Ray, the MLflow run, fit, the exported model
    run_pretraining(cfg)    the same for pretraining

A run lives in `storage_path/run_name` (the run directory, ranray.train.run_dir.RunDir): Ray's
checkpoint_* folders and snapshot, plus ours: config.yaml, model/, plots/, logs/, the MLflow store.
Running the same command with the same run.name resumes that run from its newest good checkpoint
(Ray Train V2 reloads the run's checkpoint snapshot from `storage_path/name`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ranray.config import ConfigError, PretrainConfig, TrainConfig, flatten, save_config, to_dict
from ranray.train.progress import resolve_progress
from ranray.train.protocols import protocol_splits
from ranray.train.elastic import check_run_dir, resume_summary
from ranray.train.run_dir import RunDir

log = logging.getLogger("ranray.train")

@dataclass(frozen=True)
class Job:
    """What the driver needs to know of a job: its workers' function and the files it leaves."""

    verb: str  # in messages: "training failed: ..."
    tag: str  # MLflow's "job" tag, and the prefix of a generated run name
    worker: str  # "module:function" that every Ray Train worker runs
    # RunDir properties of what a run leaves, the final model first (a run that has it is finished),
    # then the best model; they name the result's artifacts
    outputs: tuple[str, ...]
    tags: Callable[[Any], dict[str, str]] = lambda cfg: {}


JOBS: dict[type, Job] = {
    TrainConfig: Job("training", "train", "ranray.train.finetune:train_func_per_worker",
                     ("final_model", "best_model", "confusion", "attention"),
                     tags=lambda cfg: {"train_subset": cfg.data.train_subset, "protocol": cfg.protocol,
                                       "model_variant": cfg.model.variant}),
    PretrainConfig: Job("pretraining", "pretrain", "ranray.train.pretrain:train_func_per_worker",
                        ("backbone", "best_backbone")),
}


@dataclass
class TrainingResult:
    run_name: str
    run_dir: Path
    metrics: dict[str, Any]  # rank 0's last report (the final epoch's)
    checkpoint: str | None  # the newest Ray checkpoint
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
# Names and places
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Checks before Ray starts
# ---------------------------------------------------------------------------------------------


def preflight(cfg: TrainConfig) -> dict[str, Any]:
    """Refuse, with the config key in the message, whatever would fail later inside the workers.

    Returns the dataset manifest. Costs a model build (a second for r50) and reading the flags
    column when a subset is asked for; no Ray.
    """
    from ranray.hardware import check_cpu_settings

    manifest = _check_data(cfg)
    _check_model(cfg)
    check_cpu_settings(cfg.precision, cfg.data.channels_last, cfg.scaling.use_gpu)
    return manifest


def _check_data(cfg: TrainConfig) -> dict[str, Any]:
    from ranray.data.schema import DatasetError, read_manifest
    from ranray.data.shards import build_index

    if not cfg.data.dir:
        raise ConfigError("config key 'data.dir' is required: a dataset written by `ranray prepare`")
    if not Path(cfg.data.dir).is_dir():
        raise ConfigError(f"config key 'data.dir': {cfg.data.dir} does not exist")
    try:
        manifest = read_manifest(cfg.data.dir)
        subset = cfg.data.train_subset
        flagged = f" flagged '{subset}' (data.train_subset)" if subset != "all" else ""
        splits = protocol_splits(cfg.protocol, cfg.data)  # protocol ran: train + val, watch test
        watched = "data.val_split" if splits.monitor == cfg.data.val_split else "data.test_split"
        for key, split in (("data.train_split", splits.train), (watched, splits.monitor)):
            rows = build_index(cfg.data.dir, split, subset).num_rows
            if rows == 0:
                raise ConfigError(f"config key '{key}': split '{split}' of {cfg.data.dir} has no rows{flagged}")
            # The largest group the run may get (an elastic run grows up to max_workers).
            per_step = cfg.scaling.max_workers * cfg.batch_size
            if key == "data.train_split" and rows < per_step:
                raise ConfigError(f"config key 'batch_size': {cfg.scaling.max_workers} workers x {cfg.batch_size} "
                                  f"need {per_step} rows per step, split '{split}' has {rows}{flagged}")
    except DatasetError as exc:
        raise ConfigError(f"config key 'data.dir': {exc}") from exc
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
    return manifest


def _check_model(cfg: TrainConfig) -> None:
    from ranray.models import build_ran
    from ranray.models.ran import VARIANTS

    build_ran(cfg.model)  # a ConfigError names the key; also loads model.init_backbone strictly
    if cfg.model.region_mode == "random" and VARIANTS[cfg.model.variant].rb_loss:
        log.warning("model.region_mode random with the RB loss trained to chance in the occlusion study (no random "
                    "region covers the whole face, and the loss asks one to outweigh it); consider "
                    "model.variant=no_rb_loss (docs/OCCLUSION.md)")


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


def build_trainer(cfg: TrainConfig | PretrainConfig, *, run_name: str | None = None, storage_path: str | None = None,
                  callbacks: Sequence[Any] = (), tracking_run_id: str | None = None,
                  parent_run_id: str | None = None, plan: Any = None):
    """The TorchTrainer whose workers run the job of `cfg` (fine-tuning or pretraining).

    run_name: Ray's RunConfig name (default: cfg.run.name, else a timestamp); deterministic names
        resume: a trainer with the name and storage of an earlier run continues its checkpoints.
    storage_path: default cfg.run.storage_path (made absolute).
    callbacks: Ray Train UserCallbacks, e.g. Tune's TuneReportCallback.
    tracking_run_id: an MLflow run that rank 0 logs into (its owner ends it); otherwise rank 0
        starts or resumes the run of this run directory itself, as a child of `parent_run_id`.
    plan: pretraining's PretrainPlan (pretrain.preflight).
    """
    import importlib

    import ray.train
    from ray.train.torch import TorchTrainer

    job = JOBS[type(cfg)]
    module, _, function = job.worker.partition(":")
    name = run_name or resolve_run_name(cfg)
    storage = storage_path or resolve_storage_path(cfg)
    if not is_uri(storage):  # a remote run directory is checked by its workers, before their first step
        fixed = resume_summary(cfg, cfg.scaling.max_workers, {"num_classes": plan.num_classes} if plan else {})
        check_run_dir(run_dir_for(storage, name), fixed)
    s = cfg.scaling
    if s.elastic and cfg.checkpoint.max_failures == 0:
        log.warning("scaling.num_workers=%s is elastic but checkpoint.max_failures=0: the run starts with what it "
                    "gets, but a lost worker ends it instead of restarting on fewer", s.num_workers)
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    # The driver knows whether a person watches its stdout; the workers never have a terminal.
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, progress=resolve_progress(cfg.run.progress)))
    loop_config = {"config": to_dict(cfg), "run_name": name, "run_dir": str(run_dir_for(storage, name)),
                   "tracking_run_id": tracking_run_id, "parent_run_id": parent_run_id}
    if plan is not None:
        loop_config["plan"] = asdict(plan)
    return TorchTrainer(
        getattr(importlib.import_module(module), function),
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=s.ray_num_workers(), use_gpu=s.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures),
            callbacks=list(callbacks) or None),
    )


# ---------------------------------------------------------------------------------------------
# A whole run
# ---------------------------------------------------------------------------------------------


def open_run(cfg: Any, name: str, run_dir: Path, final: Path, tags: dict[str, str]) -> tuple[bool, Any, str]:
    """Refuse a finished run; save the config (or check it against a resumed run's), start Ray and
    the MLflow run (the same one again when resumed): (resumed, tracker, MLflow run id)."""
    from ranray.ray_runtime import ensure_ray
    from ranray.tracking import Tracker

    if final.exists():
        raise ConfigError(f"run '{name}' already finished ({final}); set run.name to start a new run")
    resumed = RunDir(run_dir).config.exists()
    _record_config(cfg, run_dir, resumed)
    ensure_ray()
    tracker = Tracker(cfg.tracking, run_dir)
    run_id = tracker.start(name, params=flatten(cfg), tags=tags, resume=True)
    tracker.log_artifact(RunDir(run_dir).config)
    return resumed, tracker, run_id


def run_training(cfg: TrainConfig, *, run_name: str | None = None) -> TrainingResult:
    """Check, start Ray if needed, fine-tune, and return where everything is."""
    preflight(cfg)
    return run_job(cfg, run_name=run_name)


def run_pretraining(cfg: PretrainConfig, *, run_name: str | None = None) -> TrainingResult:
    """Check, start Ray if needed, pretrain, and return where everything is."""
    from ranray.train.pretrain import preflight as pretrain_preflight

    return run_job(cfg, run_name=run_name, plan=pretrain_preflight(cfg))


def run_job(cfg: TrainConfig | PretrainConfig, *, run_name: str | None, plan: Any = None) -> TrainingResult:
    job = JOBS[type(cfg)]
    name = run_name or resolve_run_name(cfg)
    run_dir = run_dir_for(resolve_storage_path(cfg), name)
    files = RunDir(run_dir)
    final, best = (getattr(files, key) for key in job.outputs[:2])
    resumed, tracker, run_id = open_run(cfg, name, run_dir, final, tags={"job": job.tag, **job.tags(cfg)})
    started = time.perf_counter()
    with fit_or_explain(job.verb, run_dir, cfg.checkpoint.max_failures), tracker:  # FAILED if fit raises
        result = build_trainer(cfg, run_name=name, tracking_run_id=run_id, plan=plan).fit()
    outputs = {key: getattr(files, key) for key in ("config", *job.outputs)}
    artifacts = {key: path for key, path in outputs.items() if path.exists()}
    metrics = dict(result.metrics or {})
    if files.test_metrics.is_file():  # the clean protocol's one test, after the last report
        metrics.update(json.loads(files.test_metrics.read_text()))
    return TrainingResult(
        run_name=name, run_dir=run_dir, metrics=metrics, protocol=getattr(cfg, "protocol", ""),
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        final_model=final if final.exists() else None, best_model=best if best.exists() else None,
        tracking_uri=tracker.tracking_uri, mlflow_run_id=run_id, ui_command=tracker.ui_command(),
        elapsed_s=time.perf_counter() - started, resumed=resumed, artifacts=artifacts)


@contextmanager
def fit_or_explain(job: str, run_dir: Path, max_failures: int) -> Iterator[None]:
    """Turn Ray Train's failure (a page per dead worker) into RunFailed with one line."""
    from ray.train import TrainingFailedError

    from ranray.train.failures import RunFailed, explain

    try:
        yield
    except TrainingFailedError as err:
        raise RunFailed(explain(err, job=job, run_dir=run_dir, max_failures=max_failures)) from err


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
    rows = [("run", result.run_name + (" (resumed)" if result.resumed else "")),
            ("protocol", PROTOCOL_LINES.get(result.protocol, result.protocol)),
            ("epochs / steps", f"{m.get('epoch', '?')} / {m.get('step', '?')}")]
    if "val_accuracy" in m:
        rows.append(("val accuracy (last / best)", f"{m['val_accuracy']:.4f} / "
                                                   f"{m.get('best_val_accuracy', float('nan')):.4f}"))
    if "test_accuracy" in m:
        rows.append(("test accuracy", f"{m['test_accuracy']:.4f}"))
    rows += [(f"{k.split('_acc_')[0]} accuracy, {k.split('_acc_')[1]}", f"{v:.4f}") for k, v in m.items()
             if k.split("_acc_")[-1] in ("occlusion", "pose30", "pose45") and k.startswith(("val_", "test_"))]
    rows += [("train loss", f"{m.get('train_loss', float('nan')):.4f}"),
             ("throughput", f"{m.get('images_per_s', float('nan')):.1f} images/s"),
             ("time", f"{result.elapsed_s:.0f} s"), ("run dir", str(result.run_dir))]
    rows += [(key.replace("_", " "), str(path)) for key, path in result.artifacts.items()]
    rows += [("MLflow run", f"{result.mlflow_run_id} in {result.tracking_uri}"), ("MLflow UI", result.ui_command)]
    return rows


def format_table(rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


