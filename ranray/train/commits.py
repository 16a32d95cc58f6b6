"""When a reported checkpoint counts: once Ray Train's controller has registered it.

`ray.train.report` returns when this rank's files are in storage and its result is queued on the
worker. The controller takes queued results at its next poll of each worker
(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default) and, with every rank's result in, registers
the checkpoint in `checkpoint_manager_snapshot.json`: the list that a restarted worker group and
a resubmitted job resume from. A worker that dies in between takes its queued result with it, and
the restart goes back to the checkpoint before (to step 0 if there was none): measured on a fast
CPU, a node lost right after the first report restarted from 0.

So after each checkpointed report every rank waits until the snapshot lists it
(ranray.train.ray_train.wait_until_committed). Then a failure loses at most one checkpoint
interval: the steps since the last report, never a report in flight. The wait costs one
controller poll per checkpoint. (The local runtime commits a checkpoint by renaming its folder
into place: ranray.train.local.)

This module reads the snapshot only; it imports no Ray.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's CHECKPOINT_MANAGER_SNAPSHOT_FILENAME


def parse_snapshot(text: str) -> list[dict[str, Any]]:
    """[{"checkpoint_dir_name", "metrics"}, ...] from a snapshot, oldest first."""
    return [{"checkpoint_dir_name": r["checkpoint_dir_name"], "metrics": r.get("metrics", {})}
            for r in json.loads(text).get("checkpoint_results", [])]


def committed(run_dir: str | Path) -> list[dict[str, Any]]:
    """The checkpoints a restart of the run in local `run_dir` would resume from ([] if none)."""
    path = Path(run_dir) / SNAPSHOT
    try:
        return parse_snapshot(path.read_text())
    except (OSError, ValueError):
        return []  # absent, or caught mid-write: nothing committed that can be read


def last_committed_step(run_dir: str | Path) -> int:
    """The step of the newest committed checkpoint: where a restart now would resume (0 if none)."""
    return max((int(r["metrics"].get("step", 0)) for r in committed(run_dir)), default=0)
