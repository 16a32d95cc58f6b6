"""A real multi-node Ray cluster on this machine for tests, driven through cluster/local.sh.

    with LocalCluster.up(workers=2) as cluster:      # or the `local_cluster` fixture below
        job = cluster.submit(["python", "check.py"], working_dir=some_dir)
        info = cluster.wait_job(job)
        cluster.kill_node("w1")                       # SIGKILL a worker node's raylet
    # leaving the block runs `local.sh down` and asserts that no process of the cluster is left

Every node is a `ray start --block` under cluster/node_guard.py (its own raylet, object store,
temp dir and, where the machine allows, its own network namespace and IP). The cluster has its
own ports, temp dir and auth token, so it runs beside the session's `ray_session` and beside
other clusters. Jobs go through the real `ray job submit` CLI with the cluster's token; status and
logs are read from the dashboard's job API with the same token. Nothing here calls ray.init in
the test process: that would tie the process to one cluster and its auth mode.

Processes are tracked by (pid, start time), so a pid reused after a process ended is never taken
for a leftover of the cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL_SH = REPO / "cluster" / "local.sh"
TERMINAL_JOB_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] == b"Z":
        return None
    return int(fields[1]), int(fields[19])


def process_tree(root: int) -> dict[int, int]:
    """pid -> start time for `root` and all its live descendants."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_stat(int(entry))
            if st is not None:
                children.setdefault(st[0], []).append(int(entry))
                starts[int(entry)] = st[1]
    if root not in starts:
        return {}
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        tree[pid] = starts[pid]
        todo.extend(children.get(pid, []))
    return tree


def still_alive(procs: dict[int, int]) -> dict[int, int]:
    """Those of `procs` that still run as the same process (same pid and start time)."""
    out = {}
    for pid, start in procs.items():
        st = proc_stat(pid)
        if st is not None and st[1] == start:
            out[pid] = start
    return out


def processes_titled(prefix: str, containing: str = "") -> list[int]:
    """Live pids whose process title (Ray sets e.g. `ray::RayTrainWorker...`) starts with `prefix`
    and holds `containing`, sorted."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith(prefix) and containing in title and proc_stat(int(entry)) is not None:
            found.append(int(entry))
    return sorted(found)


def processes_mentioning(text: str) -> list[int]:
    """Live pids whose command line holds `text` (Ray processes carry their temp dir in it)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and proc_stat(int(entry)) is not None:
            found.append(int(entry))
    return found


@dataclass
class LocalCluster:
    state_dir: Path
    env: dict[str, str]  # for subprocesses that talk to the cluster (ray CLI, with the token)
    dashboard_url: str
    gcs_address: str
    net: str  # netns or loopback
    workers: int
    up_seconds: float
    seen: dict[int, int] = field(default_factory=dict)  # every process of the cluster seen so far
    owns_state_dir: bool = False

    # -- life cycle ---------------------------------------------------------------------------

    @classmethod
    def up(cls, workers: int = 2, state_dir: str | Path | None = None, net: str | None = None,
           cpus_per_worker: int = 1, timeout: float = 240.0) -> LocalCluster:
        owns = state_dir is None
        # Short and under /tmp: Ray's unix socket paths live under it (107-byte limit).
        path = Path(tempfile.mkdtemp(prefix="rr", dir="/tmp")) if owns else Path(state_dir)
        env = dict(os.environ)
        env.update(RANRAY_LOCAL_DIR=str(path), RANRAY_LOCAL_CPUS=str(cpus_per_worker),
                   RANRAY_LOCAL_TIMEOUT=str(int(timeout)))
        if net:
            env["RANRAY_LOCAL_NET"] = net
        t0 = time.monotonic()
        done = subprocess.run(["bash", str(LOCAL_SH), "up", str(workers)], env=env, capture_output=True,
                              text=True, timeout=timeout + 60)
        if done.returncode != 0:
            # Whatever did start must not outlive the failed start.
            subprocess.run(["bash", str(LOCAL_SH), "down"], env=env, capture_output=True, text=True,
                           timeout=120)
            raise RuntimeError(f"cluster/local.sh up failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        values = dict(line.split("=", 1) for line in (path / "cluster.env").read_text().split())
        client_env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS and k != "RAY_ADDRESS"}
        client_env.update(RAY_ADDRESS=values["RAY_ADDRESS"], RAY_AUTH_MODE="token",
                          RAY_AUTH_TOKEN_PATH=values["RAY_AUTH_TOKEN_PATH"],
                          PATH=f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
        cluster = cls(state_dir=path, env=client_env, dashboard_url=values["RAY_ADDRESS"],
                      gcs_address=values["RANRAY_GCS_ADDRESS"], net=values["RANRAY_LOCAL_NET"],
                      workers=int(values["RANRAY_LOCAL_WORKERS"]), up_seconds=time.monotonic() - t0,
                      owns_state_dir=owns)
        cluster.snapshot()
        return cluster

    def down(self) -> dict[int, int]:
        """Stop the cluster with `local.sh down`; return the processes of it still alive (none)."""
        if not (self.state_dir / "nodes").is_dir():
            return {}
        self.snapshot()
        env = dict(os.environ, RANRAY_LOCAL_DIR=str(self.state_dir))
        done = subprocess.run(["bash", str(LOCAL_SH), "down"], env=env, capture_output=True, text=True,
                              timeout=180)
        if done.returncode != 0:
            raise RuntimeError(f"cluster/local.sh down failed:\n{done.stdout}\n{done.stderr}")
        left = still_alive(self.seen)
        left.update({pid: 0 for pid in processes_mentioning(f"{self.state_dir}/") if pid not in left})
        return left

    def remove_state(self) -> None:
        """Delete the state dir (node logs, Ray's session logs) unless RANRAY_KEEP_CLUSTER_LOGS=1."""
        if self.owns_state_dir and os.environ.get("RANRAY_KEEP_CLUSTER_LOGS") != "1":
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        left = self.down()
        self.remove_state()
        assert not left, f"processes of the local cluster outlived `down`: {sorted(left)}"

    # -- nodes and processes ------------------------------------------------------------------

    def node_names(self) -> list[str]:
        return sorted(p.stem for p in (self.state_dir / "nodes").glob("*.pid"))

    def guard_pid(self, name: str) -> int:
        return int((self.state_dir / "nodes" / f"{name}.pid").read_text())

    def node_ip(self, name: str) -> str:
        return (self.state_dir / "nodes" / f"{name}.ip").read_text().strip()

    def node_processes(self, name: str) -> dict[int, int]:
        tree = process_tree(self.guard_pid(name))
        self.seen.update(tree)
        return tree

    def snapshot(self) -> dict[int, int]:
        """Every live process of every node now (and remember them for the check at `down`)."""
        out: dict[int, int] = {}
        for name in self.node_names():
            out.update(self.node_processes(name))
        return out

    def raylet_pid(self, name: str) -> int:
        for pid in self.node_processes(name):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                    return pid
            except OSError:
                continue
        raise LookupError(f"node {name} has no raylet running")

    def kill_node(self, name: str, raylet_only: bool = True) -> list[int]:
        """SIGKILL a node: its raylet (the guard then takes the rest down, as a dead host would
        lose everything), or every process of it at once. Returns the pids signalled."""
        procs = self.node_processes(name)
        targets = [self.raylet_pid(name)] if raylet_only else [p for p in procs if p != self.guard_pid(name)]
        for pid in targets:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return targets

    def wait_node_gone(self, name: str, timeout: float = 60.0) -> None:
        guard = self.guard_pid(name)
        deadline = time.monotonic() + timeout
        while proc_stat(guard) is not None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {name} (guard {guard}) still running after {timeout}s")
            time.sleep(0.2)

    # -- the cluster's APIs, with the token -----------------------------------------------------

    def token(self) -> str:
        return Path(self.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()

    def api(self, path: str, timeout: float = 10.0) -> Any:
        req = urllib.request.Request(self.dashboard_url + path,
                                     headers={"Authorization": f"Bearer {self.token()}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)

    def alive_nodes(self) -> list[dict[str, Any]]:
        nodes = self.api("/api/v0/nodes?limit=1000&detail=1")["data"]["result"]["result"]
        return [n for n in nodes if n["state"] == "ALIVE"]

    def ray(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120.0,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run the real `ray` CLI against this cluster (address and token from self.env)."""
        ray = REPO / ".venv" / "bin" / "ray"
        done = subprocess.run([str(ray) if ray.exists() else "ray", *args], env=env or self.env,
                              capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done

    def submit(self, entrypoint: list[str], working_dir: str | Path | None = None,
               runtime_env: dict[str, Any] | None = None, submission_id: str | None = None,
               env: dict[str, str] | None = None) -> str:
        """`ray job submit --no-wait` (the real CLI); returns the submission id."""
        sid = submission_id or f"test-{int(time.time() * 1000)}-{os.getpid()}"
        args = ["job", "submit", "--address", self.dashboard_url, "--submission-id", sid, "--no-wait"]
        if working_dir is not None:
            args += ["--working-dir", str(working_dir)]
        if runtime_env is not None:
            args += ["--runtime-env-json", json.dumps(runtime_env)]
        self.ray(*args, "--", *entrypoint, env=env)
        return sid

    def job_info(self, submission_id: str) -> dict[str, Any]:
        return self.api(f"/api/jobs/{submission_id}")

    def job_logs(self, submission_id: str) -> str:
        return self.api(f"/api/jobs/{submission_id}/logs")["logs"]

    def wait_job(self, submission_id: str, timeout: float = 300.0,
                 states: tuple[str, ...] = TERMINAL_JOB_STATES) -> dict[str, Any]:
        """Poll the job until its status is one of `states`; snapshot the processes meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            self.snapshot()
            try:
                info = self.job_info(submission_id)
            except urllib.error.URLError:
                info = {"status": "UNREACHABLE"}
            if info.get("status") in states:
                return info
            if time.monotonic() > deadline:
                logs = ""
                try:
                    logs = self.job_logs(submission_id)[-3000:]
                except urllib.error.URLError:
                    pass
                raise TimeoutError(f"job {submission_id} is {info.get('status')} after {timeout}s; logs:\n{logs}")
            time.sleep(1.0)


# "DIR:N" for StartTogether; the jobs that must train together set it in their runtime_env.
TOGETHER_ENV = "RANRAY_TEST_START_TOGETHER"
TOGETHER_TIMEOUT_S = 240.0


class StartTogether:
    """An engine hook (run.hooks: ["cluster_utils:StartTogether"]) for runs on a cluster that must
    train at the same time, however long each took to start: every worker, once started (its
    tracker open, before its first step), writes DIR/<run>-rank<r>.json with the Ray node it runs
    on, then waits until N such files are there (at most TOGETHER_TIMEOUT_S; a test then finds the
    runs apart). Without $RANRAY_TEST_START_TOGETHER it does nothing."""

    def on_start(self, e: Any) -> None:
        spec = os.environ.get(TOGETHER_ENV, "")
        if not spec:
            return
        import ray

        folder, count = Path(spec.rsplit(":", 1)[0]), int(spec.rsplit(":", 1)[1])
        folder.mkdir(parents=True, exist_ok=True)
        mark = {"run": e.run_name, "rank": e.rank, "node_id": ray.get_runtime_context().get_node_id(),
                "node_ip": ray.util.get_node_ip_address(), "time": time.time()}
        tmp = folder / f".{e.run_name}-rank{e.rank}.tmp"
        tmp.write_text(json.dumps(mark))
        os.replace(tmp, folder / f"{e.run_name}-rank{e.rank}.json")
        deadline = time.monotonic() + TOGETHER_TIMEOUT_S
        while len(list(folder.glob("*.json"))) < count and time.monotonic() < deadline:
            time.sleep(0.2)

    def on_step(self, e: Any, batch: Any) -> None:
        pass

    def on_log(self, e: Any) -> None:
        pass

    def on_report(self, e: Any) -> None:
        pass

    def on_exit(self, e: Any) -> None:
        pass


def together_marks(folder: Path) -> dict[str, dict[str, Any]]:
    """What StartTogether wrote: "<run>-rank<r>" -> its mark."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def netns_available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and subprocess.run(
        ["ip", "netns", "list"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def local_cluster() -> Iterator[LocalCluster]:
    """A head + 2 worker nodes for the tests of one module, stopped and checked at the end."""
    with LocalCluster.up(workers=2) as cluster:
        yield cluster
