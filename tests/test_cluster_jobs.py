"""Jobs on a real multi-node cluster (cluster/local.sh: head + 3 worker nodes of one CPU each),
submitted with the real `ray job submit`, and what happens when parts of the cluster die:

- the synthetic demo, submitted with jobs/submit.sh (prepare on Ray Data, RAN training by Ray
  Train, evaluation), with its data and runs on "shared storage" (a local folder standing in for
  /mnt/shared): it succeeds, and leaves its dataset, checkpoint, model and MLflow run;
- a failure-free fine-tuning run is the reference (and its checkpoints and MLflow run are checked);
- a worker node is hard-killed (its raylet SIGKILLed, the rest of the node with it) mid-run: the
  job still finishes, with the reference's final step count and the reference's steps, each
  applied once, and its log shows the restart from the checkpoint;
- the job's driver is SIGKILLed mid-run: the job fails; submitting the same job again (same
  run.name) resumes from the last checkpoint and ends where the reference ends.

"Each step once" is read from the per-rank steps logs the tests' engine hook writes (step_hooks.StepsLog):
a restart at step S drops what the log holds after S, and what is left must be 1..N, on the same
batches as the reference's. Kills happen after a *committed* checkpoint, read the way the restart
reads it (Ray Train's checkpoint_manager_snapshot.json, ranray.train.commits), and the work lost
to each kill is bounded by one checkpoint interval: the steps the killed group ran past the step
the next group resumed from.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cluster_utils import REPO, LocalCluster, proc_stat
from step_hooks import committed_steps
from train_fixtures import NUM_CLASSES, SPLITS

from ranray.tracking import find_runs
from ranray.train.commits import last_committed_step

WORKERS = 2
BATCH = 8
EPOCHS = 2
STEPS_PER_EPOCH = SPLITS["train"] // (WORKERS * BATCH)  # drop_last: every rank the same batches
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH
CHECKPOINT_EVERY = 2


@pytest.fixture(scope="module")
def cluster():
    # Three one-CPU worker nodes for a two-worker group: a lost node leaves room for the restart.
    with LocalCluster.up(workers=3) as c:
        yield c


def train_entry(data_dir: Path, storage: Path, name: str, *extra: str) -> list[str]:
    """`ranray train` with the tiny test config (the nodes share this machine's disk) and the steps log."""
    return ["ranray", "train",
            f"data.dir={data_dir}", f"run.storage_path={storage}", f"run.name={name}",
            "data.loader=torch", "data.num_threads=0", "data.augment.enabled=false",
            "model.backbone=iresnet_tiny", f"model.num_classes={NUM_CLASSES}", "model.num_regions=3",
            "optim.name=adamw", "optim.lr=0.003", "optim.schedule=cosine", "optim.weight_decay=0.0",
            f"epochs={EPOCHS}", f"batch_size={BATCH}", "precision=bf16",
            f"scaling.num_workers={WORKERS}", f"checkpoint.every_n_steps={CHECKPOINT_EVERY}",
            "checkpoint.keep=2", "tracking.experiment=ranray-cluster-test", 'run.hooks=["step_hooks:StepsLog"]', *extra]


def lineages(run_dir: Path) -> dict[int, list[tuple[int, int, str]]]:
    return {rank: committed_steps(run_dir / "steps" / f"rank{rank}.log") for rank in range(WORKERS)}


def starts(run_dir: Path) -> list[tuple[int, int]]:
    """(generation, resume step) of every start of rank 0's worker."""
    lines = (run_dir / "steps" / "rank0.log").read_text().splitlines()
    return [(int(f[1]), int(f[2])) for f in (line.split() for line in lines) if f[0] == "start"]


def last_step(run_dir: Path) -> int:
    log = run_dir / "steps" / "rank0.log"
    if not log.exists():
        return 0
    steps = [int(line.split()[1]) for line in log.read_text().splitlines() if line.startswith("step ")]
    return steps[-1] if steps else 0


def wait_for_commit(cluster: LocalCluster, sid: str, run_dir: Path, step: int, timeout: float = 300) -> int:
    """Wait until a checkpoint at `step` or later is committed; the committed step."""
    deadline = time.monotonic() + timeout
    while (committed := last_committed_step(run_dir)) < step:
        status = cluster.job_info(sid)["status"]
        assert status in ("PENDING", "RUNNING"), f"job {sid} is {status} before committing step {step}:\n" + \
            cluster.job_logs(sid)[-3000:]
        assert time.monotonic() < deadline, f"job {sid} did not commit step {step} in {timeout}s"
        cluster.snapshot()
        time.sleep(0.2)
    return committed


def lost_steps(run_dir: Path) -> list[int]:
    """Per restart: the steps the failed group ran past the step the restart resumed from."""
    lost, ran = [], 0
    for fields in ((run_dir / "steps" / "rank0.log").read_text().split("\n")):
        kind, *rest = fields.split() or [""]
        if kind == "step":
            ran = max(ran, int(rest[0]))
        elif kind == "start" and ran:
            lost.append(ran - int(rest[1]))
    return lost


def processes_named(cluster: LocalCluster, prefix: str) -> dict[str, list[int]]:
    """Node name -> pids whose process title starts with `prefix` (Ray sets titles like
    `ray::RayTrainWorker...`)."""
    found: dict[str, list[int]] = {}
    for name in cluster.node_names():
        for pid in cluster.node_processes(name):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if title.startswith(prefix):
                found.setdefault(name, []).append(pid)
    return found


def test_demo_job_submitted_with_the_submit_tool(cluster, tmp_path):
    shared = tmp_path / "shared"
    done = subprocess.run(
        [str(REPO / "jobs" / "submit.sh"), "demo", "--shared-root", str(shared), "--verb-args=--n 160",
         "epochs=1", "batch_size=8", "model.num_regions=3", "--follow"],
        env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ray job submit --address " + cluster.dashboard_url in done.stdout
    assert ": SUCCEEDED" in done.stdout and "test accuracy, all faces" in done.stdout
    workdir = shared / "ranray" / "demo"
    manifest = json.loads((workdir / "prepared" / "manifest.json").read_text())
    assert manifest["rows_in"] == 160 == manifest["rows_written"] + manifest["rows_rejected"]
    (run_dir,) = (workdir / "runs").iterdir()
    assert (run_dir / "model" / "best.pt").is_file() and (run_dir / "model" / "final.pt").is_file()
    assert any(p.name.startswith("checkpoint") for p in run_dir.iterdir())
    (run,) = find_runs(f"sqlite:///{run_dir / 'mlflow.db'}", "ranray-demo")
    assert run["status"] == "FINISHED"


@pytest.fixture(scope="module")
def reference(cluster, data_dir, storage) -> Path:
    """The failure-free run: its run directory."""
    sid = cluster.submit(train_entry(data_dir, storage, "reference"), working_dir=data_dir.parent)
    info = cluster.wait_job(sid, timeout=600)
    assert info["status"] == "SUCCEEDED", cluster.job_logs(sid)[-3000:]
    return storage / "reference"


def test_failure_free_job_trains_every_step_and_keeps_its_records(reference):
    lineage = lineages(reference)
    for rank in range(WORKERS):
        assert [step for step, _, _ in lineage[rank]] == list(range(1, TOTAL_STEPS + 1))
    assert starts(reference) == [(0, 0)]
    assert (reference / "model" / "final.pt").is_file()
    assert any(p.name.startswith("checkpoint") for p in reference.iterdir())
    (run,) = find_runs(f"sqlite:///{reference / 'mlflow.db'}", "ranray-cluster-test")
    assert run["status"] == "FINISHED"
    assert run["metrics"]["step"] == TOTAL_STEPS


def test_worker_node_killed_mid_run_job_finishes_each_step_once(cluster, data_dir, storage, reference):
    name = "node_loss"
    sid = cluster.submit(train_entry(data_dir, storage, name, "checkpoint.max_failures=2"),
                         working_dir=data_dir.parent)
    run_dir = storage / name
    committed = wait_for_commit(cluster, sid, run_dir, CHECKPOINT_EVERY)

    hosts = processes_named(cluster, "ray::RayTrainWorker")
    victim = sorted(hosts)[0]
    assert victim != "head"
    killed = cluster.kill_node(victim)  # SIGKILL to its raylet; its guard takes the node down
    cluster.wait_node_gone(victim)
    assert all(proc_stat(pid) is None for pid in killed)

    info = cluster.wait_job(sid, timeout=600)
    logs = cluster.job_logs(sid)
    assert info["status"] == "SUCCEEDED", logs[-3000:]
    assert lineages(run_dir) == lineages(reference)  # the same steps on the same batches, once each
    restarts = starts(run_dir)[1:]
    assert restarts and all(resume >= committed for _, resume in restarts), (committed, starts(run_dir))
    assert all(0 <= n <= CHECKPOINT_EVERY for n in lost_steps(run_dir)), lost_steps(run_dir)  # one interval
    # The job's log tells of the retry and the restore from the checkpoint.
    assert "[FailurePolicy] RETRY" in logs, logs[-3000:]
    assert f"resumed from {run_dir}/checkpoint_" in logs, logs[-3000:]


def test_driver_killed_then_resubmitted_resumes_from_the_last_checkpoint(cluster, data_dir, storage, reference):
    name = "driver_loss"
    entry = train_entry(data_dir, storage, name)
    sid = cluster.submit(entry, working_dir=data_dir.parent)
    run_dir = storage / name
    committed = wait_for_commit(cluster, sid, run_dir, 2 * CHECKPOINT_EVERY)

    drivers = [pid for pid in cluster.node_processes("head")
               if f"run.name={name}" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
               and "ranray" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]
    assert drivers, "the job's driver process was not found on the head node"
    for pid in drivers:
        os.kill(pid, signal.SIGKILL)
    info = cluster.wait_job(sid, timeout=120)
    assert info["status"] == "FAILED"
    stopped_at = last_step(run_dir)
    assert stopped_at < TOTAL_STEPS

    again = cluster.submit(entry, working_dir=data_dir.parent)
    info = cluster.wait_job(again, timeout=600)
    assert info["status"] == "SUCCEEDED", cluster.job_logs(again)[-3000:]
    assert lineages(run_dir) == lineages(reference)
    first, *_, resumed = starts(run_dir)
    assert first == (0, 0)
    assert committed <= resumed[1] <= stopped_at  # from the last committed checkpoint, not from 0
    # The killed driver's workers die a moment after the job reads FAILED: they may log a step past stopped_at.
    (lost,) = lost_steps(run_dir)
    assert stopped_at - resumed[1] <= lost <= CHECKPOINT_EVERY
