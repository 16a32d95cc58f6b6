"""The Ray Train runtime: the engine's workers as a TorchTrainer's worker group (ranray.train.runtime).

Worker side, `RayTrainRuntime`: rank, world size and device from Ray Train's context, DDP by
`prepare_model`, the checkpoint Ray Train registered last (resume), `ray.train.report` followed by
the wait until Ray's controller has registered the checkpoint (ranray.train.commits), tqdm_ray.
Driver side, `RayLauncher` and `build_trainer`: the TorchTrainer (ScalingConfig, RunConfig with a
deterministic name and storage_path, CheckpointConfig, FailureConfig) whose workers run
`train_loop`, and Ray Train's failure turned into one line (`fit_or_explain`). Tune's trials call
`build_trainer` too.

The only training module that imports Ray.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray.train
import ray.train.torch
from ray.experimental.tqdm_ray import tqdm as tqdm_ray
from ray.train import TrainingFailedError
from ray.train.torch import TorchTrainer
from torch import nn

from ranray.config import PretrainConfig, TrainConfig
from ranray.ray_runtime import ensure_ray
from ranray.train.collectives import broadcast
from ranray.train.commits import SNAPSHOT, parse_snapshot
from ranray.train.elastic import check_run_dir, resume_summary
from ranray.failures import RunFailed, explain, worker_log
from ranray.train.jobs import JOBS, is_uri, resolve_run_name, resolve_storage_path, run_dir_for, worker_config
from ranray.train.resume import CHECKPOINT_PREFIX, pick_good_checkpoint, read_rank_file, read_resume_state
from ranray.train.runtime import Fitted, import_object

log = logging.getLogger("ranray.train")


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------


def train_loop(config: dict[str, Any]) -> None:
    """What every TorchTrainer worker runs: the job's worker function on this runtime."""
    import_object(config["worker"])(config, RayTrainRuntime())


class RayTrainRuntime:
    """One worker of a TorchTrainer's group (ranray.train.runtime.Runtime)."""

    def __init__(self) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def setup_process(self, run_dir: Path) -> None:
        worker_log(run_dir, self.rank)  # stderr to logs/rank<r>.log: the driver's terminal gets one line

    def prepare_model(self, net: nn.Module) -> nn.Module:
        return ray.train.torch.prepare_model(net)

    def resume_state(self) -> dict[str, Any] | None:
        """Rank 0 picks the newest checkpoint that verifies and tells the others, so a half-written
        newest checkpoint sends every rank to the same older one."""
        latest = ray.train.get_checkpoint()
        if latest is None:
            return None
        fs = latest.filesystem
        chosen = broadcast(pick_good_checkpoint(checkpoint_candidates(latest), folder_on(fs))
                           if self.rank == 0 else None)
        with folder_on(fs)(chosen) as d:
            return read_resume_state(Path(d), chosen, self.rank)

    def read_rank_state(self, path: str, rank: int) -> dict[str, Any]:
        with folder_on(ray.train.get_context().get_storage().storage_filesystem)(path) as d:
            return read_rank_file(Path(d), rank)

    def report(self, metrics: dict[str, Any], name: str, write: Callable[[Path], None]) -> None:
        with tempfile.TemporaryDirectory(prefix="ranray-ckpt-") as tmp:
            write(Path(tmp))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
        wait_until_committed(name)  # a failure now loses at most one interval

    def progress_bar(self, total: int, desc: str) -> Any:
        return tqdm_ray(desc=desc, total=total, unit="step")  # drawn by the driver


def folder_on(fs: pafs.FileSystem) -> Callable[[str], Any]:
    """A checkpoint path on Ray's storage -> a context giving it as a local folder."""
    return lambda path: ray.train.Checkpoint(path=path, filesystem=fs).as_directory()


def checkpoint_candidates(latest: ray.train.Checkpoint) -> list[str]:
    """`latest` (what Ray registered last), then its sibling checkpoints, newest first."""
    parent = latest.path.rstrip("/").rsplit("/", 1)[0]
    infos = latest.filesystem.get_file_info(pafs.FileSelector(parent))
    siblings = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                       and i.base_name.startswith(CHECKPOINT_PREFIX) and i.path != latest.path), reverse=True)
    return [latest.path, *siblings]


def wait_until_committed(name: str, timeout_s: float = 300.0, poll_s: float = 0.1) -> bool:
    """Block this worker until the controller lists checkpoint `name` in the run's snapshot
    (ranray.train.commits: why)."""
    storage = ray.train.get_context().get_storage()
    fs, path = storage.storage_filesystem, f"{storage.experiment_fs_path}/{SNAPSHOT}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with fs.open_input_stream(path) as f:
                if any(r["checkpoint_dir_name"] == name for r in parse_snapshot(f.readall().decode())):
                    return True
        except (OSError, ValueError):
            pass  # not written yet, or read mid-write
        time.sleep(poll_s)
    log.warning("checkpoint %s was not registered by Ray Train within %.0f s; training goes on, and a failure "
                "now may lose more than one checkpoint interval", name, timeout_s)
    return False


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------


class RayLauncher:
    """The driver's side (ranray.train.runtime.Launcher): Ray joined or started, a TorchTrainer fit."""

    name = "ray"

    def check(self, cfg: TrainConfig | PretrainConfig) -> None:
        """Nothing beyond what the preflights check: Ray runs every worker count."""

    def open(self) -> None:
        ensure_ray()

    def fit(self, cfg: TrainConfig | PretrainConfig, run_name: str, storage_path: str, *,
            tracking_run_id: str | None, plan: Any) -> Fitted:
        run_dir = run_dir_for(storage_path, run_name)
        with fit_or_explain(JOBS[type(cfg)].verb, run_dir, cfg.checkpoint.max_failures):
            result = build_trainer(cfg, run_name=run_name, storage_path=storage_path,
                                   tracking_run_id=tracking_run_id, plan=plan).fit()
        return Fitted(dict(result.metrics or {}), result.checkpoint.path if result.checkpoint else None)


def build_trainer(cfg: TrainConfig | PretrainConfig, *, run_name: str | None = None, storage_path: str | None = None,
                  callbacks: Sequence[Any] = (), tracking_run_id: str | None = None,
                  parent_run_id: str | None = None, plan: Any = None) -> TorchTrainer:
    """The TorchTrainer whose workers run the job of `cfg` (fine-tuning or pretraining).

    run_name: Ray's RunConfig name (default: cfg.run.name, else a timestamp); deterministic names
        resume: a trainer with the name and storage of an earlier run continues its checkpoints.
    storage_path: default cfg.run.storage_path (made absolute).
    callbacks: Ray Train UserCallbacks, e.g. Tune's TuneReportCallback.
    tracking_run_id: an MLflow run that rank 0 logs into (its owner ends it); otherwise rank 0
        starts or resumes the run of this run directory itself, as a child of `parent_run_id`.
    plan: pretraining's PretrainPlan (pretrain.preflight).
    """
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
    loop_config = worker_config(cfg, name, run_dir_for(storage, name), tracking_run_id=tracking_run_id,
                                parent_run_id=parent_run_id, plan=plan)
    loop_config["worker"] = JOBS[type(cfg)].worker
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=s.ray_num_workers(), use_gpu=s.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures),
            callbacks=list(callbacks) or None),
    )


@contextmanager
def fit_or_explain(job: str, run_dir: Path, max_failures: int) -> Iterator[None]:
    """Turn Ray Train's failure (a page per dead worker) into RunFailed with one line."""
    try:
        yield
    except TrainingFailedError as err:
        raise RunFailed(explain(err, job=job, run_dir=run_dir, max_failures=max_failures)) from err
