"""The team's tracking server with authentication (`ranray track server`, as the cluster runs it):
users and permissions, a job refused before training for a wrong or missing password, the local
journal and `ranray track sync` with credentials, backups restored by a server on a new disk, and
SQLite stores on network mounts refused (mount tables injected).

One server serves the module (its start costs ~15 s on 2 cores); the backup test stops it and
starts another on the restored databases, which the tests after it use.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from auth_server import AuthServer, http_status
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow_reads import metric_history
from mlflow_server import StubProxy
from train_fixtures import tiny_config

from ranray.cli import main
from ranray.config import ConfigError, TrackingConfig, TrackingServerConfig, load_config, save_config
from ranray.tracking import Tracker, find_runs, read_local_log
from ranray.tracking_access import (CREDENTIALS_ENV, PASSWORD_ENV, USERNAME_ENV, check_store, credentials_for,
                                    read_credentials_file, write_credentials_file)
from ranray.tracking_server import check as check_server

NFS_TABLE = ("/dev/vda1 / ext4 rw,relatime 0 0\n"
             "fs-0123.efs.us-west-2.amazonaws.com:/ /mnt/shared nfs4 rw,nfsvers=4.1 0 0\n"
             "//files/team /mnt/team\\040share cifs rw 0 0\n")


@dataclass
class Served:
    server: AuthServer  # the live one: the backup test replaces it


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    server = AuthServer.start(tmp_path_factory.mktemp("auth_server"))
    try:
        with ThreadPoolExecutor(2) as pool:  # two `ranray track user add` processes at once
            list(pool.map(server.add_user, ("alice", "bob")))
    except Exception:
        server.kill()
        raise
    slot = Served(server)
    yield slot
    slot.server.kill()


@pytest.fixture
def server(served) -> AuthServer:
    return served.server


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch, tmp_path):
    """Each test says whose credentials it uses; what a test's code puts in the environment is undone."""
    for key in (USERNAME_ENV, PASSWORD_ENV, CREDENTIALS_ENV, "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.mlflow/credentials of the machine's user
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")


def as_user(monkeypatch, server: AuthServer, user: str) -> MlflowClient:
    creds = read_credentials_file(server.users[user])
    monkeypatch.setenv(USERNAME_ENV, creds.username)
    monkeypatch.setenv(PASSWORD_ENV, creds.password)
    return MlflowClient(tracking_uri=server.url)


# ---------------------------------------------------------------------------------------------
# Authentication and permissions
# ---------------------------------------------------------------------------------------------


def test_requests_without_or_with_wrong_credentials_get_401(server):
    search = server.url + "/api/2.0/mlflow/experiments/search?max_results=1"
    alice = read_credentials_file(server.users["alice"])
    assert http_status(search) == 401
    assert http_status(search, "alice", alice.password + "x") == 401
    assert http_status(search, "mallory", alice.password) == 401
    assert http_status(search, "alice", alice.password) == 200
    assert http_status(server.url + "/health") == 200  # liveness stays open for probes


def test_a_user_without_edit_permission_reads_but_cannot_write(server, monkeypatch):
    alice = as_user(monkeypatch, server, "alice")
    experiment_id = alice.create_experiment("alice-own")
    run_id = alice.create_run(experiment_id).info.run_id
    alice.log_metric(run_id, "val_accuracy", 0.5, step=1)

    bob = as_user(monkeypatch, server, "bob")
    assert bob.get_run(run_id).data.metrics == {"val_accuracy": 0.5}  # default_permission READ
    with pytest.raises(MlflowException, match="403"):
        bob.log_metric(run_id, "val_accuracy", 0.9, step=2)
    with pytest.raises(MlflowException, match="403"):
        bob.create_run(experiment_id)
    server.grant("bob", "alice-own", "EDIT")
    bob.log_metric(run_id, "val_accuracy", 0.9, step=2)
    assert [v for _, v in metric_history(server.url, run_id, "val_accuracy")] == [0.5, 0.9]

    alice = as_user(monkeypatch, server, "alice")
    alice.create_registered_model("alice-model")
    source = alice.get_run(run_id).info.artifact_uri + "/model"
    assert alice.create_model_version("alice-model", source, run_id=run_id).version == "1"
    bob = as_user(monkeypatch, server, "bob")
    with pytest.raises(MlflowException, match="403"):
        bob.create_model_version("alice-model", source, run_id=run_id)
    server.grant("bob", "alice-model", "EDIT", "--model")
    assert bob.create_model_version("alice-model", source, run_id=run_id).version == "2"


# ---------------------------------------------------------------------------------------------
# A job with a wrong or no password: refused before training, in one line
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["wrong-password", "none"])
def test_a_job_refused_by_the_server_fails_before_training_in_one_line(server, data_dir, tmp_path, capsys, who):
    credentials = ""
    if who == "wrong-password":
        alice = read_credentials_file(server.users["alice"])
        credentials = str(write_credentials_file(tmp_path / "wrong.ini", "alice", alice.password + "x"))
    cfg = tiny_config(data_dir, tmp_path / "runs", "refused", "scaling.num_workers=1",
                      f"tracking.uri={server.url}", f"tracking.credentials_file={credentials}")
    assert main(["train", "--local", "--config", str(save_config(cfg, tmp_path / "job.yaml"))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"ranray train: tracking server {server.url} ") and "authentication" in err
    assert ("user 'alice'" in err and "wrong.ini" in err) if who == "wrong-password" else "no credentials" in err
    assert not (tmp_path / "runs" / "refused").exists()  # nothing started: no run dir, no checkpoint


def test_credentials_come_from_the_config_then_the_environment_then_the_nodes_file(tmp_path, monkeypatch):
    node_file = write_credentials_file(tmp_path / "node.ini", "node-user", "p" * 16)
    job_file = write_credentials_file(tmp_path / "job.ini", "job-user", "q" * 16)
    assert oct(job_file.stat().st_mode & 0o777) == "0o600"
    assert credentials_for(TrackingConfig().credentials_file) is None
    monkeypatch.setenv(CREDENTIALS_ENV, str(node_file))
    assert credentials_for().username == "node-user"
    monkeypatch.setenv(USERNAME_ENV, "env-user")
    monkeypatch.setenv(PASSWORD_ENV, "r" * 16)
    assert credentials_for().username == "env-user"
    assert credentials_for(str(job_file)).username == "job-user"
    with pytest.raises(ConfigError, match="'tracking.credentials_file'.*missing.ini does not exist"):
        credentials_for(str(tmp_path / "missing.ini"))
    (tmp_path / "bad.ini").write_text("[mlflow]\nmlflow_tracking_username = x\n")
    with pytest.raises(ConfigError, match="needs \\[mlflow\\] with mlflow_tracking_username and"):
        credentials_for(str(tmp_path / "bad.ini"))
    monkeypatch.delenv(USERNAME_ENV)
    monkeypatch.setenv(CREDENTIALS_ENV, str(tmp_path / "not-made-yet.ini"))
    with pytest.raises(ConfigError, match="^\\$RANRAY_MLFLOW_CREDENTIALS \\(set on this node\\): .*not-made-yet.ini does not"):
        credentials_for()


# ---------------------------------------------------------------------------------------------
# The local journal and `ranray track sync`, with credentials
# ---------------------------------------------------------------------------------------------


def test_a_401_mid_run_journals_and_sync_pushes_as_the_runs_user(server, tmp_path, capsys, caplog, monkeypatch):
    stub = StubProxy(server.url)  # an auth layer that starts refusing mid-run (a password rotated)
    run_dir = tmp_path / "run"
    config = TrackingConfig(uri=stub.url, experiment="alice-sync", credentials_file=str(server.users["alice"]))
    try:
        with caplog.at_level(logging.INFO, logger="ranray.tracking"):
            tracker = Tracker(config, run_dir)
            run_id = tracker.start("r", params={"optim.lr": 0.1})
            for step in range(4):
                tracker.log_metrics({"train_loss": 1.0 / (step + 1)}, step=step)
            stub.mode = "401"
            for step in range(4, 8):
                tracker.log_metrics({"train_loss": 1.0 / (step + 1)}, step=step)
            tracker.end()  # still refused: the records stay local
    finally:
        stub.close()
    assert json.loads((run_dir / "tracking.json").read_text())["user"] == "alice"
    kept = read_local_log(run_dir)
    assert sorted(r["step"] for r in kept if r["kind"] == "metrics") == [4, 5, 6, 7]

    for key in (USERNAME_ENV, PASSWORD_ENV):  # a new shell, with no credentials
        monkeypatch.delenv(key, raising=False)
    assert main(["track", "sync", str(run_dir), "--tracking-uri", server.url]) == 1
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"ranray track sync: tracking server {server.url} requires authentication")
    assert "nothing was pushed" in line and len(line.splitlines()) == 1
    assert read_local_log(run_dir) == kept  # nothing lost locally

    assert main(["track", "sync", str(run_dir), "--tracking-uri", server.url,
                 "--credentials", str(server.users["alice"])]) == 0
    assert f"pushed {len(kept)} local records" in capsys.readouterr().out
    assert [s for s, _ in metric_history(server.url, run_id, "train_loss")] == list(range(8))
    (run,) = find_runs(server.url, "alice-sync")
    assert run["run_id"] == run_id and run["status"] == "FINISHED"


def test_sync_as_a_user_who_may_not_write_is_refused_and_keeps_the_records(server, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    alice = TrackingConfig(uri=server.url, experiment="alice-only", credentials_file=str(server.users["alice"]))
    with Tracker(alice, run_dir) as tracker:
        tracker.start("r")
    dead = TrackingConfig(uri="http://127.0.0.1:9", experiment="alice-only")
    with Tracker(dead, run_dir) as tracker:  # the same run, resumed while the server was away
        tracker.start("r", run_id=json.loads((run_dir / "tracking.json").read_text())["run_id"])
        tracker.log_metrics({"val_accuracy": 0.7}, step=1)
    kept = read_local_log(run_dir)
    assert main(["track", "sync", str(run_dir), "--tracking-uri", server.url,
                 "--credentials", str(server.users["bob"])]) == 1
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == (f"ranray track sync: tracking server {server.url} refused user 'bob' permission to write (403); "
                    f"sync as the run's user ('alice'); the records stay in {run_dir / 'metrics.jsonl'}")
    assert read_local_log(run_dir) == kept


# ---------------------------------------------------------------------------------------------
# Backups: a server on a new disk restores the databases (users included)
# ---------------------------------------------------------------------------------------------


def test_a_stopped_server_backs_up_and_a_new_disk_is_restored_from_it(served, tmp_path, monkeypatch):
    old = served.server
    alice = as_user(monkeypatch, old, "alice")
    experiment_id = alice.create_experiment("before-the-move")
    run_id = alice.create_run(experiment_id).info.run_id
    alice.log_metric(run_id, "val_accuracy", 0.8)
    assert old.stop() == 0  # SIGTERM, as `ray down` sends it: one last backup
    backup = old.root / "backup"
    assert json.loads((backup / "backup.json").read_text())["bytes"].keys() == {"mlflow.db", "auth.db"}
    assert oct((backup / "auth.db").stat().st_mode & 0o777) == "0o600"  # it holds password hashes
    with sqlite3.connect(backup / "auth.db") as db:
        assert {u for (u,) in db.execute("select username from users")} == {"admin", "alice", "bob"}

    for name in ("mlflow.db", "auth.db"):  # a new head: its own disk is empty
        (old.root / "db" / name).unlink()
    new = AuthServer.start(old.root, port=None)
    new.users.update(old.users)
    served.server = new
    alice = as_user(monkeypatch, new, "alice")
    assert alice.get_run(run_id).data.metrics == {"val_accuracy": 0.8}
    assert "restored mlflow.db, auth.db" in new.log.read_text()


# ---------------------------------------------------------------------------------------------
# SQLite on a network mount: refused, the file system named (injected mount tables)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, fstype", [("/mnt/shared/ranray/runs/tune/summary", "nfs4"),
                                          ("/mnt/team share/runs/r1", "cifs")])
def test_a_sqlite_store_on_a_network_mount_is_refused_before_the_job(path, fstype):
    with pytest.raises(ConfigError) as err:
        check_store(TrackingConfig(), path, mount_table=NFS_TABLE)  # the default store: in the run dir
    message = str(err.value)
    assert message.startswith(f"config key 'tracking.uri': sqlite:///{path}/mlflow.db is a SQLite database on a "
                              f"network file system ({fstype} at ")
    assert "tracking server" in message and "http://HEAD:5000" in message
    uri = f"sqlite:///{path}/other.db"
    with pytest.raises(ConfigError, match=fstype):
        check_store(TrackingConfig(uri=uri), "/tmp/anywhere", mount_table=NFS_TABLE)


def test_sqlite_on_local_disk_and_servers_pass_the_mount_check(tmp_path):
    assert check_store(TrackingConfig(), "/home/me/runs/r1", mount_table=NFS_TABLE) == \
        "sqlite:////home/me/runs/r1/mlflow.db"
    assert check_store(TrackingConfig(), "/mnt/sharedx/r1", mount_table=NFS_TABLE).startswith("sqlite:///")
    assert check_store(TrackingConfig(uri="http://127.0.0.1:9"), "/mnt/shared/r1", mount_table=NFS_TABLE) == \
        "http://127.0.0.1:9"  # a server that does not answer: the tracker's warning, as before
    assert check_store(TrackingConfig(), tmp_path / "r1").startswith("sqlite:///")  # this machine's real table


def test_the_server_refuses_its_database_on_a_network_mount_and_a_missing_admin_secret(tmp_path):
    secret = tmp_path / "admin"
    secret.write_text("s" * 20)
    on_nfs = load_config(TrackingServerConfig, None, ["db_dir=/mnt/shared/ranray/mlflow-db",
                                                      f"admin_password_file={secret}"])
    with pytest.raises(ConfigError, match="config key 'db_dir': db_dir /mnt/shared/ranray/mlflow-db is a SQLite "
                                          "database on a network file system \\(nfs4"):
        check_server(on_nfs, mount_table=NFS_TABLE)
    postgres = load_config(TrackingServerConfig, None, ["db_dir=/mnt/shared/x", f"admin_password_file={secret}",
                                                        "backend_uri=postgresql://mlflow@db:5432/mlflow"])
    assert check_server(postgres, mount_table=NFS_TABLE) == "s" * 20  # no SQLite file: nothing to refuse
    missing = load_config(TrackingServerConfig, None, [f"db_dir={tmp_path}", f"admin_password_file={tmp_path / 'no'}"])
    with pytest.raises(ConfigError, match="config key 'admin_password_file': .*no does not exist"):
        check_server(missing)
    secret.write_text("short")
    with pytest.raises(ConfigError, match="shorter than 12 characters"):
        check_server(load_config(TrackingServerConfig, None, [f"db_dir={tmp_path}", f"admin_password_file={secret}"]))


# ---------------------------------------------------------------------------------------------
# `ranray submit`: the server's URI in the job's runtime_env, the password never
# ---------------------------------------------------------------------------------------------


def submitted(capsys) -> tuple[dict, list[str]]:
    import shlex

    words = shlex.split(capsys.readouterr().out.strip().splitlines()[0][2:])
    return json.loads(words[words.index("--runtime-env-json") + 1]), words[words.index("--") + 1:]


def test_submit_gives_the_job_the_servers_uri_and_a_credentials_file_path(capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert main(["submit", "tune_asha", "--dry-run", "--tracking-uri", "http://10.0.0.5:5000",
                 "--tracking-credentials", "/etc/ranray/mlflow/credentials"]) == 0
    runtime_env, entry = submitted(capsys)
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://10.0.0.5:5000"
    assert not any("PASSWORD" in k or "USERNAME" in k for k in runtime_env["env_vars"])
    assert entry[-1] == "tracking.credentials_file=/etc/ranray/mlflow/credentials"
    monkeypatch.setenv("RANRAY_TRACKING_URI", "http://head:5000")  # the default for --tracking-uri
    assert main(["submit", "ferplus_ran_r50", "--dry-run"]) == 0
    assert submitted(capsys)[0]["env_vars"]["MLFLOW_TRACKING_URI"] == "http://head:5000"


@pytest.mark.parametrize("argv, message", [
    (["--tracking-uri", "sqlite:////mnt/shared/mlflow.db"], "--tracking-uri must be the tracking server's http(s)"),
    (["--tracking-credentials", "creds.ini"], "--tracking-credentials must be an absolute path on the cluster"),
])
def test_submit_refuses_a_sqlite_uri_and_a_relative_credentials_path(capsys, monkeypatch, argv, message):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert main(["submit", "ferplus_ran_r50", "--dry-run", *argv]) == 2
    assert message in capsys.readouterr().err


def test_submit_refuses_a_password_in_the_runtime_env(tmp_path, capsys):
    jobs = tmp_path / "jobs"
    (jobs / "cluster").mkdir(parents=True)
    (jobs / "leaky.yaml").write_text("epochs: 1\n")
    (jobs / "cluster" / "leaky.yaml").write_text(
        "verb: train\nruntime_env:\n  env_vars:\n    MLFLOW_TRACKING_PASSWORD: hunter2hunter2\n")
    assert main(["submit", "leaky", "--dry-run", "--working-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "runtime_env sets MLFLOW_TRACKING_PASSWORD, which the Ray dashboard shows" in err
    assert "hunter2" not in err
