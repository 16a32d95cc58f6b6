"""The tracker a run gets: `open_tracker(config, run_dir)`.

MLflow's `Tracker` (ranray.tracking) where mlflow can be imported, else (one warning) ranray.journal's
`JournalTracker`, which keeps every record in RUN_DIR/metrics.jsonl for a later `ranray track sync`.
mlflow is imported only here and only when a run opens its tracker, so torch-only paths stay
without it.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

from ranray.journal import JournalTracker

log = logging.getLogger("ranray.tracking")


@functools.cache
def tracker_class() -> type:
    """MLflow's Tracker (ranray.tracking) when mlflow imports, else JournalTracker (warned once)."""
    try:
        from ranray.tracking import Tracker  # mlflow is optional: a torch-only host trains without it
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("ranray"):
            raise  # our own import is broken: a bug, not a missing library
        log.warning("%s cannot be imported: tracking goes to RUN_DIR/metrics.jsonl (push it later with "
                    "`ranray track sync RUN_DIR`)", exc.name)
        return JournalTracker
    return Tracker


def open_tracker(config: Any, run_dir: str | os.PathLike) -> Any:
    """The tracker of a run directory: see tracker_class."""
    return tracker_class()(config, run_dir)
