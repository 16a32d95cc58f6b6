"""The one place that talks to MLflow.

`Tracker` wraps an explicit `MlflowClient` (never the fluent `mlflow.start_run` globals), so a
Tune parent run and its trial runs can live in one process, and Ray workers need no set-up.

Where runs go:
    config.uri, else MLFLOW_TRACKING_URI, else `sqlite:///<run_dir>/mlflow.db` (nothing to start).
    With a sqlite store the experiment's artifacts go beside the database file (`mlartifacts/`),
    never to `./mlruns` of whatever the working directory happens to be.
The run directory must be local (or a shared file system): a sqlite store cannot live on s3://.

Tracking never stops training: a server that does not answer at start, or calls that keep
failing (gone, HTTP 500, HTTP 401), give one warning and from then on params / metrics / tags /
artifacts go to the run directory's `metrics.jsonl` (ranray.run_dir names every file).
Those records are pushed to the store afterwards, by `sync_run_dir` (`ranray track sync RUN_DIR`),
and automatically when the run's owner ends it and the store answers again. A replay is
idempotent (metrics keep their original timestamps), so a sync that fails part-way can be repeated.
The records' files, and the tracker of a process where mlflow is not installed, are
ranray.journal's (no MLflow there); training gets its tracker from run_tracker.open_tracker.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import shlex
import shutil
import sqlite3
import ssl
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import (MAX_ENTITY_KEY_LENGTH, MAX_METRICS_PER_BATCH,
                                     MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH)

from ranray.config import ConfigError
from ranray.journal import (RunScope, append_record, read_local_log,  # noqa: F401
                            read_run_record, resolve_tracking_uri, write_run_record)
from ranray.run_dir import RunDir
from ranray.tracking_access import TrackingAuthError, check_authentication, sqlite_path, use_credentials

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
TIMESTAMP_KEY = "__timestamp_ms"  # a local metrics record's MLflow timestamp, so a replay is idempotent
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")
# After this many failed calls in a row the tracker stops trying, so a dead server costs a
# bounded stall (each call retries MLFLOW_HTTP_REQUEST_MAX_RETRIES times) instead of one per step.
MAX_CONSECUTIVE_FAILURES = 2
# Defaults for a remote server unless the user set them: MLflow's own (7 retries, backoff 2,
# 120 s timeout) would stall a training step for minutes when the server goes away.
MAX_QUEUED = 64  # asynchronous metric batches kept for flush() before the oldest are waited for
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def artifact_location_for(tracking_uri: str) -> str | None:
    """Artifacts beside a sqlite database; a server (or other store) decides for itself."""
    db = sqlite_path(tracking_uri)
    return RunDir(db.parent).mlflow_artifacts.as_uri() if db is not None else None


def seed_sqlite_store(tracking_uri: str) -> None:
    """Give a sqlite store that does not exist yet MLflow's tables as a copy of an empty store.

    MLflow builds a new database by running every alembic migration: 1.1-1.6 s on a 2-core
    machine, paid by every run that starts with its own store. The copy is of a store built once
    per MLflow version by MLflow itself, with its Default experiment removed, so MLflow creates
    that one on first open exactly as in a new store (its artifact location is the store's own).
    Anything that fails here leaves the database absent, and MLflow builds it the usual way.
    """
    db = sqlite_path(tracking_uri)
    if db is None or db.exists():
        return
    try:
        template = _empty_store_template()
        db.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=db.parent, prefix=f".{db.name}.")
        os.close(fd)
        try:
            shutil.copyfile(template, tmp)
            os.link(tmp, db)  # never over a database another process made meanwhile
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    except (OSError, sqlite3.Error, MlflowException) as exc:
        log.debug("no template for %s (%r): MLflow builds it", db, exc)


def _empty_store_template() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ranray"
    template = cache / f"mlflow-{mlflow.__version__}-empty.db"
    if template.is_file():
        return template
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        db = Path(tmp) / "empty.db"
        MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
        with sqlite3.connect(db) as con:
            con.execute("DELETE FROM experiments WHERE experiment_id = 0")
        con.close()
        os.replace(db, template)
    return template


def ui_command(tracking_uri: str, port: int = 5000) -> str:
    """What to tell a user to run (or open) to browse the runs."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)} --port {port}"


class Tracker(RunScope):
    """One MLflow run: start, log, end; a context manager that ends the run FAILED on an exception.

        with Tracker(cfg.tracking, run_dir) as tracker:
            tracker.start("ferplus-r50", params=flatten(cfg), resume=True)
            tracker.log_metrics({"train_loss": 0.7}, step=10)
    """

    def __init__(self, config: Any, run_dir: str | os.PathLike, *, probe_timeout_s: float = 3.0):
        self.run_dir = RunDir(run_dir)
        self.run_dir.root.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = resolve_tracking_uri(getattr(config, "uri", "") or "", self.run_dir)
        self.experiment = getattr(config, "experiment", "") or "ranray"
        self.credentials_file = getattr(config, "credentials_file", "") or ""
        self.user: str | None = None  # who the server knows this run's writer as (with authentication)
        self.probe_timeout_s = probe_timeout_s
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.local_log = self.run_dir.offline_metrics
        self._client: MlflowClient | None = None
        self._offline_reason: str | None = None
        self._failures = 0
        self._warned = False
        self._active = False
        self._queued: list[tuple[Any, dict[str, Any], int | None]] = []  # (RunOperations, data, step)

    # -- state ----------------------------------------------------------------------------------

    @property
    def offline(self) -> bool:
        return self._offline_reason is not None

    @property
    def active(self) -> bool:
        return self._active

    def ui_command(self) -> str:
        return ui_command(self.tracking_uri)

    # -- run lifecycle --------------------------------------------------------------------------

    def start(self, run_name: str, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, Any] | None = None, parent_run_id: str | None = None,
              run_id: str | None = None, resume: bool = False) -> str:
        """Start (or resume) the run and log `params`; returns the run id.

        run_id resumes that run; resume=True resumes the run recorded in this run dir by an
        earlier start (a re-run of the same job); otherwise a new run. Offline, the id is local.
        """
        if resume and run_id is None:
            run_id = self._recorded_run_id()
        all_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        self._connect()
        self.run_id = self._open_run(run_name, all_tags, run_id)
        self._active = True
        if self._client is None and all_tags:
            self._write_local("tags", all_tags)
        self._record_run(run_name)
        if params:
            self.log_params(params)
        return self.run_id

    def end(self, status: str = "FINISHED") -> None:
        self.check_status(status)
        if not self._active:
            return
        self._active = False
        self.flush()
        self._call("status", {"status": status},
                   lambda c: c.set_terminated(self.run_id, status=status))
        self._push_local_records()

    def _push_local_records(self) -> None:
        """What this run kept locally (here, or in a worker logging into it) goes to the store now
        if the store answers; otherwise it stays for `ranray track sync`."""
        if not self.local_log.is_file():
            return
        try:
            report = sync_run_dir(self.run_dir, self.tracking_uri, probe_timeout_s=self.probe_timeout_s,
                                  credentials_file=self.credentials_file)
        except SyncError as exc:  # info: the user was warned when the records went local
            log.info("%s; push them later with `ranray track sync %s`", exc, self.run_dir.root)
            return
        log.info("pushed %s", report.line())

    def log_model(self, best: str | os.PathLike, cfg: Any) -> str | None:
        """The exported model `best` as this run's MLflow pyfunc, registered under
        cfg.tracking.register_model when set (ranray.model_store); returns the version."""
        # The pyfunc's module is loaded by the run that logs one, not by every user of a tracker.
        from ranray.model_store import log_best_model

        return log_best_model(self, best, cfg)

    def register_model(self, name: str, artifact_path: str) -> str | None:
        """Register the run's artifact folder `artifact_path` (an MLflow model) as a new version of
        model `name`; returns the version, or None when the store is unreachable (kept locally)."""
        holder: list[str] = []

        def register(c: MlflowClient) -> None:
            holder.append(_register(c, self.run_id, name, artifact_path))

        self._call("register", {"name": name, "artifact_path": artifact_path}, register)
        return holder[0] if holder else None

    # -- logging --------------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        values = {_key(k): _param_value(v) for k, v in params.items()}
        if not self.offline:
            values = self._new_params(values)
        items = list(values.items())
        for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            batch = [Param(k, v) for k, v in chunk]
            self._call("params", dict(chunk), lambda c, b=batch: c.log_batch(self.run_id, params=b))

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, wait: bool = True) -> None:
        """wait=False: MLflow's asynchronous logging queues the batch and returns (a training step
        must not wait on a tracking server); `flush()` or `end()` waits for what is queued."""
        values = {_key(k): _metric_value(v) for k, v in metrics.items()}
        values = {k: v for k, v in values.items() if v is not None}
        now = int(time.time() * 1000)
        items = list(values.items())
        for chunk in _chunks(items, MAX_METRICS_PER_BATCH):
            batch = [Metric(k, v, now, step or 0) for k, v in chunk]
            data = {**dict(chunk), TIMESTAMP_KEY: now}
            if wait:
                self._call("metrics", data, lambda c, b=batch: c.log_batch(self.run_id, metrics=b), step=step)
            else:
                self._call("metrics", data, lambda c, b=batch, d=data: self._log_async(c, b, d, step), step=step)

    def flush(self) -> None:
        """Wait for the queued asynchronous batches; those that failed go to the local log."""
        queued, self._queued = self._queued, []
        for operations, data, step in queued:
            try:
                operations.wait()
            except Exception as exc:
                self._failed(exc)
                self._write_local("metrics", data, step)

    def set_tag(self, key: str, value: Any) -> None:
        self.set_tags({key: value})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [(_key(k), str(v)) for k, v in tags.items()]
        for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            batch = [RunTag(k, v) for k, v in chunk]
            self._call("tags", dict(chunk), lambda c, b=batch: c.log_batch(self.run_id, tags=b))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A file, or a directory's contents, under `artifact_path` of the run's artifacts."""
        path = Path(path)
        record = {"path": str(path.resolve()), "artifact_path": artifact_path}
        if not path.exists():
            log.warning("not logging artifact %s: it does not exist", path)
            return
        self._call("artifact", record, lambda c: _upload(c, self.run_id, path, artifact_path))

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """A JSON artifact (e.g. evaluation results); offline it is written under the run dir."""
        if self.offline or self._client is None:
            self._write_local("dict", {"artifact_file": artifact_file, "data": data})
            return
        self._call("dict", {"artifact_file": artifact_file},
                   lambda c: c.log_dict(self.run_id, dict(data), artifact_file))

    # -- internals ------------------------------------------------------------------------------

    def _log_async(self, client: MlflowClient, batch: list[Metric], data: dict[str, Any], step: int | None) -> None:
        if len(self._queued) >= MAX_QUEUED:
            self.flush()  # long done by now: this only bounds the list
        self._queued.append((client.log_batch(self.run_id, metrics=batch, synchronous=False), data, step))

    def _connect(self) -> None:
        if self._client is not None or self.offline:
            return
        if self.tracking_uri.startswith(("http://", "https://")):
            for key, value in HTTP_ENV_DEFAULTS.items():
                os.environ.setdefault(key, value)
            reason = _probe(self.tracking_uri, self.probe_timeout_s)
            if reason:
                self._go_offline(f"tracking server {self.tracking_uri} is unreachable ({reason})")
                return
            try:
                creds = use_credentials(self.credentials_file)
            except ConfigError as exc:  # the driver's check_store refused this before any work
                self._go_offline(str(exc))
                return
            self.user = creds.username if creds else None
        try:
            seed_sqlite_store(self.tracking_uri)
            client = MlflowClient(tracking_uri=self.tracking_uri)
            self.experiment_id = _get_or_create_experiment(client, self.experiment,
                                                           artifact_location_for(self.tracking_uri))
        except Exception as exc:  # any store error: training goes on without MLflow
            self._go_offline(f"MLflow store {self.tracking_uri} failed: {exc!r}")
            return
        self._client = client

    def _open_run(self, run_name: str, tags: dict[str, str], run_id: str | None) -> str:
        if self._client is None:
            return run_id or f"local-{uuid.uuid4().hex}"
        if run_id is not None:
            resumed = self._try(lambda c: _resume_run(c, run_id))
            if resumed:
                # set_tags logs to self.run_id, which start() only assigns after we return.
                self.run_id = run_id
                if tags:
                    self.set_tags(tags)
                return run_id
            log.warning("MLflow run %s not found in %s; starting a new run", run_id, self.tracking_uri)
        created = self._try(lambda c: c.create_run(self.experiment_id, tags=tags, run_name=run_name))
        if created is None:
            self._go_offline(f"could not create a run in {self.tracking_uri}")
            return run_id or f"local-{uuid.uuid4().hex}"
        return created.info.run_id

    def _new_params(self, values: dict[str, str]) -> dict[str, str]:
        """MLflow refuses changing a logged param; a resumed run keeps its first values."""
        run = self._try(lambda c: c.get_run(self.run_id)) if self._client is not None else None
        if run is None:
            return values
        old = run.data.params
        changed = sorted(k for k, v in values.items() if k in old and old[k] != v)
        if changed:
            log.warning("run %s already has params %s with other values; keeping the logged ones",
                        self.run_id, changed[:10])
        return {k: v for k, v in values.items() if k not in old}

    def _call(self, kind: str, data: dict[str, Any], fn: Callable[[MlflowClient], Any],
              step: int | None = None) -> None:
        if self.run_id is None:
            raise RuntimeError("Tracker.start() must be called before logging")
        if self.offline or self._client is None:
            self._write_local(kind, data, step)
            return
        try:
            fn(self._client)
        except Exception as exc:
            self._failed(exc)
            self._write_local(kind, data, step)
            return
        self._failures = 0

    def _try(self, fn: Callable[[MlflowClient], Any]) -> Any:
        try:
            return fn(self._client)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            self._failed(exc)
        except Exception as exc:
            self._failed(exc)
        return None

    def _failed(self, exc: BaseException) -> None:
        self._failures += 1
        if not self._warned:
            self._warned = True
            log.warning("MLflow call to %s failed (%r); keeping records in %s",
                        self.tracking_uri, exc, self.local_log)
        if self._failures >= MAX_CONSECUTIVE_FAILURES:
            self._offline_reason = f"{self._failures} MLflow calls in a row failed, last: {exc!r}"

    def _go_offline(self, reason: str) -> None:
        self._offline_reason = reason
        if not self._warned:
            self._warned = True
            log.warning("%s; training goes on, params and metrics go to %s", reason, self.local_log)

    def _write_local(self, kind: str, data: Mapping[str, Any], step: int | None = None) -> None:
        append_record(self.local_log, self.run_id, kind, data, step)

    def _record_run(self, run_name: str) -> None:
        record = {"run_id": self.run_id, "tracking_uri": self.tracking_uri, "experiment": self.experiment,
                  "run_name": run_name}
        earlier = read_run_record(self.run_dir)
        user = self.user or (earlier.get("user") if earlier.get("run_id") == self.run_id else None)
        if user:
            record["user"] = user  # `ranray track sync` should push as this user
        write_run_record(self.run_dir, record)

    def _recorded_run_id(self) -> str | None:
        record = read_run_record(self.run_dir)
        same_store = record.get("tracking_uri") == self.tracking_uri
        return record.get("run_id") if same_store else None


# ---------------------------------------------------------------------------------------------
# Pushing what was kept locally
# ---------------------------------------------------------------------------------------------


class SyncError(RuntimeError):
    """The local records could not be pushed (the store does not answer, or refused them)."""


@dataclass
class SyncReport:
    tracking_uri: str
    run_ids: dict[str, str]  # the recorded run id -> the run the records went to
    counts: dict[str, int]  # records pushed per kind
    synced_file: Path

    def line(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items()))
        runs = ", ".join(sorted(set(self.run_ids.values())))
        return f"{sum(self.counts.values())} local records ({kinds}) to run {runs} in {self.tracking_uri}"


def synced_log_path(run_dir: str | os.PathLike) -> Path:
    """Where pushed records go, so a second sync does not push them again."""
    return RunDir(run_dir).synced_metrics


def sync_run_dir(run_dir: str | os.PathLike, tracking_uri: str | None = None,
                 probe_timeout_s: float = 3.0, credentials_file: str = "") -> SyncReport:
    """Replay RUN_DIR/metrics.jsonl into the store (default: the one tracking.json names), then
    move the records to metrics.synced.jsonl. A run that was started offline (id `local-...`) is
    created now, in the experiment it was meant for, and tracking.json points at it.
    A server with authentication gets the credentials of credentials_file (else as a job finds
    them: ranray.tracking_access); they should be the run's user's, whom tracking.json names.
    Raises SyncError, leaving the local file as it was, when the store fails or refuses."""
    rd = RunDir(run_dir)
    recorded = read_run_record(rd)
    uri = tracking_uri or recorded.get("tracking_uri") or resolve_tracking_uri("", rd)
    records = read_local_log(rd)
    report = SyncReport(uri, {}, {}, synced_log_path(rd))
    if not records:
        return report
    if uri.startswith(("http://", "https://")):
        for key, value in HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        reason = _probe(uri, probe_timeout_s)
        if reason:
            raise SyncError(f"tracking server {uri} is unreachable ({reason})")
        _authenticate_sync(uri, credentials_file, recorded, rd)
    seed_sqlite_store(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        for record in records:
            run_id = _target_run(client, record, report, recorded, uri)
            REPLAY[record["kind"]](client, run_id, record)
            report.counts[record["kind"]] = report.counts.get(record["kind"], 0) + 1
    except Exception as exc:  # whatever the store says, the local records stay for the next try
        if _status_code(exc) == 403:
            raise SyncError(f"tracking server {uri} refused user '{os.environ.get('MLFLOW_TRACKING_USERNAME')}' "
                            f"permission to write (403); sync as the run's user ('{recorded.get('user', '?')}'); "
                            f"the records stay in {rd.offline_metrics}") from None
        raise SyncError(f"pushing {rd.offline_metrics} to {uri} failed: {exc!r}") from exc
    _archive_local_log(rd, report.synced_file, len(records))
    if recorded.get("run_id") in report.run_ids:
        write_run_record(rd, {**recorded, "tracking_uri": uri, "run_id": report.run_ids[recorded["run_id"]]})
    return report


def _authenticate_sync(uri: str, credentials_file: str, recorded: dict[str, Any], rd: RunDir) -> None:
    try:
        creds = use_credentials(credentials_file)
        check_authentication(uri, creds)
    except (TrackingAuthError, ConfigError) as exc:
        raise SyncError(f"{exc}; nothing was pushed, the records stay in {rd.offline_metrics}") from None
    user = recorded.get("user")
    if user and creds is not None and creds.username != user:
        log.warning("pushing run records of user '%s' as user '%s'", user, creds.username)


def _target_run(client: MlflowClient, record: dict[str, Any], report: SyncReport,
                recorded: dict[str, Any], uri: str) -> str:
    """The store's run for a record: its own id, or one created for a run started offline."""
    local_id = record["run_id"]
    if local_id in report.run_ids:
        return report.run_ids[local_id]
    if not str(local_id).startswith("local-"):
        report.run_ids[local_id] = local_id
        return local_id
    mine = recorded.get("run_id") == local_id  # tracking.json describes the run of this directory
    experiment = (recorded.get("experiment") if mine else None) or "ranray"
    experiment_id = _get_or_create_experiment(client, experiment, artifact_location_for(uri))
    run = client.create_run(experiment_id, run_name=(recorded.get("run_name") if mine else None) or None)
    report.run_ids[local_id] = run.info.run_id
    return run.info.run_id


def _replay_metrics(client: MlflowClient, run_id: str, record: dict[str, Any]) -> None:
    data = dict(record["data"])
    timestamp = int(data.pop(TIMESTAMP_KEY, record["time"] * 1000))
    metrics = [Metric(k, float(v), timestamp, record["step"] or 0) for k, v in data.items()]
    for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=chunk)


def _replay_params(client: MlflowClient, run_id: str, record: dict[str, Any]) -> None:
    old = client.get_run(run_id).data.params  # a param logged once keeps its value (MLflow's rule)
    params = [Param(k, str(v)) for k, v in record["data"].items() if k not in old]
    for chunk in _chunks(params, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=chunk)


def _replay_tags(client: MlflowClient, run_id: str, record: dict[str, Any]) -> None:
    tags = [RunTag(k, str(v)) for k, v in record["data"].items()]
    for chunk in _chunks(tags, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=chunk)


def _replay_artifact(client: MlflowClient, run_id: str, record: dict[str, Any]) -> None:
    path = Path(record["data"]["path"])
    where = record["data"].get("artifact_path")
    if not path.exists():
        log.warning("not pushing artifact %s: it is gone", path)
        return
    _upload(client, run_id, path, where)


def _upload(client: MlflowClient, run_id: str, path: Path, artifact_path: str | None) -> None:
    """A file, or a directory's contents. Not client.log_artifact: MLflow caches a run's artifact
    repository by run id alone, so a process that talked to the run's server at another address
    (a server that moved, `ranray track sync --tracking-uri`) would upload to the old one."""
    repo = get_artifact_repository(client.get_run(run_id).info.artifact_uri, tracking_uri=client.tracking_uri)
    if path.is_dir():
        repo.log_artifacts(str(path), artifact_path=artifact_path)
    else:
        repo.log_artifact(str(path), artifact_path=artifact_path)


def _replay_dict(client: MlflowClient, run_id: str, record: dict[str, Any]) -> None:
    client.log_dict(run_id, record["data"]["data"], record["data"]["artifact_file"])


def _replay_status(client: MlflowClient, run_id: str, record: dict[str, Any]) -> None:
    client.set_terminated(run_id, status=record["data"]["status"])


def _replay_register(client: MlflowClient, run_id: str, record: dict[str, Any]) -> None:
    _register(client, run_id, record["data"]["name"], record["data"]["artifact_path"])


REPLAY: dict[str, Callable[[MlflowClient, str, dict[str, Any]], None]] = {
    "params": _replay_params,
    "metrics": _replay_metrics,
    "tags": _replay_tags,
    "artifact": _replay_artifact,
    "dict": _replay_dict,
    "status": _replay_status,
    "register": _replay_register,
}


def _archive_local_log(rd: RunDir, synced: Path, pushed: int) -> None:
    """Move the pushed records to the synced file; records appended meanwhile stay local."""
    local = rd.offline_metrics
    lines = [line for line in local.read_text().splitlines(keepends=True) if line.strip()]
    done, rest = lines[:pushed], lines[pushed:]
    with open(synced, "a") as f:
        f.writelines(done)
    if not rest:
        local.unlink()
        return
    tmp = local.with_name(f".{local.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(rest))
    os.replace(tmp, local)


def _register(client: MlflowClient, run_id: str, name: str, artifact_path: str) -> str:
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/" + artifact_path
    return str(client.create_model_version(name, source, run_id=run_id).version)


# ---------------------------------------------------------------------------------------------
# Reading runs back (tests, summaries)
# ---------------------------------------------------------------------------------------------


def find_runs(tracking_uri: str, experiment: str, filter_string: str = "") -> list[dict[str, Any]]:
    """Runs of `experiment` (newest first) as plain dicts: run_id, run_name, status, params,
    metrics (latest values), tags, parent_run_id, artifact_uri. [] when the experiment is absent."""
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], filter_string=filter_string,
                              run_view_type=ViewType.ACTIVE_ONLY, max_results=10000)
    return [{
        "run_id": r.info.run_id, "run_name": r.info.run_name, "status": r.info.status,
        "params": dict(r.data.params), "metrics": dict(r.data.metrics), "tags": dict(r.data.tags),
        "parent_run_id": r.data.tags.get(PARENT_TAG), "artifact_uri": r.info.artifact_uri,
    } for r in runs]


def list_artifacts(tracking_uri: str, run_id: str, path: str | None = None) -> list[str]:
    """Every artifact file of a run, as paths relative to the run's artifact root."""
    client = MlflowClient(tracking_uri=tracking_uri)
    out: list[str] = []
    for info in client.list_artifacts(run_id, path):
        out.extend(list_artifacts(tracking_uri, run_id, info.path) if info.is_dir else [info.path])
    return out


def log_run_artifacts(tracking_uri: str, run_id: str, paths: Iterable[str | os.PathLike],
                      artifact_path: str | None = None) -> None:
    """Add files to a finished run (e.g. a measurement made after training)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _get_or_create_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as exc:
            # Another process (a parallel Tune trial) created it between the two calls.
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def _status_code(exc: BaseException) -> int | None:
    """The HTTP status of a failed MLflow REST call (MlflowException keeps it on the error code)."""
    codes = {"PERMISSION_DENIED": 403, "UNAUTHENTICATED": 401}
    return codes.get(getattr(exc, "error_code", ""), getattr(exc, "get_http_status_code", lambda: None)())


def _resume_run(client: MlflowClient, run_id: str) -> bool:
    client.get_run(run_id)
    client.update_run(run_id, status="RUNNING")
    return True


def _probe(uri: str, timeout_s: float) -> str | None:
    """None if something answers HTTP at the URI, else why not (fast, no MLflow retries)."""
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return None  # it answered; an auth proxy in front of /health is still a live server
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLError):
            return None  # it answered TLS; MLflow has its own certificate settings
        return str(reason)
    return None


def _key(name: Any) -> str:
    """A key MLflow accepts: a config key with odd characters must not cost the whole run."""
    key = _BAD_KEY_CHARS.sub("_", str(name))[:MAX_ENTITY_KEY_LENGTH] or "_"
    if posixpath.normpath(key) != key or key.startswith("/"):
        key = key.replace("/", "_")  # MLflow refuses keys that would name another file path
    return key


def _param_value(value: Any) -> str:
    text = str(value)  # what mlflow.log_param does, so values read the same as elsewhere
    if len(text) > MAX_PARAM_VAL_LENGTH:
        text = text[: MAX_PARAM_VAL_LENGTH - 3] + "..."
    return text


def _metric_value(value: Any) -> float | None:
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):  # a tensor/array of several values is not a metric
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i: i + size]
