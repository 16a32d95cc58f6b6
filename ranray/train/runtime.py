"""The seam between the training engine and what runs it: Ray Train's worker group, or this process.

Worker side, `Runtime`: what the engine (ranray.train.engine) asks of the world around one worker:
its rank, the world size, its device, the model made data-parallel, the checkpoint to resume from
(and another rank's file of it), a checkpointed report that returns once the checkpoint counts,
and a progress bar the user can see.

Driver side, `Launcher`: the refusals that depend on where the job runs (before any work), the
set-up of that place, and a whole fit of a job's workers, which returns the last report.

Two implementations, chosen at launch by name (RUNTIMES, import paths, so that choosing `local`
never imports Ray):

    ray     ranray.train.ray_train   Ray Train: a TorchTrainer's workers (DDP, elastic, restarts)
    local   ranray.train.local       this process, CPU or one GPU: debugging, tests, torch-only hosts
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ranray.config import ConfigError, PretrainConfig, TrainConfig

RUNTIMES = {"ray": "ranray.train.ray_train:RayLauncher", "local": "ranray.train.local:LocalLauncher"}


class RuntimeUnavailable(ConfigError):
    """The runtime asked for cannot run here (its library is not installed): one line, exit 2."""


class Runtime(Protocol):
    """One worker's view of the runtime it runs in."""

    rank: int
    world_size: int
    device: torch.device

    def setup_process(self, run_dir: Path) -> None:
        """Before anything else on this worker: where its stderr and log lines go."""

    def prepare_model(self, net: nn.Module) -> nn.Module:
        """`net` on this worker's device, wrapped for data parallelism when there are several."""

    def resume_state(self) -> dict[str, Any] | None:
        """The newest good checkpoint of this run: {"state", "rank_state", "path"}, or None."""

    def read_rank_state(self, path: str, rank: int) -> dict[str, Any]:
        """Rank `rank`'s file of checkpoint `path` (verified): for a resume on another world size."""

    def report(self, metrics: dict[str, Any], name: str, write: Callable[[Path], None]) -> None:
        """`write(folder)` puts this rank's checkpoint files into a folder; report them with `metrics`
        as checkpoint `name`, and return once the checkpoint is one a restart resumes from."""

    def progress_bar(self, total: int, desc: str) -> Any:
        """A tqdm-like bar (update, set_description, close, n) that reaches the user's terminal."""


@dataclass
class Fitted:
    """What a fit leaves for the driver's summary."""

    metrics: dict[str, Any]  # rank 0's last report
    checkpoint: str | None  # the newest checkpoint


class Launcher(Protocol):
    """The driver's side of a runtime."""

    name: str

    def check(self, cfg: TrainConfig | PretrainConfig) -> None:
        """Refuse, naming the config key, a config this runtime cannot run; before any work."""

    def open(self) -> None:
        """Join or start what the workers run on (Ray), once per driver."""

    def fit(self, cfg: TrainConfig | PretrainConfig, run_name: str, storage_path: str, *,
            tracking_run_id: str | None, plan: Any) -> Fitted:
        """Run the job's workers to the end (resuming the run's newest checkpoint) or raise."""


def import_object(spec: str) -> Any:
    """`module:name` -> the object."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def load_launcher(name: str) -> Launcher:
    """The launcher of runtime `name`; one line when its library is missing (RuntimeUnavailable)."""
    try:
        launcher = import_object(RUNTIMES[name])
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("ranray"):
            raise  # our own import is broken: a bug, not a missing library
        raise RuntimeUnavailable(f"the {name} runtime needs the module '{exc.name}', which is not installed; "
                                 "install the training system (pip install 'ranray[train]'), or run on this "
                                 "machine with --local") from exc
    return launcher()
