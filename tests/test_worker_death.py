"""A Ray Train worker killed by a signal from outside, as a native crash would kill it.

`ranray train` runs as a child process against the session's Ray; the test SIGSEGVs a training
worker by its pid once a checkpoint is on disk, waits for the retry (checkpoint.max_failures=1)
and kills the restarted group's worker too. What the user must get: exit code 1, one line that
names the rank, pid, signal, retries and the worker's log (which holds the native trace), no
native trace on the terminal, the MLflow run FAILED, and the last checkpoint intact.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from train_fixtures import learnable_dataset, tiny_config

from ranray.config import flatten
from ranray.tracking import find_runs
from ranray.train.checkpoint import STATE_FILE, verify_checkpoint
from ranray.train.commits import committed

REPO = Path(__file__).resolve().parents[1]


def train_workers(gcs_address: str) -> set[int]:
    """That Ray's live Ray Train workers, from its state API: never another Ray's on this machine."""
    from ray.util.state import list_actors

    alive = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    return {a.pid for a in list_actors(address=gcs_address, filters=alive)}


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("checkpoint_*") if (p / STATE_FILE).is_file())


def wait_for(what: str, check, proc: subprocess.Popen, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"ranray train ended (exit {proc.returncode}) while waiting for {what}"
        found = check()
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_worker_killed_by_sigsegv_ends_in_one_line_a_failed_run_and_a_good_checkpoint(ray_session, tmp_path):
    data = learnable_dataset(tmp_path / "ds")
    cfg = tiny_config(data, tmp_path / "runs", "segv", "epochs=40", "checkpoint.max_failures=1")
    run_dir = tmp_path / "runs" / "segv"
    args = [sys.executable, "-m", "ranray.cli", "train", *(f"{k}={'null' if v is None else v}"
                                                            for k, v in flatten(cfg).items()
                                                            if not isinstance(v, (list, dict)))]
    gcs = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_ADDRESS": gcs}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed: list[int] = []
    seen: set[int] = set()
    try:
        for generation in range(2):  # the first group, then the group the retry starts
            # A checkpoint of this group committed (names end in _g<start>), then one of its workers.
            wait_for(f"a committed checkpoint of start {generation}",
                     lambda: [c for c in committed(run_dir) if c["checkpoint_dir_name"].endswith(f"_g{generation:02d}")],
                     proc)
            group = wait_for("the group's training workers", lambda: train_workers(gcs) - seen, proc)
            seen |= group
            os.kill(min(group), signal.SIGSEGV)
            killed.append(min(group))
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()

    assert proc.returncode == 1, out[-2000:] + err[-3000:]
    # Ray streams the controller's last lines asynchronously: they may print after ours.
    (last,) = [line for line in err.splitlines() if line.startswith("ranray train: ")]
    assert last.startswith("ranray train: training failed: worker rank "), last
    assert f"(pid {killed[-1]} on " in last and "died of SIGSEGV" in last, last
    assert "after 1 retry (checkpoint.max_failures)" in last, last
    log_file = Path(last.split("its log: ")[1].split(";")[0])
    assert log_file.parent == run_dir / "logs" and log_file.is_file()
    assert "SIGSEGV received" in log_file.read_text()  # the native trace is in the worker's log ...
    assert "SIGSEGV received" not in out + err  # ... and not on the terminal
    # Tracebacks of the workers (the survivor's broken collective too), of the controller and of the driver are
    # in the logs; Ray's own service actors (e.g. its PlacementGroupCleaner under load) may still print theirs.
    ours = [line for line in (out + err).splitlines() if "Traceback" in line
            and ("RayTrainWorker" in line or "TrainController" in line
                 or not re.sub(r"\x1b\[[0-9;]*m", "", line).startswith("("))]
    assert not ours, ours
    assert "Worker info: Worker(" not in err  # Ray Train's failure dumps are not streamed either

    (run,) = find_runs(f"sqlite:///{run_dir / 'mlflow.db'}", "ranray-test")
    assert run["status"] == "FAILED"
    newest = run_dir / committed(run_dir)[-1]["checkpoint_dir_name"]  # what a resubmission resumes from
    assert newest.name.endswith("_g01")  # the retry resumed from the first group's checkpoint
    verify_checkpoint(newest / STATE_FILE)  # raises CheckpointError if it were damaged
