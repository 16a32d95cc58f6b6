"""The team's tracking server on a real multi-node cluster (issue 28): cluster/local.sh with a head and
four one-CPU worker nodes, and `ranray track server` with MLflow's basic authentication started from
cluster/mlflow_server.yaml as the head runs it (tests/auth_server.py), listening where the nodes
reach the head. Users: alice, whose credentials file the jobs get, and bob (the config's
default_permission READ on experiments he did not create).

Two jobs are submitted with `ranray submit` (a job directory made here: the job configs and their
jobs/cluster/ sidecars, paths under /mnt/shared mapped by --shared-root), both with --tracking-uri
and --tracking-credentials: a Tune search of four concurrent trials (one worker each; a worker
holds 0.9 CPU, so no two trials share a node) and a fine-tuning job that registers its best model.
Every training run waits, once started, for the others (cluster_utils.StartTogether), so the five
runs log into the server at the same time. Afterwards, read back as alice:

- every run is in the server, FINISHED, written as alice; no run directory kept a journal;
- every metric step is there, each once: the steps derived from the config (steps per epoch,
  log_every_n_steps, epochs) per key, the epoch metrics with the values each trial reported to Tune,
  the clean protocol's test metrics as the run wrote them; every artifact with its local file's size;
- the trials ran on four distinct nodes (Ray's record of the Train workers), the fine-tune's
  logging overlapped each trial's;
- the registered model resolves through models:/NAME/1 to the fine-tune's best weights;
- no credentials, or a wrong password: 401; bob reads alice's run but cannot write to it (403).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from auth_server import AuthServer, http_status
from cluster_utils import TOGETHER_ENV, LocalCluster, together_marks
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
from ray.tune.result import AUTO_RESULT_KEYS
from train_fixtures import NUM_CLASSES, SPLITS

from ranray.inference import load_trained_model
from ranray.model_card import card_path
from ranray.model_store import MODEL_ARTIFACT
from ranray.run_dir import RunDir
from ranray.tracking_access import PASSWORD_ENV, USERNAME_ENV, basic_auth_header, read_credentials_file

RANRAY = Path(sys.executable).with_name("ranray")
NODES = 4  # one-CPU worker nodes; the head has none
TRIALS = 4
BATCH = 16
STEPS_PER_EPOCH = SPLITS["train"] // BATCH  # one worker per run
LOG_EVERY = 2
EPOCHS = 2
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH
LOG_STEPS = list(range(LOG_EVERY, TOTAL_STEPS + 1, LOG_EVERY))
EPOCH_ENDS = [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]
TUNE_EXPERIMENT, FINETUNE_EXPERIMENT = "cluster-tune", "cluster-finetune"
SEARCH, FINETUNE_RUN, MODEL_NAME = "cluster-search", "cluster-finetune", "cluster-ran"
SHARED = "/mnt/shared/ranray"  # as the sidecars write it; --shared-root maps it to a local folder
START_KEYS = {"workers", "global_batch", "lr_scale"}  # logged once at a start (ranray.train.elastic)
STEP_KEYS = {"train_loss", "lr", "images_per_s"}  # every log_every_n_steps (lr, images_per_s: at epoch ends too)
BEST_KEYS = {"best_val_accuracy", "best_epoch"}  # at every epoch end, and once more when the run finishes
TUNE_OWN_KEYS = {*AUTO_RESULT_KEYS, "done", "should_checkpoint", "trial_id", "experiment_tag", CHECKPOINT_PATH_KEY}
JOB_TIMEOUT_S = 300

assert STEPS_PER_EPOCH % LOG_EVERY == 0  # else an epoch's last steps are logged at its end too


# ---------------------------------------------------------------------------------------------
# The jobs
# ---------------------------------------------------------------------------------------------


def write_jobs(project: Path, together: str) -> Path:
    """A project directory with two jobs, as jobs/ holds them: the config, and its cluster sidecar."""
    base = {"data": {"dir": "data/tiny", "loader": "torch", "num_threads": 0, "augment": {"enabled": False}},
            "model": {"backbone": "iresnet_tiny", "num_classes": NUM_CLASSES, "num_regions": 2},
            "optim": {"name": "sgd", "lr": 0.05, "weight_decay": 0.0}, "checkpoint": {"keep": 1},
            "epochs": EPOCHS, "batch_size": BATCH, "precision": "fp32", "log_every_n_steps": LOG_EVERY,
            "run": {"hooks": ["cluster_utils:StartTogether"], "progress": "off"}}
    finetune = {**base, "run": {**base["run"], "name": FINETUNE_RUN, "storage_path": "runs"},
                # 0.05 CPU: it fits beside a trial's worker on any of the four nodes
                "scaling": {"num_workers": 1, "cpus_per_worker": 0.05},
                "tracking": {"experiment": FINETUNE_EXPERIMENT, "register_model": MODEL_NAME}}
    search = {"name": SEARCH, "storage_path": "runs", "base_config": "jobs/tiny_base.yaml",
              "space": {"margin_min": 0.0, "margin_max": 0.2, "lr_min": 0.01, "lr_max": 0.1},
              "num_samples": TRIALS, "use_asha": False, "max_epochs": EPOCHS, "grace_period": 1,
              # 0.9 CPU a worker: never two on a one-CPU node, and room beside it for the trials' 0.01
              "workers_per_trial": 1, "cpus_per_worker": 0.9, "max_concurrent_trials": TRIALS,
              "tracking": {"experiment": TUNE_EXPERIMENT}}
    runtime_env = {"env_vars": {"PYTHONUNBUFFERED": "1", TOGETHER_ENV: together}}
    sidecars = {
        "cluster_search": {"verb": "tune", "runtime_env": runtime_env,
                           "overrides": [f"storage_path={SHARED}/runs",
                                         f"base_overrides=[data.dir={SHARED}/data/tiny]"]},
        "cluster_finetune": {"verb": "train", "runtime_env": runtime_env,
                             "overrides": [f"run.storage_path={SHARED}/runs", f"data.dir={SHARED}/data/tiny"]},
    }
    jobs = project / "jobs"
    (jobs / "cluster").mkdir(parents=True)
    for name, config in (("tiny_base", base), ("cluster_search", search), ("cluster_finetune", finetune)):
        (jobs / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for name, sidecar in sidecars.items():
        (jobs / "cluster" / f"{name}.yaml").write_text(yaml.safe_dump(sidecar, sort_keys=False))
    return project


def submit(cluster: LocalCluster, project: Path, job: str, shared: Path, uri: str, credentials: Path) -> str:
    sid = f"{job}-{int(time.time() * 1000)}"
    done = subprocess.run(
        [str(RANRAY), "submit", job, "--address", cluster.dashboard_url, "--working-dir", str(project),
         "--shared-root", str(shared), "--tracking-uri", uri, "--tracking-credentials", str(credentials),
         "--submission-id", sid],
        env=cluster.env, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    password = read_credentials_file(credentials).password
    assert f"tracking.credentials_file={credentials}" in done.stdout and password not in done.stdout
    return sid


@dataclass
class Campaign:
    cluster: LocalCluster
    server: AuthServer
    uri: str
    shared: Path
    together: Path
    jobs: dict[str, dict[str, Any]]  # sid -> job info
    logs: dict[str, str]
    search_sid: str
    finetune_sid: str

    @property
    def runs(self) -> Path:
        return self.shared / "ranray" / "runs"

    @property
    def finetune_dir(self) -> Path:
        return self.runs / FINETUNE_RUN

    @property
    def search_dir(self) -> Path:
        return self.runs / SEARCH

    def trial_dirs(self) -> dict[str, Path]:
        """trial id -> its training run directory."""
        return {p.name.removeprefix(f"{SEARCH}-"): p for p in sorted((self.search_dir / "train").iterdir())}


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster.up(workers=NODES) as c:
        yield c


@pytest.fixture(scope="module")
def campaign(cluster, data_dir, tmp_path_factory) -> Iterator[Campaign]:
    root = tmp_path_factory.mktemp("cluster_tracking")
    # Where the nodes reach the head (the bridge's address in netns mode): the server listens there.
    head = cluster.gcs_address.rsplit(":", 1)[0]
    server = AuthServer.start(root / "server", host=head)
    try:
        server.add_user("alice")
        server.add_user("bob")
        shared = root / "shared"
        (shared / "ranray" / "data").mkdir(parents=True)
        (shared / "ranray" / "data" / "tiny").symlink_to(data_dir)
        together = shared / "together"
        project = write_jobs(root / "project", f"{together}:{TRIALS + 1}")
        with ThreadPoolExecutor(2) as pool:
            sids = list(pool.map(lambda job: submit(cluster, project, job, shared, server.url, server.users["alice"]),
                                 ("cluster_search", "cluster_finetune")))
        jobs = {sid: cluster.wait_job(sid, timeout=JOB_TIMEOUT_S) for sid in sids}
        logs = {sid: cluster.job_logs(sid) for sid in sids}
        for sid, info in jobs.items():
            assert info["status"] == "SUCCEEDED", f"{sid}: {info.get('message')}\n{logs[sid][-4000:]}"
        yield Campaign(cluster, server, server.url, shared, together, jobs, logs, sids[0], sids[1])
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# Reading the server
# ---------------------------------------------------------------------------------------------


@contextmanager
def as_user(campaign: Campaign, name: str) -> Iterator[MlflowClient]:
    """An MLflow client that sends `name`'s credentials (MLflow reads them from the environment)."""
    creds = read_credentials_file(campaign.server.users[name])
    saved = {k: os.environ.get(k) for k in (USERNAME_ENV, PASSWORD_ENV)}
    os.environ.update({USERNAME_ENV: creds.username, PASSWORD_ENV: creds.password})
    try:
        yield MlflowClient(tracking_uri=campaign.uri, registry_uri=campaign.uri)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def metric_histories(campaign: Campaign, user: str, runs: list[Any]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """run id -> key -> the key's whole history ({step, value, timestamp}), in (step, timestamp) order:
    one request per key for all the runs (the route MLflow's UI charts with), not one per run and key."""
    creds = read_credentials_file(campaign.server.users[user])
    run_ids = [r.info.run_id for r in runs]

    def history(key: str) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode([("metric_key", key), *(("run_id", r) for r in run_ids)])
        req = urllib.request.Request(f"{campaign.uri}/ajax-api/2.0/mlflow/metrics/get-history-bulk?{query}",
                                     headers={"Authorization": basic_auth_header(creds.username, creds.password)})
        with urllib.request.urlopen(req, timeout=60) as response:
            return json.load(response).get("metrics", [])

    out: dict[str, dict[str, list[dict[str, Any]]]] = {r: {} for r in run_ids}
    for key in sorted({k for r in runs for k in r.data.metrics}):
        for m in sorted(history(key), key=lambda m: (m["step"], m["timestamp"])):
            out[m["run_id"]].setdefault(key, []).append(m)
    return out


def artifact_sizes(client: MlflowClient, run_id: str, path: str | None = None) -> dict[str, int]:
    out: dict[str, int] = {}
    for info in client.list_artifacts(run_id, path):
        out.update(artifact_sizes(client, run_id, info.path) if info.is_dir else {info.path: info.file_size})
    return out


def local_sizes(files: dict[str, Path]) -> dict[str, int]:
    return {name: path.stat().st_size for name, path in files.items()}


def trained_artifacts(run_dir: Path) -> dict[str, Path]:
    """What a fine-tuning run logs (its task's finish, and the MLflow model the driver logs): artifact
    path -> the local file."""
    rd = RunDir(run_dir)
    files = {"plots/" + rd.confusion.name: rd.confusion, "plots/" + rd.attention.name: rd.attention,
             "model/best.pt": rd.best_model, "model/best.yaml": rd.best_model.with_suffix(".yaml"),
             "model/" + card_path(rd.best_model).name: card_path(rd.best_model),
             "model/final.yaml": rd.final_model.with_suffix(".yaml")}
    pyfunc = rd.model / MODEL_ARTIFACT
    files.update({f"{MODEL_ARTIFACT}/{p.relative_to(pyfunc).as_posix()}": p for p in pyfunc.rglob("*") if p.is_file()})
    return files


def expected_steps(epoch_keys: set[str], test_keys: set[str]) -> dict[str, list[int]]:
    """key -> the steps it is logged at, each once, from the config: a start record at step 0, the
    step metrics every LOG_EVERY steps, the epoch metrics at each epoch's end, the best score again
    and the test once at the run's end."""
    steps = {k: [0] for k in START_KEYS}
    steps.update({k: list(EPOCH_ENDS) for k in epoch_keys})
    steps["train_loss"] = list(LOG_STEPS)
    for key in STEP_KEYS - {"train_loss"}:
        steps[key] = sorted(LOG_STEPS + EPOCH_ENDS)
    for key in BEST_KEYS:
        steps[key] = EPOCH_ENDS + [TOTAL_STEPS]
    steps.update({k: [TOTAL_STEPS] for k in test_keys})
    return steps


def tune_reports(experiment: Path, trial_id: str) -> list[dict[str, float]]:
    """What the trial's rank 0 reported to Tune at each epoch's end (Tune's own keys left out)."""
    rows = [json.loads(line) for line in (experiment / f"trial_{trial_id}" / "result.json").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TUNE_OWN_KEYS and isinstance(v, (int, float))
             and not isinstance(v, bool)} for row in rows]


def recorded(run_dir: Path) -> dict[str, Any]:
    """The MLflow run a run directory records (tracking.json: run id, store, user)."""
    return json.loads(RunDir(run_dir).tracking_record.read_text())


def as_logged(key: str) -> str:
    return "epoch_train_loss" if key == "train_loss" else key  # ranray.train.engine.end_epoch


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------


def test_every_run_metric_step_and_artifact_reached_the_server(campaign):
    trial_dirs = campaign.trial_dirs()
    assert len(trial_dirs) == TRIALS
    journals = sorted(p for p in campaign.runs.rglob("metrics*.jsonl"))
    assert not journals, f"records were kept locally instead of reaching the server: {journals}"
    # The workers' log lines reach their job's log (ranray.failures.log_to_stdout), the tracker's too.
    last_epoch = f"ranray.train: epoch {EPOCHS} step {TOTAL_STEPS}:"
    for sid, runs_in_job in ((campaign.search_sid, TRIALS), (campaign.finetune_sid, 1)):
        logs = campaign.logs[sid]
        assert logs.count(last_epoch) == runs_in_job, logs[-3000:]
        assert "WARNING ranray.tracking" not in logs, logs[-3000:]

    with as_user(campaign, "alice") as client:
        tune_exp = client.get_experiment_by_name(TUNE_EXPERIMENT)
        (parent,) = client.search_runs([tune_exp.experiment_id], "tags.job = 'tune'")
        children = client.search_runs([tune_exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert sorted(r.data.tags["trial_id"] for r in children) == sorted(trial_dirs)
        finetune_id = recorded(campaign.finetune_dir)["run_id"]
        finetune = client.get_run(finetune_id)
        assert finetune.info.experiment_id == client.get_experiment_by_name(FINETUNE_EXPERIMENT).experiment_id

        # The search's own run: its summary files and the trial counts.
        assert parent.info.status == "FINISHED" and parent.data.metrics["trials_finished"] == TRIALS
        summary = {p.name: p for p in (campaign.search_dir / "summary").iterdir()
                   if p.name in ("tune_config.yaml", "trials.csv", "best_config.yaml", "accuracy_vs_params.png")}
        assert len(summary) == 4 and artifact_sizes(client, parent.info.run_id) == local_sizes(summary)
        with summary["trials.csv"].open() as f:
            table = {row["trial_id"]: row for row in csv.DictReader(f)}
        assert parent.data.metrics["best_val_accuracy"] == pytest.approx(
            max(float(row["best_val_accuracy"]) for row in table.values()))

        runs = {trial_dirs[r.data.tags["trial_id"]]: r for r in children} | {campaign.finetune_dir: finetune}
        histories = metric_histories(campaign, "alice", list(runs.values()))
        served = {run_dir: artifact_sizes(client, run.info.run_id) for run_dir, run in runs.items()}
        epoch_keys = None
        for run_dir, run in runs.items():
            where = f"{run_dir.name} (run {run.info.run_id})"
            assert run.info.status == "FINISHED", where
            assert {k: recorded(run_dir)[k] for k in ("user", "tracking_uri")} == {"user": "alice",
                                                                                "tracking_uri": campaign.uri}, where
            metrics = histories[run.info.run_id]
            test = json.loads(RunDir(run_dir).test_metrics.read_text())
            if run_dir != campaign.finetune_dir:
                trial_id = run.data.tags["trial_id"]
                # The sampled values the trial trained with are its run's params.
                assert float(run.data.params["lr"]) == pytest.approx(float(table[trial_id]["lr"])), where
                assert float(run.data.params["margin"]) == pytest.approx(float(table[trial_id]["margin"])), where
                reports = tune_reports(campaign.search_dir, trial_id)
                assert [r["step"] for r in reports] == EPOCH_ENDS, where
                for report in reports:  # every value each epoch reported, at its step
                    for key, value in report.items():
                        logged = [m["value"] for m in metrics[as_logged(key)] if m["step"] == report["step"]]
                        assert pytest.approx(value) in logged, (where, key, report["step"], logged)
                epoch_keys = epoch_keys or {as_logged(k) for k in reports[0]} - STEP_KEYS - BEST_KEYS
            expected = expected_steps(epoch_keys, set(test))
            assert {k: [m["step"] for m in v] for k, v in metrics.items()} == expected, where
            assert {k: metrics[k][0]["value"] for k in test} == pytest.approx(test), where
            assert [m["value"] for m in metrics["epoch"]] == [e + 1 for e in range(EPOCHS)], where
            artifacts = trained_artifacts(run_dir)
            if run_dir == campaign.finetune_dir:
                artifacts["config.yaml"] = RunDir(run_dir).config
            assert served[run_dir] == local_sizes(artifacts), where


def test_four_trials_ran_on_four_nodes_while_the_finetune_logged(campaign):
    cluster = campaign.cluster
    job_ids = {sid: info["job_id"] for sid, info in campaign.jobs.items()}
    actors = cluster.api("/api/v0/actors?limit=10000&detail=1")["data"]["result"]["result"]
    workers = [a for a in actors if a["class_name"] == "RayTrainWorker"]
    search_nodes = [a["node_id"] for a in workers if a["job_id"] == job_ids[campaign.search_sid]]
    assert len(search_nodes) == TRIALS and len(set(search_nodes)) == TRIALS, search_nodes  # no restarts, no sharing
    node_ips = {n["node_id"]: n["node_ip"] for n in cluster.alive_nodes()}
    if cluster.net == "netns":  # every node its own address
        assert len({node_ips[n] for n in search_nodes}) == TRIALS

    marks = together_marks(campaign.together)
    trial_marks = {k: v for k, v in marks.items() if k.startswith(SEARCH)}
    assert len(marks) == TRIALS + 1 and {m["node_id"] for m in trial_marks.values()} == set(search_nodes)

    with as_user(campaign, "alice") as client:
        def span(run_id: str) -> tuple[int, int]:
            history = client.get_metric_history(run_id, "train_loss")
            return min(m.timestamp for m in history), max(m.timestamp for m in history)

        finetune_id = recorded(campaign.finetune_dir)["run_id"]
        finetune = span(finetune_id)
        for trial_id, run_dir in campaign.trial_dirs().items():
            trial = span(recorded(run_dir)["run_id"])
            assert max(trial[0], finetune[0]) < min(trial[1], finetune[1]), (trial_id, trial, finetune)


def test_the_registered_model_resolves_to_the_finetunes_best_weights(campaign):
    with as_user(campaign, "alice") as client:
        (version,) = client.search_model_versions(f"name='{MODEL_NAME}'")
        finetune_id = recorded(campaign.finetune_dir)["run_id"]
        assert version.version == "1" and version.run_id == finetune_id
        registered = load_trained_model(f"models:/{MODEL_NAME}/1", tracking_uri=campaign.uri).net.state_dict()
    local = load_trained_model(RunDir(campaign.finetune_dir).best_model).net.state_dict()
    assert registered.keys() == local.keys()
    assert all(torch.equal(v, registered[k]) for k, v in local.items())


def test_requests_without_credentials_or_with_a_wrong_password_are_refused(campaign):
    url = campaign.uri + "/api/2.0/mlflow/experiments/search?max_results=5"
    alice = read_credentials_file(campaign.server.users["alice"])
    assert http_status(url) == 401
    assert http_status(url, "alice", alice.password + "x") == 401
    assert http_status(url, "mallory", alice.password) == 401
    assert http_status(url, "alice", alice.password) == 200


def test_bob_reads_alices_runs_but_cannot_write_to_them(campaign):
    finetune_id = recorded(campaign.finetune_dir)["run_id"]
    with as_user(campaign, "bob") as client:
        run = client.get_run(finetune_id)  # READ, the server's default permission
        assert run.info.status == "FINISHED" and client.get_metric_history(finetune_id, "val_accuracy")
        writes = {"metric": lambda: client.log_metric(finetune_id, "bob_was_here", 1.0),
                  "tag": lambda: client.set_tag(finetune_id, "bob", "yes"),
                  "run": lambda: client.create_run(run.info.experiment_id)}
        for what, write in writes.items():
            with pytest.raises(MlflowException) as refused:
                write()
            assert refused.value.error_code == "PERMISSION_DENIED", (what, refused.value)
    with as_user(campaign, "alice") as client:
        after = client.get_run(finetune_id)
        assert "bob_was_here" not in after.data.metrics and "bob" not in after.data.tags
        assert len(client.search_runs([run.info.experiment_id])) == 1
