"""What every job kind checks on the driver before any worker starts, each refusal naming its key.

    prepared_dataset(cfg, what)   data.dir exists and holds a prepared dataset -> its manifest
    rows_per_step(cfg, ...)       the split feeds the largest worker group one batch each
    hardware(cfg)                 precision / memory format this machine's CPU can run

Fine-tuning's preflight (ranray.train.launch.preflight) and pretraining's (ranray.train.pretrain.
preflight) are these plus their own checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ranray.config import ConfigError


def prepared_dataset(cfg: Any, what: str) -> dict[str, Any]:
    """The manifest of cfg.data.dir; `what` says which dataset the job needs (for the message)."""
    from ranray.data.schema import DatasetError, read_manifest

    if not cfg.data.dir:
        raise ConfigError(f"config key 'data.dir' is required: {what}")
    if not Path(cfg.data.dir).is_dir():
        raise ConfigError(f"config key 'data.dir': {cfg.data.dir} does not exist ({what})")
    try:
        return read_manifest(cfg.data.dir)
    except DatasetError as exc:
        raise ConfigError(f"config key 'data.dir': {exc}") from exc


def rows_per_step(cfg: Any, split: str, rows: int, flagged: str = "") -> None:
    """An elastic run grows up to scaling.max_workers: the split must give each of them a batch."""
    per_step = cfg.scaling.max_workers * cfg.batch_size
    if rows < per_step:
        raise ConfigError(f"config key 'batch_size': {cfg.scaling.max_workers} workers (scaling.num_workers) x "
                          f"{cfg.batch_size} need {per_step} rows per step, split '{split}' of {cfg.data.dir} has "
                          f"{rows}{flagged}")


def hardware(cfg: Any) -> None:
    from ranray.hardware import check_cpu_settings

    check_cpu_settings(cfg.precision, cfg.data.channels_last, cfg.scaling.use_gpu)
