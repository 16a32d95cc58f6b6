"""A real `mlflow server` for tests, and a stub in front of it that can answer 500 or 401.

    server = MlflowServer.start(tmp / "store")   # own sqlite backend, --serve-artifacts, free port
    server.kill()                                # SIGKILL of its process group, by the pid we started
    again = MlflowServer.start(tmp / "store")    # the same store, served again (on a new port)

The server's job runner (huey consumers, seven processes) is switched off: the tests use no jobs,
and on 2 cores it doubles the start-up time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ranray.tracking import seed_sqlite_store

START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_until_healthy(server, what: str) -> None:
    """Wait for `server` (.url, .process, .log, .kill()) to answer /health; kill it and raise if it
    exits or takes longer than START_TIMEOUT_S."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not healthy(server.url):
        if server.process.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"{what} did not start: {server.log.read_text()[-3000:]}")
        time.sleep(0.25)


@dataclass
class MlflowServer:
    url: str
    process: subprocess.Popen
    store: Path
    log: Path

    @classmethod
    def start(cls, store: Path) -> MlflowServer:
        store.mkdir(parents=True, exist_ok=True)
        seed_sqlite_store(f"sqlite:///{store / 'mlflow.db'}")  # MLflow's migrations in the server: ~1.5 s
        port = free_port()
        mlflow = Path(sys.executable).with_name("mlflow")
        log = store / f"server-{port}.log"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(log, "wb") as out:
            # Its own session: the server's uvicorn child dies with it (killpg), nothing is orphaned.
            process = subprocess.Popen(
                [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                 "--serve-artifacts", "--artifacts-destination", str(store / "artifacts"),
                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        server = cls(f"http://127.0.0.1:{port}", process, store, log)
        wait_until_healthy(server, "mlflow server")
        return server

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


class StubProxy:
    """Forwards every request to `target` while `mode` is "pass"; otherwise answers that HTTP
    status ("500", "401") itself, as a broken server or an auth proxy in front of one would."""

    def __init__(self, target: str):
        self.target = target
        self.mode = "pass"
        self.refused = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.mode != "pass":
                    proxy.refused += 1
                    self.send_response(int(proxy.mode))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                req = urllib.request.Request(proxy.target + self.path, data=body if body else None,
                                             headers=headers, method=self.command)
                try:
                    with urllib.request.urlopen(req, timeout=60) as r:
                        status, payload, reply_headers = r.status, r.read(), r.headers.items()
                except urllib.error.HTTPError as err:
                    status, payload, reply_headers = err.code, err.read(), err.headers.items()
                self.send_response(status)
                for k, v in reply_headers:
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

            def log_message(self, *args) -> None:  # quiet: pytest shows stderr of failing tests
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
