"""Elastic training on a real multi-node cluster (cluster/local.sh: head + 3 one-CPU worker nodes):
a fine-tuning job with scaling.num_workers=2-3 starts on 3 workers; one worker node is SIGKILLed
(its raylet, the rest of the node with it) after a committed checkpoint; Ray Train restarts the
group on the 2 workers left, the loader re-plans the rest of the interrupted epoch over them, and
the job finishes. Read back from the per-rank keys logs (step_hooks.KeysLog): every training row
is used exactly once in every epoch, and the last start ran on 2 workers.

Slow (a cluster start and a 3 -> 2 restart): run with the other cluster job tests (Makefile
CLUSTER_JOB_TESTS), not in `make test`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cluster_utils import LocalCluster, proc_stat
from step_hooks import committed_batches
from train_fixtures import NUM_CLASSES, SPLITS, learnable_dataset

from ranray.train.commits import last_committed_step

EPOCHS = 2
BATCH = 8


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster.up(workers=3) as c:
        yield c


def elastic_entry(data_dir: Path, storage: Path, name: str) -> list[str]:
    return ["ranray", "train",
            f"data.dir={data_dir}", f"run.storage_path={storage}", f"run.name={name}",
            "data.loader=torch", "data.num_threads=0", "data.augment.enabled=false",
            "model.backbone=iresnet_tiny", f"model.num_classes={NUM_CLASSES}", "model.num_regions=3",
            "optim.name=sgd", "optim.lr=0.05", "optim.schedule=cosine", "optim.weight_decay=0.0",
            f"epochs={EPOCHS}", f"batch_size={BATCH}", "precision=bf16",
            "scaling.num_workers=2-3", "checkpoint.every_n_steps=1", "checkpoint.keep=2",
            "checkpoint.max_failures=2", "tracking.experiment=ranray-cluster-test",
            'run.hooks=["step_hooks:KeysLog"]']


def worker_nodes_running_training(cluster: LocalCluster) -> list[str]:
    found = set()
    for name in cluster.node_names():
        for pid in cluster.node_processes(name):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if title.startswith("ray::RayTrainWorker"):
                found.add(name)
    return sorted(found)


def test_a_lost_worker_node_shrinks_the_group_to_two_and_every_row_is_used_once_per_epoch(cluster, tmp_path):
    import time

    data_dir = learnable_dataset(tmp_path / "data" / "ds")
    storage = tmp_path / "runs"
    run_dir = storage / "elastic"
    sid = cluster.submit(elastic_entry(data_dir, storage, "elastic"), working_dir=data_dir.parent)
    deadline = time.monotonic() + 300
    while last_committed_step(run_dir) < 2:  # 96 rows: 4 steps per epoch on 3 workers; stop inside epoch 0
        assert cluster.job_info(sid)["status"] in ("PENDING", "RUNNING"), cluster.job_logs(sid)[-3000:]
        assert time.monotonic() < deadline, "no checkpoint committed in 300 s"
        cluster.snapshot()
        time.sleep(0.2)
    nodes = worker_nodes_running_training(cluster)
    assert len(nodes) == 3 and "head" not in nodes  # the group started at its max
    killed_at = time.time()
    killed = cluster.kill_node(nodes[-1])
    cluster.wait_node_gone(nodes[-1])
    assert all(proc_stat(pid) is None for pid in killed)

    info = cluster.wait_job(sid, timeout=600)
    logs = cluster.job_logs(sid)
    assert info["status"] == "SUCCEEDED", logs[-3000:]
    starts = [line.split() for line in (run_dir / "keys" / "rank0.log").read_text().splitlines()
              if line.startswith("start ")]
    assert [int(s[3]) for s in starts][0] == 3 and int(starts[-1][3]) == 2  # 3 workers, then 2
    # What the loss cost (docs/ELASTIC.md): kill -> the 2-worker group's first step, and the redone steps.
    lines = [line.split() for line in (run_dir / "keys" / "rank0.log").read_text().splitlines()]
    last = max(i for i, f in enumerate(lines) if f[0] == "start")
    before = [f for f in lines[:last] if f[0] == "step"]
    first_after = next(f for f in lines[last:] if f[0] == "step")
    print(f"elastic restart: kill -> first step on {starts[-1][3]} workers {float(first_after[4]) - killed_at:.1f} s; "
          f"steps redone {int(before[-1][1]) - int(starts[-1][2])}; resumed from step {starts[-1][2]}")
    batches = committed_batches(run_dir)
    rows = sorted(f"train/{i:05d}.png" for i in range(SPLITS["train"]))
    for epoch in range(EPOCHS):
        assert sorted(k for _, e, keys in batches if e == epoch for k in keys) == rows, f"epoch {epoch}"
