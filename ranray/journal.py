"""Tracking records kept in the run directory, and the tracker of a process without MLflow.

    RUN_DIR/metrics.jsonl   one JSON record a line, {"time", "run_id", "kind", "step", "data"}: what
                            ranray.tracking.Tracker keeps while the store does not answer, and what
                            `ranray track sync RUN_DIR` replays into MLflow afterwards
    RUN_DIR/tracking.json   the MLflow run of the directory (run_id, tracking_uri, experiment,
                            run_name), so a re-run of the same job logs into the same run

`JournalTracker`: the tracker of a process without mlflow (ranray.run_tracker picks it): the same
calls as ranray.tracking.Tracker, every record to metrics.jsonl under a `local-...` run id, which a
sync creates in the store. No MLflow here.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ranray.run_dir import RunDir

log = logging.getLogger("ranray.tracking")

STATUSES = ("FINISHED", "FAILED", "KILLED")


# ---------------------------------------------------------------------------------------------
# The files
# ---------------------------------------------------------------------------------------------


def resolve_tracking_uri(uri: str, run_dir: str | os.PathLike) -> str:
    """config.uri, else MLFLOW_TRACKING_URI, else a sqlite store in the run directory."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    return "sqlite:///" + RunDir(Path(run_dir).resolve()).mlflow_db.as_posix()


def append_record(path: Path, run_id: str | None, kind: str, data: Mapping[str, Any], step: int | None = None) -> None:
    """One record to the local log; a failure to write is a warning (tracking never stops training)."""
    record = {"time": time.time(), "run_id": run_id, "kind": kind, "step": step, "data": data}
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
    except OSError as exc:
        log.warning("could not write %s: %s", path, exc)


def read_local_log(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records a tracker kept locally (MLflow unreachable, or not installed)."""
    path = RunDir(run_dir).offline_metrics
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_run_record(rd: RunDir) -> dict[str, Any]:
    try:
        return json.loads(rd.tracking_record.read_text())
    except (OSError, ValueError):
        return {}


def write_run_record(rd: RunDir, record: dict[str, Any]) -> None:
    final = rd.tracking_record
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(record))
        os.replace(tmp, final)
    except OSError as exc:
        log.warning("could not record the run id in %s: %s", rd, exc)


# ---------------------------------------------------------------------------------------------
# The tracker without MLflow
# ---------------------------------------------------------------------------------------------


class RunScope:
    """What both trackers share: the status check, and a context that ends the run FINISHED, or FAILED
    (KILLED on Ctrl-C) when an exception leaves it. Each tracker defines its own end(status)."""

    @staticmethod
    def check_status(status: str) -> None:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        return False


class JournalTracker(RunScope):
    """Tracker's calls, every record to RUN_DIR/metrics.jsonl (for a process without mlflow)."""

    offline = True

    def __init__(self, config: Any, run_dir: str | os.PathLike):
        self.run_dir = RunDir(run_dir)
        self.run_dir.root.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = resolve_tracking_uri(getattr(config, "uri", "") or "", self.run_dir)
        self.experiment = getattr(config, "experiment", "") or "ranray"
        self.local_log = self.run_dir.offline_metrics
        self.run_id: str | None = None
        self.active = False

    def ui_command(self) -> str:
        return f"ranray track sync {self.run_dir.root} (where mlflow is installed), then browse {self.tracking_uri}"

    def start(self, run_name: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None,
              parent_run_id: str | None = None, run_id: str | None = None, resume: bool = False) -> str:
        recorded = read_run_record(self.run_dir)
        if resume and run_id is None and recorded.get("tracking_uri") == self.tracking_uri:
            run_id = recorded.get("run_id")
        self.run_id = run_id or f"local-{uuid.uuid4().hex}"
        self.active = True
        write_run_record(self.run_dir, {"run_id": self.run_id, "tracking_uri": self.tracking_uri,
                                        "experiment": self.experiment, "run_name": run_name})
        all_tags = {**(tags or {}), **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
        if all_tags:
            self.set_tags(all_tags)
        if params:
            self.log_params(params)
        return self.run_id

    def end(self, status: str = "FINISHED") -> None:
        self.check_status(status)
        if self.active:
            self.active = False
            self._write("status", {"status": status})

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._write("params", {str(k): str(v) for k, v in params.items()})

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, wait: bool = True) -> None:
        values = {str(k): float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values:
            self._write("metrics", values, step)

    def flush(self) -> None:
        """Every record is written when it is logged."""

    def set_tag(self, key: str, value: Any) -> None:
        self.set_tags({key: value})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._write("tags", {str(k): str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        path = Path(path)
        if not path.exists():
            log.warning("not logging artifact %s: it does not exist", path)
            return
        self._write("artifact", {"path": str(path.resolve()), "artifact_path": artifact_path})

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self._write("dict", {"artifact_file": artifact_file, "data": data})

    def log_model(self, best: str | os.PathLike, cfg: Any) -> str | None:
        """An MLflow pyfunc needs mlflow: the exported weights beside it are the model."""
        log.warning("mlflow is not installed: %s is not logged as an MLflow model", best)
        return None

    def register_model(self, name: str, artifact_path: str) -> str | None:
        self._write("register", {"name": name, "artifact_path": artifact_path})
        return None

    def _write(self, kind: str, data: Mapping[str, Any], step: int | None = None) -> None:
        if self.run_id is None:
            raise RuntimeError("JournalTracker.start() must be called before logging")
        append_record(self.local_log, self.run_id, kind, data, step)
