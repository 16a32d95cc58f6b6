"""The training progress bar: a Hook on rank 0, drawn on the driver's terminal.

Ray Train workers never have a terminal: their stdout is a pipe into Ray's log streaming. Rank 0
therefore sends the bar's state with `ray.experimental.tqdm_ray` (one JSON line at most per
second on that stream) and the driver draws it with tqdm: one bar per epoch with the epoch's mean
loss (as of the last loss read, so the bar costs no device sync), images/s of the whole group,
and tqdm's ETA for the epoch.

Whether there is a bar is the driver's decision, because the driver's stdout is the user's
terminal: `run.progress` is `auto` (a bar when the driver's stdout is a terminal, none under
`ray job submit` or with output to a file, so logs stay plain lines), `on` or `off`;
`resolve_progress` turns `auto` into on/off on the driver, before the config goes to the workers.
A worker that still sees `auto` (a config that did not pass a driver) draws nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from ranray.train.engine import Engine, Hook

PROGRESS_SETTINGS = ("auto", "on", "off")


def resolve_progress(setting: str, stream: TextIO | None = None) -> str:
    """`on` or `off` for the workers: `auto` is on when `stream` (default stdout) is a terminal."""
    if setting not in PROGRESS_SETTINGS:
        raise ValueError(f"config key 'run.progress' must be one of {list(PROGRESS_SETTINGS)}, got {setting!r}")
    if setting != "auto":
        return setting
    stream = stream if stream is not None else sys.stdout
    isatty = getattr(stream, "isatty", None)
    return "on" if isatty is not None and isatty() else "off"


class TrainProgress(Hook):
    """enabled=None: as the config says (run.progress, resolved by the driver)."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = enabled
        self.bar: Any = None
        self.bar_epoch = -1
        self.images = 0
        self.started = 0.0

    def on_start(self, e: Engine) -> None:
        if self.enabled is None:
            self.enabled = getattr(e.cfg.run, "progress", "off") == "on"
        self.enabled = self.enabled and e.is_chief

    def on_step(self, e: Engine, batch: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.bar is None or self.bar_epoch != e.state.epoch:
            self._new_bar(e)
        self.images += len(batch["keys"])
        self.bar.set_description(self._describe(e))
        self.bar.update(e.train_loader.state_dict()["batches"] - self.bar.n)

    def on_exit(self, e: Engine) -> None:
        self._close()

    def _new_bar(self, e: Engine) -> None:
        from ray.experimental.tqdm_ray import tqdm

        self._close()
        self.bar_epoch, self.images, self.started = e.state.epoch, 0, time.perf_counter()
        done = e.train_loader.state_dict()["batches"] - 1  # this step's batch is counted by on_step
        self.bar = tqdm(desc=self._describe(e), total=len(e.train_loader), unit="step")
        self.bar.update(max(0, done))

    def _describe(self, e: Engine) -> str:
        s = e.sums
        loss = f"{s.loss_sum / s.loss_steps:.4f}" if s.loss_steps else "-"
        rate = self.images * e.world_size / max(time.perf_counter() - self.started, 1e-9)
        return f"epoch {e.state.epoch + 1}/{e.cfg.epochs} loss {loss} {rate:.0f} img/s"

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def forced() -> TrainProgress:
    """`run.hooks: ["ranray.train.progress:forced"]`: a bar whatever the driver's stdout is
    (e.g. to see one in the logs of `ray job submit`)."""
    return TrainProgress(enabled=True)
