"""An align actor killed mid-prepare (SIGSEGV from outside, as a native crash in dlib would kill
it): its block is retried on a fresh actor, every input row is still written or rejected, and the
crash's trace is in the dataset's logs/."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
from cluster_utils import processes_titled

from ranray.data.prepare import _job, _plan, open_work, prepare, worker_died
from ranray.data.schema import read_manifest, shard_paths
from ranray.data.shards import OutputLocation, read_markers
from ranray.data.synth import SynthOptions, synthesize


def align_actors() -> list[int]:
    return processes_titled("ray::", containing="MapWorker")


def kill_one_actor_when_busy(logs: Path, killed: list[int], stop: threading.Event) -> None:
    """SIGSEGV to an align actor once it has written a block (it is then past dlib's loading)."""
    while not stop.is_set():
        actors = [pid for pid in align_actors() if (logs / f"align-{pid}.log").is_file()]
        if actors and list((logs.parent / "blocks").glob("*.json")):
            os.kill(actors[0], signal.SIGSEGV)
            killed.append(actors[0])
            return
        time.sleep(0.05)


def test_align_actor_killed_mid_run_loses_no_row(ray_session, tmp_path):
    raw = synthesize(tmp_path / "raw", SynthOptions(n=400, seed=5))
    cfg = raw.prepare_config(tmp_path / "prepared")
    cfg.num_workers = 2
    killed: list[int] = []
    stop = threading.Event()
    logs = tmp_path / ".prepared.partial" / "logs"
    killer = threading.Thread(target=kill_one_actor_when_busy, args=(logs, killed, stop), daemon=True)
    killer.start()
    try:
        prepare(cfg)
    finally:
        stop.set()
        killer.join(timeout=10)
    assert killed, "no align actor was found to kill"

    manifest = read_manifest(tmp_path / "prepared")
    assert manifest["rows_in"] == 400 == manifest["rows_written"] + manifest["rows_rejected"]
    rejects = pq.read_table(tmp_path / "prepared" / "rejects.parquet").to_pylist()
    assert not [r for r in rejects if r["reason"] == "worker_died"]  # the retry aligned the killed block
    written = sum(pq.read_table(shard_paths(tmp_path / "prepared", s)).num_rows for s in manifest["splits"])
    assert written == manifest["rows_written"]
    # The killed actor's native trace is in the dataset's logs, one file per actor process.
    crash_log = tmp_path / "prepared" / "logs" / f"align-{killed[0]}.log"
    assert "SIGSEGV received" in crash_log.read_text()


def test_a_row_whose_worker_died_becomes_a_committed_reject_with_its_reason(tmp_path):
    raw = synthesize(tmp_path / "raw", SynthOptions(n=20, seed=6, non_face_frac=0.0))
    cfg = raw.prepare_config(tmp_path / "prepared")
    work = open_work(OutputLocation(cfg.out), resume=False)
    plan, blocks = _plan(cfg, work)
    job = _job(cfg, plan, work)
    block = blocks[0]
    row_task = dict(block, name=f"{block['name']}-00003", lo=3, hi=4)
    stats = worker_died(job, row_task)
    assert (stats["rows_in"], stats["written"], stats["rejected"]) == (1, 0, 1)
    assert read_markers(work, keys=None)[row_task["name"]]["reasons"] == {"worker_died": 1}
    (reject,) = work.read_table(stats["rejects_file"]).to_pylist()
    # The block's fourth line, counted through its runs of fer2013new.csv: its key, not a made-up one.
    lines = [first + k for _, first, n, _, _ in block["segments"] for k in range(n)]
    name = (raw.root / "fer2013new.csv").read_text().splitlines()[lines[3]].split(",")[1]
    assert reject["key"] == name and reject["reason"] == "worker_died" and "native crash" in reject["detail"]
