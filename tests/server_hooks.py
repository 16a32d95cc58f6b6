"""An engine hook for the tracking-server tests: rank 0 pauses after epoch 1's report until the
test has done something to the world (stopped the MLflow server), then training goes on.

`RUN_DIR/paused` appears when rank 0 waits; the test writes `RUN_DIR/go` to let it continue.
"""

from __future__ import annotations

import time

from ranray.train.engine import Engine, Hook

PAUSED, GO = "paused", "go"
WAIT_S = 300


class PauseAfterFirstEpoch(Hook):
    def on_report(self, e: Engine) -> None:
        if e.rank != 0 or e.state.epoch != 1 or e.state.mid_epoch or (e.run_dir / PAUSED).exists():
            return
        (e.run_dir / PAUSED).write_text(str(e.state.step))
        deadline = time.monotonic() + WAIT_S
        while not (e.run_dir / GO).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
