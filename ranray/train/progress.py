"""Training progress on rank 0: a bar on the driver's terminal, or plain lines a log can show.

Ray Train workers never have a terminal: their stdout is a pipe into Ray's log streaming, which
the driver prints (and `ray job submit` keeps as the job's log). Rank 0 shows progress one of two
ways, neither with a device sync of its own:

- bar: the runtime's bar (Runtime.progress_bar): under Ray, rank 0 sends the bar's state with
  `ray.experimental.tqdm_ray` (one JSON line at most per second on that stream) and the driver
  draws it with tqdm; the local runtime draws a plain tqdm bar. One bar per epoch with the epoch's
  mean loss (as of the last loss read), images/s of the whole group, and tqdm's ETA for the epoch.
- lines: at a step whose loss the engine read (every `log_every_n_steps`: Hook.on_log), once at
  least `run.progress_every_s` seconds passed since the last line, rank 0 prints

      progress: step 412 epoch 1.37/12 loss 1.2345 96.3 faces/s ETA 1:02:10

  with rank 0's mean loss and the whole group's faces/s since the last line, and the run's ETA
  (to `epochs`, or `max_steps` when sooner) at the pace since this worker started.

Which one is the driver's decision, because the driver's stdout is the user's terminal:
`run.progress` is `auto` (a bar when the driver's stdout is a terminal, lines under `ray job
submit` or with output to a file), `bar`, `lines` or `off` (YAML's bare off, false), and `on`
(YAML's bare on, true), the old name of `bar`.
`resolve_progress` turns it into bar/lines/off on the driver, before the config goes to the
workers. A worker that still sees `auto` (a config that did not pass a driver) resolves it against
its own stdout, never a terminal: lines.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from ranray.train.engine import Engine, Hook, RankSums

PROGRESS_SETTINGS = ("auto", "bar", "lines", "off", "on", False, True)
SYNONYMS = {"on": "bar", True: "bar", False: "off"}  # YAML reads a bare on / off as true / false


def resolve_progress(setting: str | bool, stream: TextIO | None = None) -> str:
    """`bar`, `lines` or `off`: `auto` is a bar when `stream` (default stdout) is a terminal."""
    if setting not in PROGRESS_SETTINGS:
        raise ValueError(f"config key 'run.progress' must be one of {list(PROGRESS_SETTINGS)}, got {setting!r}")
    if setting != "auto":
        return SYNONYMS.get(setting, setting)
    stream = stream if stream is not None else sys.stdout
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "lines"


class TrainProgress(Hook):
    """The built-in hook: rank 0 shows `mode`, or with mode=None what run.progress says."""

    def __init__(self, mode: str | None = None):
        self.mode = mode
        self.shown = Hook()

    def on_start(self, e: Engine) -> None:
        mode = resolve_progress(self.mode or e.cfg.run.progress)
        if e.is_chief:
            self.shown = {"bar": ProgressBar, "lines": ProgressLines}.get(mode, Hook)()
        self.shown.on_start(e)

    def on_step(self, e: Engine, batch: dict[str, Any]) -> None:
        self.shown.on_step(e, batch)

    def on_log(self, e: Engine) -> None:
        self.shown.on_log(e)

    def on_exit(self, e: Engine) -> None:
        self.shown.on_exit(e)


class ProgressBar(Hook):
    """Rank 0's bar (TrainProgress builds it on rank 0 only)."""

    def __init__(self):
        self.bar: Any = None
        self.bar_epoch = -1
        self.images = 0
        self.started = 0.0

    def on_step(self, e: Engine, batch: dict[str, Any]) -> None:
        if self.bar is None or self.bar_epoch != e.state.epoch:
            self._new_bar(e)
        self.images += len(batch["keys"])
        self.bar.set_description(self._describe(e))
        self.bar.update(e.train_loader.state_dict()["batches"] - self.bar.n)

    def on_exit(self, e: Engine) -> None:
        self._close()

    def _new_bar(self, e: Engine) -> None:
        self._close()
        self.bar_epoch, self.images, self.started = e.state.epoch, 0, time.perf_counter()
        done = e.train_loader.state_dict()["batches"] - 1  # this step's batch is counted by on_step
        self.bar = e.runtime.progress_bar(total=len(e.train_loader), desc=self._describe(e))
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


class ProgressLines(Hook):
    """Rank 0's lines (TrainProgress builds it on rank 0 only)."""

    def __init__(self):
        self.since_line = RankSums()
        self.start_step = 0
        self.started = self.last_line = 0.0

    def on_start(self, e: Engine) -> None:
        self.start_step = e.state.step
        self.started = self.last_line = time.perf_counter()

    def on_log(self, e: Engine) -> None:
        self.since_line.add(e.since_log)
        now = time.perf_counter()
        if now - self.last_line < e.cfg.run.progress_every_s:
            return
        print(self._line(e, now), flush=True)
        self.since_line, self.last_line = RankSums(), now

    def _line(self, e: Engine, now: float) -> str:
        s, cfg = self.since_line, e.cfg
        epochs_done = e.state.epoch + e.train_loader.epoch_progress()
        steps_left = (cfg.epochs - epochs_done) * e.train_loader.full_epoch_batches()
        if cfg.max_steps > 0:
            steps_left = min(steps_left, cfg.max_steps - e.state.step)
        eta = max(steps_left, 0) * (now - self.started) / (e.state.step - self.start_step)
        rate = s.images * e.world_size / max(now - self.last_line, 1e-9)
        return (f"progress: step {e.state.step} epoch {epochs_done:.2f}/{cfg.epochs} "
                f"loss {s.loss_sum / s.loss_steps:.4f} {rate:.1f} faces/s ETA {clock(eta)}")


def clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def forced() -> TrainProgress:
    """`run.hooks: ["ranray.train.progress:forced"]`: a bar whatever run.progress says (e.g. to see
    one in the logs of `ray job submit`)."""
    return TrainProgress("bar")
