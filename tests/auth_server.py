"""The team's tracking server for tests, started as the cluster starts it: `ranray track server`
(MLflow's basic auth, SQLite in db_dir, artifacts and backups in folders), on a free port.

    server = AuthServer.start(tmp / "server")      # admin password from a secret file it writes
    server.add_user("alice")                       # -> alice's credentials file (MLflow's format)
    server.stop()                                  # SIGTERM: the server backs its databases up
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from mlflow_server import free_port, wait_until_healthy

from ranray.tracking_access import basic_auth_header, write_credentials_file

RANRAY = Path(sys.executable).with_name("ranray")


@dataclass
class AuthServer:
    root: Path
    url: str
    process: subprocess.Popen
    log: Path
    host: str = "127.0.0.1"
    users: dict[str, Path] = field(default_factory=dict)  # name -> credentials file

    @property
    def admin_credentials(self) -> Path:
        return self.users["admin"]

    @classmethod
    def start(cls, root: Path, host: str = "127.0.0.1", port: int | None = None) -> AuthServer:
        root.mkdir(parents=True, exist_ok=True)
        password_file = root / "admin_password"
        if not password_file.exists():
            password_file.write_text(secrets.token_urlsafe(18) + "\n")
            password_file.chmod(0o600)
        port = port or free_port()
        log = root / f"server-{port}.log"
        overrides = [f"db_dir={root / 'db'}", f"artifacts={root / 'artifacts'}", f"backup_dir={root / 'backup'}",
                     f"admin_password_file={password_file}", f"host={host}", f"port={port}", "workers=1",
                     "backup_every_s=3600"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        with open(log, "ab") as out:
            process = subprocess.Popen([str(RANRAY), "track", "server", "--config", str(cls.config_file()),
                                        *overrides], stdout=out, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)
        server = cls(root, f"http://{host}:{port}", process, log, host)
        wait_until_healthy(server, "ranray track server")
        server.users["admin"] = write_credentials_file(root / "admin.ini", "admin",
                                                       password_file.read_text().strip())
        return server

    @staticmethod
    def config_file() -> Path:
        return Path(__file__).resolve().parents[1] / "cluster" / "mlflow_server.yaml"

    def add_user(self, name: str) -> Path:
        """Create the user (as admin, through the CLI) and return its credentials file."""
        password_file = self.root / f"{name}_password"
        password_file.write_text(secrets.token_urlsafe(18) + "\n")
        credentials = self.root / f"{name}.ini"
        self.ranray("add", name, "--password-file", str(password_file),
                    "--write-credentials", str(credentials))
        self.users[name] = credentials
        return credentials

    def grant(self, name: str, target: str, permission: str, *options: str) -> None:
        self.ranray("grant", name, target, permission, *options)

    def ranray(self, *args: str) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        done = subprocess.run([str(RANRAY), "track", "user", "--tracking-uri", self.url, "--credentials",
                               str(self.admin_credentials), *args], env=env, capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"ranray track user {' '.join(args)}: {done.stdout}{done.stderr}")
        return done.stdout

    def stop(self) -> int:
        """SIGTERM, as `ray down` / Kubernetes stop it: the server makes its last backup."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


def http_status(url: str, user: str | None = None, password: str = "") -> int:
    """The HTTP status of a GET, with basic-auth credentials when a user is given."""
    request = urllib.request.Request(url)
    if user is not None:
        request.add_header("Authorization", basic_auth_header(user, password))
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
