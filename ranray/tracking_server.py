"""The team's MLflow server on a cluster: `ranray track server --config cluster/mlflow_server.yaml`.

    serve(cfg)    refuse a SQLite database on a network mount; restore the databases from the
                  backup folder when the node's disk has none (a new head node after `ray down`);
                  run `mlflow server --app-name basic-auth` (users, passwords, permissions) with
                  artifacts on the shared volume or S3; copy the databases to the backup folder
                  every backup_every_s and once more when stopped (SIGTERM / SIGINT)
    backup(cfg)   one copy now (SQLite's online backup: safe while the server writes)
    Admin         users and their permissions, through the server's REST API as the admin

The admin's password is read from a secret file when the server starts (MLflow creates the admin
from it the first time, on an empty user database); there is no default password. A PostgreSQL
backend (backend_uri) holds runs and users alike and is backed up by its own tools (pg_dump).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ranray.config import ConfigError, TrackingServerConfig
from ranray.tracking_access import refuse_network_sqlite

log = logging.getLogger(__name__)

# What a user may do on an experiment (or a registered model) someone else created; the creator
# gets MANAGE. NO_PERMISSIONS hides others' work entirely.
PERMISSIONS = {
    "READ": "see runs, metrics, artifacts and models",
    "EDIT": "also log to runs and create runs",
    "MANAGE": "also change permissions and delete",
    "NO_PERMISSIONS": "nothing",
}
DATABASES = ("mlflow.db", "auth.db")  # runs / registry, and users / permissions (SQLite backend)
BACKUP_RECORD = "backup.json"
MIN_PASSWORD_LENGTH = 12


@dataclass(frozen=True)
class ServerLayout:
    """Where a server keeps its files, from its config."""

    cfg: TrackingServerConfig

    @property
    def db_dir(self) -> Path:
        return Path(self.cfg.db_dir).expanduser()

    @property
    def sqlite(self) -> bool:
        return not self.cfg.backend_uri

    @property
    def backend_uri(self) -> str:
        return self.cfg.backend_uri or f"sqlite:///{self.db_dir / 'mlflow.db'}"

    @property
    def auth_uri(self) -> str:
        return self.cfg.backend_uri or f"sqlite:///{self.db_dir / 'auth.db'}"

    @property
    def auth_ini(self) -> Path:
        return self.db_dir / "basic_auth.ini"

    @property
    def secret_key(self) -> Path:
        return self.db_dir / "flask_secret_key"

    @property
    def backup_dir(self) -> Path | None:
        return Path(self.cfg.backup_dir).expanduser() if self.cfg.backup_dir and self.sqlite else None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.cfg.host in ("0.0.0.0", "::") else self.cfg.host
        return f"http://{host}:{self.cfg.port}"


# ---------------------------------------------------------------------------------------------
# Checks, restore and backup
# ---------------------------------------------------------------------------------------------


def check(cfg: TrackingServerConfig, mount_table: str | None = None) -> str:
    """Refuse what would break later; returns the admin's password."""
    layout = ServerLayout(cfg)
    if layout.sqlite:
        refuse_network_sqlite(layout.db_dir / "mlflow.db", "db_dir", f"db_dir {layout.db_dir}", mount_table)
    return read_password(cfg.admin_password_file, "config key 'admin_password_file'")


def read_password(path: str, what: str) -> str:
    """A password from a secret file; `what` names where the path came from, for the message."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{what}: {file} does not exist (make one: python -c 'import secrets; "
                          f"print(secrets.token_urlsafe(24))' > {file}; chmod 600 {file})")
    password = file.read_text().strip()
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ConfigError(f"{what}: the password in {file} is shorter than {MIN_PASSWORD_LENGTH} characters")
    return password


def restore(cfg: TrackingServerConfig) -> list[str]:
    """Copy the backed-up databases to db_dir where db_dir has none; returns what was restored."""
    layout = ServerLayout(cfg)
    if layout.backup_dir is None:
        return []
    restored = []
    for name in DATABASES:
        source, target = layout.backup_dir / name, layout.db_dir / name
        if source.is_file() and not target.exists():
            tmp = target.with_name(f".{name}.restore")
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
            restored.append(name)
    if restored:
        log.info("restored %s from %s", ", ".join(restored), layout.backup_dir)
    return restored


def backup(cfg: TrackingServerConfig) -> dict[str, object]:
    """Copy each SQLite database to backup_dir (temp file, then rename); returns the record written."""
    layout = ServerLayout(cfg)
    if layout.backup_dir is None:
        raise ConfigError("config key 'backup_dir' is empty (or backend_uri is set: back PostgreSQL up with pg_dump)")
    layout.backup_dir.mkdir(parents=True, exist_ok=True)
    copied = {}
    for name in DATABASES:
        source = layout.db_dir / name
        if source.is_file():
            copied[name] = _sqlite_copy(source, layout.backup_dir / name)
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from": str(layout.db_dir), "bytes": copied}
    tmp = layout.backup_dir / f".{BACKUP_RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, layout.backup_dir / BACKUP_RECORD)
    return record


def _sqlite_copy(source: Path, target: Path) -> int:
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600))  # the user database holds password hashes
    src, dst = sqlite3.connect(f"file:{source}?mode=ro", uri=True), sqlite3.connect(tmp)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
    os.replace(tmp, target)
    return target.stat().st_size


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------


def write_auth_config(cfg: TrackingServerConfig) -> Path:
    """MLflow's basic-auth settings, without the password (that goes in the server's environment)."""
    layout = ServerLayout(cfg)
    text = ("[mlflow]\n"
            f"default_permission = {cfg.default_permission}\n"
            f"database_uri = {layout.auth_uri}\n"
            f"admin_username = {cfg.admin_user}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            f"auth_cache_ttl_seconds = {cfg.auth_cache_s}\n")
    return _write_private(layout.auth_ini, text)


def server_command(cfg: TrackingServerConfig) -> list[str]:
    layout = ServerLayout(cfg)
    mlflow = Path(sys.executable).with_name("mlflow")
    return [str(mlflow) if mlflow.is_file() else "mlflow", "server", "--app-name", "basic-auth",
            "--backend-store-uri", layout.backend_uri, "--serve-artifacts",
            "--artifacts-destination", cfg.artifacts, "--host", cfg.host, "--port", str(cfg.port),
            "--workers", str(cfg.workers)]


def server_env(cfg: TrackingServerConfig, admin_password: str) -> dict[str, str]:
    layout = ServerLayout(cfg)
    if not layout.secret_key.is_file():  # one key for every worker and restart: sessions and CSRF
        _write_private(layout.secret_key, secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(layout.auth_ini), MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
               MLFLOW_FLASK_SERVER_SECRET_KEY=layout.secret_key.read_text().strip(),
               # The server's job runner (prompt optimisation etc.): unused, and seven processes.
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    return env


def serve(cfg: TrackingServerConfig, *, mount_table: str | None = None) -> int:
    """Run the server in the foreground until it exits or this process is told to stop."""
    password = check(cfg, mount_table)
    layout = ServerLayout(cfg)
    layout.db_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.artifacts.startswith(("s3://", "gs://", "wasbs://")):
        Path(cfg.artifacts).expanduser().mkdir(parents=True, exist_ok=True)
    restore(cfg)
    write_auth_config(cfg)
    # In this process's group: whoever stops the group (a terminal, a supervisor) stops the server.
    process = subprocess.Popen(server_command(cfg), env=server_env(cfg, password))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log.info("mlflow server (basic auth) pid %d on %s; artifacts in %s", process.pid, layout.url, cfg.artifacts)
    code = _watch(cfg, process, stop)
    if layout.backup_dir is not None:
        _backup_logged(cfg)
    return code


def _watch(cfg: TrackingServerConfig, process: subprocess.Popen, stop: threading.Event) -> int:
    backups = ServerLayout(cfg).backup_dir is not None
    next_backup = time.monotonic() + cfg.backup_every_s
    while not stop.wait(1.0):
        if process.poll() is not None:
            log.error("mlflow server exited with %s", process.returncode)
            return process.returncode or 1
        if backups and time.monotonic() >= next_backup:
            _backup_logged(cfg)
            next_backup = time.monotonic() + cfg.backup_every_s
    process.terminate()  # uvicorn's master stops its workers
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return 0


def _backup_logged(cfg: TrackingServerConfig) -> None:
    try:
        record = backup(cfg)
    except (OSError, sqlite3.Error) as exc:  # the server keeps serving; the next backup may work
        log.warning("backup of %s to %s failed: %s", cfg.db_dir, cfg.backup_dir, exc)
        return
    log.info("backed up %s to %s", ", ".join(f"{k} ({v} bytes)" for k, v in record["bytes"].items()),
             cfg.backup_dir)


def _write_private(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# Users
# ---------------------------------------------------------------------------------------------


@dataclass
class Admin:
    """User administration on a running server, as a user with admin rights (credentials file)."""

    tracking_uri: str
    credentials_file: str = ""

    def _client(self):
        from mlflow.server.auth.client import AuthServiceClient

        from ranray.tracking_access import use_credentials

        use_credentials(self.credentials_file)
        return AuthServiceClient(self.tracking_uri)

    def add_user(self, username: str, password: str) -> None:
        if len(password) < MIN_PASSWORD_LENGTH:
            raise ConfigError(f"the password for '{username}' is shorter than {MIN_PASSWORD_LENGTH} characters")
        self._client().create_user(username, password)

    def grant(self, username: str, target: str, permission: str, *, model: bool = False) -> str:
        """Give `username` `permission` on experiment `target` (a name, created when missing), or with
        model=True on registered model `target` (its versions: a user adds one to a model someone
        else created only with EDIT). Returns the resource's id."""
        from mlflow.tracking import MlflowClient

        if permission not in PERMISSIONS:
            raise ConfigError(f"permission must be one of {', '.join(PERMISSIONS)}, got {permission!r}")
        client = self._client()
        tracking = MlflowClient(tracking_uri=self.tracking_uri)
        if model:
            tracking.get_registered_model(target)  # a clear MLflow error when there is none
            client.grant_user_permission(username, "registered_model", target, permission)
            return target
        found = tracking.get_experiment_by_name(target)
        # A team's experiment may be set up before its first run: the admin creates it (and owns it).
        experiment_id = found.experiment_id if found is not None else tracking.create_experiment(target)
        client.grant_user_permission(username, "experiment", experiment_id, permission)
        return experiment_id
