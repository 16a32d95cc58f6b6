"""Who a process is to the tracking server, and whether a tracking store may be used at all.

    credentials_for(file)        this job's user, from (first found) `file` (tracking.credentials_file),
                                 MLFLOW_TRACKING_USERNAME/_PASSWORD, the file $RANRAY_MLFLOW_CREDENTIALS
                                 names, ~/.mlflow/credentials (MLflow's own file)
    use_credentials(file)        puts them in this process's environment, where MLflow's client
                                 reads them. A job's password travels as a file on the cluster (a
                                 secret file or a Kubernetes Secret), never in a Ray runtime_env,
                                 which the dashboard shows to everyone.
    check_store(config, run_dir) before a job starts: a SQLite store on a network mount is refused;
                                 a server that answers is asked who we are, and a refusal (401)
                                 stops the job in one line. A server that does not answer is left
                                 to the tracker (one warning, records kept in the run directory).

No MLflow here (plain HTTP), so a torch-only host can check too.
"""

from __future__ import annotations

import base64
import configparser
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ranray.config import ConfigError
from ranray.journal import resolve_tracking_uri
from ranray.mounts import mount_of

CREDENTIALS_ENV = "RANRAY_MLFLOW_CREDENTIALS"  # set on a cluster's nodes: where their secret file is
USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
MLFLOW_CREDENTIALS = Path("~/.mlflow/credentials")
WHO_AM_I = "/api/2.0/mlflow/users/current"  # MLflow's basic-auth app; any authenticated user may ask
SERVER_HINT = "the cluster's tracking server (docs/CLUSTER.md, `ranray track server`)"


class TrackingAuthError(ConfigError):
    """The tracking server refused this job's credentials (or got none)."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    source: str  # where they came from, for messages (never the password)


def read_credentials_file(path: str | os.PathLike, named_by: str = "config key 'tracking.credentials_file'") -> Credentials:
    """MLflow's credentials format: [mlflow] mlflow_tracking_username / mlflow_tracking_password.
    `named_by` says where the path came from, for the messages."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{named_by}: {path} does not exist")
    parser = configparser.ConfigParser()
    try:
        parser.read_string(path.read_text())
    except configparser.Error as exc:
        raise ConfigError(f"{named_by}: {path} is not an ini file ({exc})") from exc
    section = parser["mlflow"] if parser.has_section("mlflow") else {}
    username = section.get(USERNAME_ENV.lower(), "").strip()
    password = section.get(PASSWORD_ENV.lower(), "").strip()
    if not username or not password:
        raise ConfigError(f"{named_by}: {path} needs [mlflow] with "
                          f"{USERNAME_ENV.lower()} and {PASSWORD_ENV.lower()}")
    return Credentials(username, password, str(path))


def write_credentials_file(path: str | os.PathLike, username: str, password: str) -> Path:
    """A credentials file only its owner can read (written under a temporary name, then renamed)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"[mlflow]\n{USERNAME_ENV.lower()} = {username}\n{PASSWORD_ENV.lower()} = {password}\n")
    os.replace(tmp, path)
    return path


def credentials_for(credentials_file: str = "") -> Credentials | None:
    """This job's credentials (see the module doc for the order), or None where none are given."""
    if credentials_file:
        return read_credentials_file(credentials_file)
    username, password = os.environ.get(USERNAME_ENV, ""), os.environ.get(PASSWORD_ENV, "")
    if username and password:
        return Credentials(username, password, f"${USERNAME_ENV}/${PASSWORD_ENV}")
    node_file = os.environ.get(CREDENTIALS_ENV, "")
    if node_file:
        return read_credentials_file(node_file, f"${CREDENTIALS_ENV} (set on this node)")
    if MLFLOW_CREDENTIALS.expanduser().is_file():
        return read_credentials_file(MLFLOW_CREDENTIALS, "MLflow's credentials file")
    return None


def use_credentials(credentials_file: str = "") -> Credentials | None:
    """Make MLflow's client in this process send `credentials_for(credentials_file)`."""
    creds = credentials_for(credentials_file)
    if creds is not None:
        os.environ[USERNAME_ENV] = creds.username
        os.environ[PASSWORD_ENV] = creds.password
    return creds


def check_store(config: Any, run_dir: str | os.PathLike, *, mount_table: str | None = None,
                timeout_s: float = 5.0) -> str:
    """Refuse a tracking store that would break before any work starts; returns the store's URI."""
    uri = resolve_tracking_uri(getattr(config, "uri", "") or "", run_dir)
    sqlite = sqlite_path(uri)
    if sqlite is not None:
        refuse_network_sqlite(sqlite, "tracking.uri", uri, mount_table)
    if uri.startswith(("http://", "https://")):
        check_authentication(uri, credentials_for(getattr(config, "credentials_file", "") or ""), timeout_s)
    return uri


def refuse_network_sqlite(db: Path, key: str, what: str, mount_table: str | None = None) -> None:
    mount = mount_of(db, mount_table)
    if mount is not None and mount.network:
        raise ConfigError(
            f"config key '{key}': {what} is a SQLite database on a network file system ({mount.fstype} "
            f"at {mount.mountpoint}); SQLite's locking is unreliable there and writers on several nodes "
            f"can corrupt it. Use {SERVER_HINT} (MLFLOW_TRACKING_URI=http://HEAD:5000), or a SQLite file "
            "on this node's own disk")


def check_authentication(uri: str, creds: Credentials | None, timeout_s: float = 5.0) -> str | None:
    """Ask the server who we are. Returns the user it names (None: no authentication there, or the
    server does not answer); raises TrackingAuthError on 401."""
    request = urllib.request.Request(uri.rstrip("/") + WHO_AM_I)
    if creds is not None:
        request.add_header("Authorization", basic_auth_header(creds.username, creds.password))
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return (json.loads(response.read() or b"{}").get("user") or {}).get("username")
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise TrackingAuthError(refusal_line(uri, creds)) from None
        return None  # 404: a server without authentication; others: the tracker's business
    except (urllib.error.URLError, OSError, ValueError):
        return None


def basic_auth_header(username: str, password: str) -> str:
    """The Authorization header MLflow's basic-auth app reads."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def refusal_line(uri: str, creds: Credentials | None) -> str:
    if creds is None:
        return (f"tracking server {uri} requires authentication and this job has no credentials: set "
                f"tracking.credentials_file (or ${CREDENTIALS_ENV} on the nodes, or ~/.mlflow/credentials)")
    return (f"tracking server {uri} refused authentication for user '{creds.username}' (credentials from "
            f"{creds.source}): wrong user or password")


def sqlite_path(tracking_uri: str) -> Path | None:
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    return Path(tracking_uri[len(prefix):].split("?", 1)[0])
