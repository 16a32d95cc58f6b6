"""Tracking against a real MLflow sqlite store, and with a server that is not there."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from mlflow_reads import metric_history

from ranray.config import TrackingConfig, TrainConfig, flatten
from ranray.tracking import (HTTP_ENV_DEFAULTS, Tracker, find_runs, list_artifacts, read_local_log,
                             resolve_tracking_uri, seed_sqlite_store, ui_command)


@pytest.fixture(autouse=True)
def _no_ambient_uri(monkeypatch, tmp_path):
    for key in ("MLFLOW_TRACKING_URI", *HTTP_ENV_DEFAULTS):
        monkeypatch.delenv(key, raising=False)  # restored after the test, whatever the Tracker sets
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # anything MLflow writes relative to the working dir would show up here


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory) -> str:
    """One sqlite store for the tests that are not about the default location (migration costs ~1 s)."""
    return resolve_tracking_uri("", tmp_path_factory.mktemp("store"))


def test_embedded_store_holds_params_metrics_and_artifacts_under_the_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    params = flatten(TrainConfig())
    params.update({f"extra.p{i:03d}": i for i in range(120)})  # over MLflow's 100 per batch
    params["long"] = "x" * 7000  # over MLflow's 6000-character param limit
    params["odd*key"] = "kept"  # MLflow refuses '*' in a key; it must not cost the run
    png = tmp_path / "confusion.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 100)

    with Tracker(TrackingConfig(experiment="exp-a"), run_dir) as tracker:
        run_id = tracker.start("first", params=params, tags={"kind": "finetune"})
        for step in range(3):
            tracker.log_metrics({"train_loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
        tracker.log_artifact(png, artifact_path="plots")
        tracker.log_dict({"val_accuracy": 0.5}, "eval/result.json")

    uri = tracker.tracking_uri
    assert uri == f"sqlite:///{run_dir.resolve()}/mlflow.db" and (run_dir / "mlflow.db").is_file()
    (run,) = find_runs(uri, "exp-a")
    assert run["run_id"] == run_id and run["run_name"] == "first" and run["status"] == "FINISHED"
    assert run["params"]["optim.lr"] == "0.1" and run["params"]["extra.p119"] == "119"
    assert run["params"]["optim.milestones"] == "[0.3, 0.5, 0.8]"
    assert len(run["params"]["long"]) == 6000
    assert len(run["params"]) == len(params) and run["params"]["odd_key"] == "kept"
    assert run["tags"]["kind"] == "finetune"
    assert metric_history(uri, run_id, "train_loss") == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert sorted(list_artifacts(uri, run_id)) == ["eval/result.json", "plots/confusion.png"]
    stored = run_dir / "mlartifacts" / run["artifact_uri"].split("/mlartifacts/")[1] / "plots/confusion.png"
    assert stored.read_bytes() == png.read_bytes()
    assert list(Path.cwd().iterdir()) == []  # no ./mlruns
    assert not (run_dir / "metrics.jsonl").exists()
    assert "mlflow ui --backend-store-uri" in tracker.ui_command() and str(run_dir.resolve()) in ui_command(uri)


def schema(db: Path) -> tuple[dict, list, list]:
    """Columns per table, the indexes, the alembic version: MLflow's migrations write a table's
    constraints in an order that varies from one build to the next, so not the raw DDL."""
    with sqlite3.connect(db) as con:
        tables = [name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        columns = {t: sorted(con.execute(f'PRAGMA table_info("{t}")')) for t in tables}
        indexes = sorted(con.execute("SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'index'"))
        version = list(con.execute("SELECT version_num FROM alembic_version"))
    con.close()
    return columns, indexes, version


def test_a_new_store_is_a_copy_of_an_empty_one_equal_to_what_mlflow_builds(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    built = tmp_path / "built" / "mlflow.db"
    built.parent.mkdir()
    MlflowClient(f"sqlite:///{built}").search_experiments()  # MLflow's own migrations
    runs = []
    for name in ("first", "second"):  # the first builds the template, the second only copies it
        run_dir = tmp_path / name
        with Tracker(TrackingConfig(experiment="seeded"), run_dir) as tracker:
            runs.append(tracker.start(name))
            tracker.log_metrics({"loss": 0.5}, step=3)
        assert schema(run_dir / "mlflow.db") == schema(built)
        assert not list(run_dir.glob(".mlflow.db.*"))  # the copy's temp file is gone
        assert metric_history(resolve_tracking_uri("", run_dir), runs[-1], "loss") == [(3, 0.5)]
    template = tmp_path / "cache" / "ranray" / f"mlflow-{mlflow.__version__}-empty.db"
    assert schema(template) == schema(built)
    with sqlite3.connect(template) as con:
        assert con.execute("SELECT COUNT(*) FROM experiments").fetchone() == (0,)
    con.close()
    # The Default experiment each store made itself on first open, as MLflow makes it in a new one.
    default = MlflowClient(resolve_tracking_uri("", tmp_path / "second")).get_experiment("0")
    assert (default.name, default.artifact_location) == ("Default", MlflowClient(f"sqlite:///{built}")
                                                         .get_experiment("0").artifact_location)


def test_a_store_that_exists_is_left_alone_and_an_unusable_cache_leaves_mlflow_to_build_it(tmp_path: Path,
                                                                                          monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    kept = tmp_path / "kept.db"
    kept.write_bytes(b"not a database yet")
    seed_sqlite_store(f"sqlite:///{kept}")
    assert kept.read_bytes() == b"not a database yet"
    seed_sqlite_store("http://127.0.0.1:9")  # not a file: nothing to seed, nothing raised
    (tmp_path / "blocked").write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "blocked"))
    with Tracker(TrackingConfig(experiment="unseeded"), tmp_path / "run") as tracker:
        run_id = tracker.start("r")
        tracker.log_metrics({"loss": 1.5}, step=1)
    assert not tracker.offline and metric_history(resolve_tracking_uri("", tmp_path / "run"), run_id, "loss") == [(1, 1.5)]


def test_an_exception_marks_the_run_failed_and_propagates(tmp_path: Path, shared_store: str) -> None:
    cfg = TrackingConfig(uri=shared_store, experiment="exp-fail")
    with pytest.raises(RuntimeError, match="boom"):
        with Tracker(cfg, tmp_path) as tracker:
            tracker.start("doomed")
            tracker.log_metrics({"x": 1.0}, step=0)
            raise RuntimeError("boom")
    (run,) = find_runs(shared_store, "exp-fail")
    assert run["status"] == "FAILED" and run["metrics"] == {"x": 1.0}


def test_a_rerun_resumes_the_same_run(tmp_path: Path, shared_store: str) -> None:
    cfg = TrackingConfig(uri=shared_store, experiment="exp-resume")
    with pytest.raises(KeyboardInterrupt):
        with Tracker(cfg, tmp_path) as first:
            run_id = first.start("r", params={"a": 1, "b": 2})
            first.log_metrics({"loss": 2.0}, step=1)
            raise KeyboardInterrupt
    assert find_runs(shared_store, "exp-resume")[0]["status"] == "KILLED"

    with Tracker(cfg, tmp_path) as again:
        # b changed: MLflow refuses changing a param, so the first value stays and nothing raises.
        # Tags on a resumed run: the re-run of a job whose driver died passes them (a regression).
        assert again.start("r", params={"a": 1, "b": 3, "c": 4}, tags={"attempt": "2"}, resume=True) == run_id
        assert find_runs(shared_store, "exp-resume")[0]["status"] == "RUNNING"
        again.log_metrics({"loss": 1.0}, step=2)
    (run,) = find_runs(shared_store, "exp-resume")
    assert run["status"] == "FINISHED" and run["params"] == {"a": "1", "b": "2", "c": "4"}
    assert run["tags"]["attempt"] == "2"
    assert metric_history(shared_store, run_id, "loss") == [(1, 2.0), (2, 1.0)]


def test_step_metrics_logged_without_waiting_are_all_there_after_flush(tmp_path: Path, shared_store: str) -> None:
    cfg = TrackingConfig(uri=shared_store, experiment="exp-async")
    tracker = Tracker(cfg, tmp_path)
    run_id = tracker.start("async")
    for step in range(1, 201):  # past the queue bound, so the oldest batches are waited for on the way
        tracker.log_metrics({"train_loss": 1.0 / step}, step=step, wait=False)
    tracker.flush()
    assert [s for s, _ in metric_history(shared_store, run_id, "train_loss")] == list(range(1, 201))
    tracker.log_metrics({"late": 1.0}, step=201, wait=False)
    tracker.end()  # waits for what is still queued
    (run,) = [r for r in find_runs(shared_store, "exp-async") if r["run_id"] == run_id]
    assert run["status"] == "FINISHED" and run["metrics"]["late"] == 1.0
    assert not (tmp_path / "metrics.jsonl").exists()


def test_parent_and_child_runs_coexist_in_one_process(tmp_path: Path, shared_store: str) -> None:
    cfg = TrackingConfig(uri=shared_store, experiment="exp-tune")
    parent = Tracker(cfg, tmp_path / "tune")
    parent_id = parent.start("search")
    children = [Tracker(cfg, tmp_path / f"trial{i}") for i in range(2)]
    child_ids = [c.start(f"trial{i}", params={"lr": 0.1 * (i + 1)}, parent_run_id=parent_id)
                 for i, c in enumerate(children)]
    for i, child in enumerate(children):
        child.log_metrics({"val_accuracy": 0.5 + i / 10}, step=1)
        child.end()
    parent.log_metrics({"best_val_accuracy": 0.6})
    parent.end()
    runs = {r["run_id"]: r for r in find_runs(shared_store, "exp-tune")}
    assert runs[parent_id]["parent_run_id"] is None and runs[parent_id]["metrics"] == {"best_val_accuracy": 0.6}
    for i, cid in enumerate(child_ids):
        assert runs[cid]["parent_run_id"] == parent_id
        assert runs[cid]["metrics"]["val_accuracy"] == pytest.approx(0.5 + i / 10)
    assert len(find_runs(shared_store, "exp-tune", f"tags.`mlflow.parentRunId` = '{parent_id}'")) == 2


def test_unreachable_server_warns_once_and_keeps_records_locally(tmp_path: Path, caplog) -> None:
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="ranray.tracking"):
        with Tracker(TrackingConfig(uri="http://127.0.0.1:1", experiment="x"), tmp_path) as tracker:
            run_id = tracker.start("offline", params={"optim.lr": 0.1}, tags={"kind": "finetune"})
            for step in range(3):
                tracker.log_metrics({"train_loss": 1.0 + step}, step=step)
            tracker.log_artifact(tmp_path / "tracking.json")
    elapsed = time.monotonic() - t0
    assert elapsed < 10, elapsed
    assert tracker.offline and run_id.startswith("local-")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "127.0.0.1:1" in warnings[0].getMessage()
    records = read_local_log(tmp_path)
    assert [r["kind"] for r in records] == ["tags", "params", "metrics", "metrics", "metrics", "artifact", "status"]
    assert records[1]["data"] == {"optim.lr": "0.1"}
    assert [(r["step"], r["data"]["train_loss"]) for r in records if r["kind"] == "metrics"] == \
        [(0, 1.0), (1, 2.0), (2, 3.0)]
    assert records[-1]["data"] == {"status": "FINISHED"}
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]  # a bounded stall if a server dies mid-run


def test_ui_command_for_a_server_is_its_address() -> None:
    assert ui_command("http://mlflow.internal:5000") == "open http://mlflow.internal:5000 in a browser"


def test_calls_failing_mid_run_fall_back_to_the_local_log(tmp_path: Path, shared_store: str, caplog) -> None:
    from mlflow.tracking import MlflowClient

    tracker = Tracker(TrackingConfig(uri=shared_store, experiment="exp-broken"), tmp_path)
    run_id = tracker.start("r")
    tracker.log_metrics({"loss": 1.0}, step=0)
    MlflowClient(shared_store).delete_run(run_id)  # from now on the store refuses every write
    with caplog.at_level(logging.WARNING, logger="ranray.tracking"):
        for step in range(1, 4):
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        tracker.end("FINISHED")
    assert tracker.offline
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert [(r["kind"], r["step"]) for r in read_local_log(tmp_path)] == \
        [("metrics", 1), ("metrics", 2), ("metrics", 3), ("status", None)]
    assert metric_history(shared_store, run_id, "loss") == [(0, 1.0)]
