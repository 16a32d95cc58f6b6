"""`ranray prepare` submitted to the local multi-node cluster (cluster/local.sh): a worker node SIGKILLed
mid-run (its raylet, then the rest of the node) costs only its blocks in flight, which run again on
another node; the result equals an uninterrupted run's (same keys, labels, images and counts)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from cluster_utils import LocalCluster, proc_stat

from ranray.data.prepare import prepare
from ranray.data.schema import read_manifest, shard_paths
from ranray.data.synth import SynthOptions, synthesize


def _rows(out: Path) -> dict[str, tuple]:
    rows = {}
    for split in read_manifest(out)["splits"]:
        for r in pq.read_table(shard_paths(out, split), columns=["key", "label", "image"]).to_pylist():
            assert r["key"] not in rows, f"{r['key']} written twice"
            rows[r["key"]] = (r["label"], r["image"])
    return rows


def _actor_hosts(cluster: LocalCluster) -> list[str]:
    hosts = []
    for name in cluster.node_names():
        for pid in cluster.node_processes(name):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"BlockPreparer" in title:
                hosts.append(name)
    return sorted(set(hosts))


def test_worker_node_killed_mid_prepare_loses_and_repeats_no_row(ray_session, tmp_path):
    raw = synthesize(tmp_path / "raw", SynthOptions(n=500, seed=12, non_face_frac=0.02))
    reference = prepare(raw.prepare_config(tmp_path / "reference", num_workers=2))
    out = tmp_path / "cluster"
    entry = [sys.executable, "-m", "ranray.cli", "prepare", "ferplus", str(raw.root), "--out", str(out),
             "num_workers=2", "worker_retries=3"]
    with LocalCluster.up(workers=3) as cluster:  # a lost node leaves a node for the restarted actor
        sid = cluster.submit(entry)
        blocks = tmp_path / ".cluster.partial" / "blocks"
        deadline = time.monotonic() + 300
        while not (blocks.is_dir() and len(list(blocks.glob("*.json"))) >= 3) and time.monotonic() < deadline:
            time.sleep(0.1)
        hosts = [h for h in _actor_hosts(cluster) if h != "head"]
        assert hosts, cluster.job_logs(sid)[-3000:]
        killed = cluster.kill_node(hosts[0])  # SIGKILL to its raylet; its guard takes the node down
        cluster.wait_node_gone(hosts[0])
        assert all(proc_stat(pid) is None for pid in killed)
        info = cluster.wait_job(sid, timeout=600)
        logs = cluster.job_logs(sid)
    assert info["status"] == "SUCCEEDED", logs[-3000:]
    manifest = read_manifest(out)
    assert manifest["rows_in"] == reference.rows_in == 500
    assert (manifest["rows_written"], manifest["rows_rejected"]) == (reference.rows_written, reference.rows_rejected)
    assert "worker_died" not in manifest["rejects_by_reason"]
    assert _rows(out) == _rows(tmp_path / "reference")
