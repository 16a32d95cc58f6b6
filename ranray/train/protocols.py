"""Evaluation protocols: which splits a fine-tuning run trains on, watches each epoch, and reports.

    clean   train on data.train_split, pick the best epoch on data.val_split, then test that model
            once on data.test_split (the test split never steers training)
    ran     the RAN paper's: train on data.train_split + data.val_split, evaluate on
            data.test_split every epoch, and report the LAST epoch (no epoch is chosen on test)

Every run records its protocol (MLflow param `protocol`, tag, summaries, `ranray compare`), so a
figure is never put beside another protocol's by mistake.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ranray.config import DataConfig


@dataclass(frozen=True)
class Splits:
    train: str  # "train+val" joins splits (ranray.data.schema.shard_paths)
    monitor: str  # validated each epoch
    monitor_prefix: str  # its metrics' prefix: val_accuracy or test_accuracy
    selects_best: bool  # the best monitored epoch is the model; else the last epoch is
    test_once: str | None  # evaluated once with the chosen model at the end


PROTOCOLS: dict[str, Callable[[DataConfig], Splits]] = {
    "clean": lambda d: Splits(train=d.train_split, monitor=d.val_split, monitor_prefix="val", selects_best=True,
                              test_once=d.test_split),
    "ran": lambda d: Splits(train=f"{d.train_split}+{d.val_split}", monitor=d.test_split, monitor_prefix="test",
                            selects_best=False, test_once=None),
}


def protocol_splits(protocol: str, data: DataConfig) -> Splits:
    try:
        return PROTOCOLS[protocol](data)
    except KeyError:
        raise ValueError(f"unknown protocol '{protocol}'; known: {', '.join(PROTOCOLS)}") from None
