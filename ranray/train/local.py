"""The local runtime: the engine's one worker in this process, on CPU or the one GPU torch sees.

For stepping through training in a debugger, for tests of the loop without Ray, and for a host
with torch but no Ray (`ranray train --local`, `ranray pretrain --local`). The run directory, its
checkpoints, metrics and exported models are those of a Ray run; what differs:

- one worker: scaling.num_workers must be 1 (refused otherwise, naming the key, before any work),
  and run.storage_path a local (or mounted) folder, not a URI;
- a checkpoint is committed by renaming its finished folder into place (`checkpoint_*` in the run
  directory, written as `.checkpoint_*.partial` first), so a folder with the name is complete;
  the newest `checkpoint.keep` stay. A re-run with the same run name resumes from the newest that
  verifies (a Ray run's checkpoints too);
- no restarts (checkpoint.max_failures): an error ends the run with its own traceback;
- stderr stays on the terminal (no logs/rank0.log); ranray's log lines go to stdout.

Imports no Ray, MLflow, DALI or dlib (ranray.journal keeps the tracking records without MLflow).
"""

from __future__ import annotations

import importlib
import os
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ranray.config import ConfigError, PretrainConfig, TrainConfig
from ranray.failures import log_to_stdout
from ranray.train.jobs import JOBS, is_uri, run_dir_for, worker_config
from ranray.train.resume import CHECKPOINT_PREFIX, pick_good_checkpoint, read_rank_file, read_resume_state
from ranray.train.runtime import Fitted, import_object

PARTIAL_SUFFIX = ".partial"


class LocalRuntime:
    """The one worker of a local run (ranray.train.runtime.Runtime)."""

    rank = 0
    world_size = 1

    def __init__(self, run_dir: Path, keep: int, use_gpu: bool):
        self.run_dir = Path(run_dir)
        self.keep = keep
        # As under Ray Train: the GPU only when the job asks for one (scaling.use_gpu).
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        self.last_metrics: dict[str, Any] = {}
        self.last_checkpoint: str | None = None

    def setup_process(self, run_dir: Path) -> None:
        log_to_stdout()

    def prepare_model(self, net: nn.Module) -> nn.Module:
        return net.to(self.device)  # one worker: nothing to make data-parallel

    def resume_state(self) -> dict[str, Any] | None:
        for partial in self.run_dir.glob(f".{CHECKPOINT_PREFIX}*{PARTIAL_SUFFIX}"):
            shutil.rmtree(partial)  # a checkpoint a killed run did not finish writing: never committed
        candidates = self.checkpoints()
        if not candidates:
            return None
        chosen = pick_good_checkpoint(candidates[::-1], open_folder)
        return read_resume_state(Path(chosen), chosen, self.rank)

    def read_rank_state(self, path: str, rank: int) -> dict[str, Any]:
        return read_rank_file(Path(path), rank)

    def report(self, metrics: dict[str, Any], name: str, write: Callable[[Path], None]) -> None:
        final = self.run_dir / name
        partial = self.run_dir / f".{name}{PARTIAL_SUFFIX}"
        partial.mkdir(parents=True)
        write(partial)
        if final.exists():
            shutil.rmtree(final)  # a step redone under the same name (after a fallback resume): the new files win
        os.replace(partial, final)  # the commit: a checkpoint folder is complete or absent
        self.last_metrics, self.last_checkpoint = dict(metrics), str(final)
        self.prune()

    def progress_bar(self, total: int, desc: str) -> Any:
        from tqdm import tqdm  # a bar only on a terminal (run.progress); lines need no tqdm

        return tqdm(desc=desc, total=total, unit="step")

    def checkpoints(self) -> list[str]:
        """The run's committed checkpoint folders, oldest first (names sort by step, then start)."""
        if not self.run_dir.is_dir():
            return []
        return sorted(str(p) for p in self.run_dir.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))

    def prune(self) -> None:
        """Keep the newest checkpoint.keep (>= 1) checkpoints, as Ray's num_to_keep does."""
        for path in self.checkpoints()[:-self.keep]:
            shutil.rmtree(path, ignore_errors=True)


def open_folder(path: str) -> Any:
    return nullcontext(Path(path))


class LocalLauncher:
    """The driver's side of a local run (ranray.train.runtime.Launcher): the worker runs inside fit."""

    name = "local"

    def check(self, cfg: TrainConfig | PretrainConfig) -> None:
        s = cfg.scaling
        if s.elastic:
            raise ConfigError(f"config key 'scaling.num_workers' is the range {s.min_workers}-{s.max_workers} "
                              "(elastic) but --local runs one worker; set scaling.num_workers=1")
        if s.num_workers > 1:
            raise ConfigError(f"config key 'scaling.num_workers' is {s.num_workers} but --local runs one worker; "
                              "set scaling.num_workers=1")
        if is_uri(cfg.run.storage_path):
            raise ConfigError(f"config key 'run.storage_path' is {cfg.run.storage_path!r} but --local keeps its "
                              "checkpoints in a local folder; give a local path (or a mounted one)")
        if s.use_gpu and not torch.cuda.is_available():
            raise ConfigError("config key 'scaling.use_gpu' is true but torch sees no CUDA GPU here; "
                              "set scaling.use_gpu=false to train on the CPU")
        if cfg.data.loader == "dali" and not dali_importable():
            raise ConfigError("config key 'data.loader' is 'dali' but NVIDIA DALI (nvidia.dali) cannot be imported "
                              "here; set data.loader=torch")

    def open(self) -> None:
        """Nothing to join: the worker is this process."""

    def fit(self, cfg: TrainConfig | PretrainConfig, run_name: str, storage_path: str, *,
            tracking_run_id: str | None, plan: Any) -> Fitted:
        run_dir = run_dir_for(storage_path, run_name)
        runtime = LocalRuntime(run_dir, cfg.checkpoint.keep, cfg.scaling.use_gpu)
        config = worker_config(cfg, run_name, run_dir, tracking_run_id=tracking_run_id, plan=plan)
        import_object(JOBS[type(cfg)].worker)(config, runtime)
        return Fitted(runtime.last_metrics, runtime.last_checkpoint)


def dali_importable() -> bool:
    """Whether DALI imports here (installed is not enough: its CUDA libraries must load too); the
    loader imports it next anyway."""
    try:
        importlib.import_module("nvidia.dali")
    except ImportError:
        return False
    return True
