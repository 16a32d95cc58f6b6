"""Tracking against a real `mlflow server` over HTTP (its own sqlite store, --serve-artifacts):
a fine-tuning run read back with the MLflow client; the server killed mid-run
and a stub answering 500 / 401: one warning, training goes on, the records are kept locally and
pushed afterwards (by the run's end when the server answers again, else `ranray track sync`);
the best model in the Model Registry, used by `ranray predict` and `ranray evaluate`.

A Tune search logging to a server is tests/test_cluster_tracking.py's (make test-cluster): four trials
on four nodes, every metric step and artifact checked, on the authenticated server.

One server serves the module (its start costs ~20 s on 2 cores); the kill test kills it and puts
a second one on the same store in its place (Served.server), which the later tests use.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from mlflow_reads import metric_history
from mlflow_server import MlflowServer, StubProxy
from PIL import Image
from train_fixtures import SPLITS, tiny_config

from ranray.cli import main
from ranray.config import TrackingConfig
from ranray.evaluation import evaluate
from ranray.inference import load_trained_model
from ranray.model_store import MODEL_ARTIFACT, log_best_model
from ranray.tracking import (HTTP_ENV_DEFAULTS, Tracker, find_runs, list_artifacts, read_local_log,
                             synced_log_path)
from ranray.train.launch import run_training

EPOCHS = 2
STEPS_PER_EPOCH = SPLITS["train"] // (2 * 8)


@dataclass
class Served:
    server: MlflowServer  # the live one: the kill test replaces it


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    slot = Served(MlflowServer.start(tmp_path_factory.mktemp("mlflow_server")))
    yield slot
    slot.server.kill()


@pytest.fixture
def server(served) -> MlflowServer:
    return served.server


@pytest.fixture(autouse=True)
def _fast_http_failures(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key in HTTP_ENV_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    # A failing call costs one immediate retry instead of the defaults' seconds of backoff.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")


def tracker_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "ranray.tracking"]


# ---------------------------------------------------------------------------------------------
# A server that answers 500 or 401 mid-run (a stub in front of the real one)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["500", "401"])
def test_a_server_failing_mid_run_warns_once_and_the_records_are_pushed_at_the_end(server, tmp_path, caplog,
                                                                                     status):
    stub = StubProxy(server.url)
    png = tmp_path / "confusion.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    try:
        with caplog.at_level(logging.INFO, logger="ranray.tracking"):
            tracker = Tracker(TrackingConfig(uri=stub.url, experiment=f"stub-{status}"), tmp_path / "run")
            run_id = tracker.start("r", params={"optim.lr": 0.1})
            for step in range(5):
                tracker.log_metrics({"train_loss": 1.0 / (step + 1)}, step=step, wait=step % 2 == 0)
            tracker.flush()
            stub.mode = status  # the server breaks (or an auth proxy starts refusing)
            for step in range(5, 10):
                tracker.log_metrics({"train_loss": 1.0 / (step + 1)}, step=step, wait=step % 2 == 0)
            tracker.log_artifact(png, "plots")
            tracker.flush()
            assert tracker.offline and stub.refused >= 1
            local = read_local_log(tmp_path / "run")
            assert sorted(r["step"] for r in local if r["kind"] == "metrics") == list(range(5, 10))
            stub.mode = "pass"  # it answers again before the run ends: end() pushes what was kept
            tracker.end()
    finally:
        stub.close()
    assert len(tracker_warnings(caplog)) == 1, tracker_warnings(caplog)
    assert any("pushed" in r.getMessage() for r in caplog.records)
    (run,) = find_runs(server.url, f"stub-{status}")
    assert run["run_id"] == run_id and run["status"] == "FINISHED" and run["params"] == {"optim.lr": "0.1"}
    history = metric_history(server.url, run_id, "train_loss")
    assert history == [(s, pytest.approx(1.0 / (s + 1))) for s in range(10)]  # each once, in order
    assert list_artifacts(server.url, run_id) == ["plots/confusion.png"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert len(synced_log_path(tmp_path / "run").read_text().splitlines()) == len(local) + 1  # + status


def test_sync_of_a_run_started_while_the_server_was_away_creates_it(server, tmp_path, capsys):
    run_dir = tmp_path / "run"
    dead = TrackingConfig(uri="http://127.0.0.1:9", experiment="late")
    with Tracker(dead, run_dir) as tracker:
        local_id = tracker.start("offline-run", params={"batch_size": 8}, tags={"job": "train"})
        for step in range(3):
            tracker.log_metrics({"val_accuracy": 0.5 + step / 10}, step=step)
    assert local_id.startswith("local-")
    assert main(["track", "sync", str(run_dir), "--tracking-uri", server.url]) == 0
    assert "pushed 6 local records" in capsys.readouterr().out
    (run,) = find_runs(server.url, "late")
    assert run["run_name"] == "offline-run" and run["status"] == "FINISHED" and run["tags"]["job"] == "train"
    assert [v for _, v in metric_history(server.url, run["run_id"], "val_accuracy")] == pytest.approx([0.5, 0.6, 0.7])
    assert json.loads((run_dir / "tracking.json").read_text())["run_id"] == run["run_id"]
    assert main(["track", "sync", str(run_dir), "--tracking-uri", server.url]) == 0  # nothing twice
    assert "nothing kept locally" in capsys.readouterr().out
    assert len(metric_history(server.url, run["run_id"], "val_accuracy")) == 3


# ---------------------------------------------------------------------------------------------
# A fine-tuning run over HTTP, its server killed after epoch 1; the registry
# ---------------------------------------------------------------------------------------------


def run_with_the_server_killed_after_epoch_1(server: MlflowServer, data_dir: Path, storage: Path):
    """A 2-epoch run logging to the server; after epoch 1's report rank 0 pauses
    (server_hooks), the server is killed by pid, and training goes on without it."""
    import threading

    cfg = tiny_config(data_dir, storage, "over-http", f"tracking.uri={server.url}", f"epochs={EPOCHS}",
                      hooks=("server_hooks:PauseAfterFirstEpoch",))
    run_dir = storage / "over-http"
    seen: dict[str, list] = {}

    def kill_when_paused() -> None:
        while not (run_dir / "paused").exists():
            threading.Event().wait(0.1)
        run_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
        seen["val_accuracy"] = metric_history(server.url, run_id, "val_accuracy")
        server.kill()
        (run_dir / "go").write_text("")

    killer = threading.Thread(target=kill_when_paused, daemon=True)
    killer.start()
    result = run_training(cfg)
    killer.join(timeout=60)
    return result, cfg, seen


def test_finetune_run_over_http_survives_the_server_and_is_synced_afterwards(ray_session, served, server, data_dir,
                                                                            tmp_path, capsys):
    result, cfg, seen = run_with_the_server_killed_after_epoch_1(server, data_dir, tmp_path / "runs")
    run_dir = result.run_dir
    assert result.metrics["step"] == EPOCHS * STEPS_PER_EPOCH and result.metrics["epoch"] == EPOCHS
    assert [s for s, _ in seen["val_accuracy"]] == [STEPS_PER_EPOCH]  # epoch 1 reached the server over HTTP
    out = capsys.readouterr().out
    # Rank 0 warned once (its lines reach the driver's stdout through Ray) and kept epoch 2 locally.
    worker_warnings = [line for line in out.splitlines() if "WARNING ranray.tracking" in line]
    assert len(worker_warnings) == 1, worker_warnings
    local = read_local_log(run_dir)
    epochs_kept = [r["data"]["epoch"] for r in local if r["kind"] == "metrics" and "epoch" in r["data"]]
    assert epochs_kept == [EPOCHS] and {"artifact", "status"} <= {r["kind"] for r in local}

    again = served.server = MlflowServer.start(server.store)  # the same store, served again
    assert main(["track", "sync", str(run_dir), "--tracking-uri", again.url]) == 0
    assert "pushed" in capsys.readouterr().out
    (run,) = [r for r in find_runs(again.url, "ranray-test") if r["run_id"] == result.mlflow_run_id]
    assert run["status"] == "FINISHED"
    assert run["params"]["model.backbone"] == "iresnet_tiny" and run["params"]["epochs"] == str(EPOCHS)
    for key in ("val_accuracy", "epoch_train_loss", "best_val_accuracy"):
        steps = [s for s, _ in metric_history(again.url, run["run_id"], key)]
        assert steps[:EPOCHS] == [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)], key
    assert len(metric_history(again.url, run["run_id"], "train_loss")) == EPOCHS * STEPS_PER_EPOCH
    artifacts = set(list_artifacts(again.url, run["run_id"]))
    assert {"config.yaml", "plots/confusion_val.png", "plots/attention_faces.png", "model/best.pt",
            "model/best.yaml", "model/final.yaml"} <= artifacts, artifacts
    png = MlflowClient(again.url).download_artifacts(run["run_id"], "plots/attention_faces.png", str(tmp_path))
    assert Image.open(png).size[0] > 300

    registry_checks(result, cfg, again, tmp_path / "registry", capsys)


def registry_checks(result, cfg, server: MlflowServer, tmp: Path, capsys) -> None:
    """The best model logged as an MLflow model and registered; predict and evaluate from it."""
    import mlflow.pyfunc

    tracker = Tracker(TrackingConfig(uri=server.url, experiment="ranray-test"), result.run_dir)
    tracker.start(result.run_name, resume=True)
    version = log_best_model(tracker, result.best_model, cfg, name="ran-tiny")
    tracker.end()
    assert version == "1"
    client = MlflowClient(server.url, registry_uri=server.url)
    (mv,) = client.search_model_versions("name='ran-tiny'")
    assert mv.run_id == result.mlflow_run_id
    assert f"{MODEL_ARTIFACT}/MLmodel" in list_artifacts(server.url, result.mlflow_run_id)

    # One loader, whatever names the model: its file, its run directory, the registry.
    by_file, by_run, by_registry = (load_trained_model(m, tracking_uri=server.url).net.state_dict()
                                    for m in (result.best_model, result.run_dir, "models:/ran-tiny/1"))
    assert by_file.keys() == by_run.keys() == by_registry.keys()
    assert all(torch.equal(v, by_run[k]) and torch.equal(v, by_registry[k]) for k, v in by_file.items())

    # The pyfunc: aligned faces in, class, probabilities and region attention out.
    row = pq.read_table(sorted((Path(cfg.data.dir) / "test").glob("*.parquet"))[0]).slice(0, 2).to_pylist()
    faces = np.stack([np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in row])
    model = mlflow.pyfunc.load_model(str(result.run_dir / "model" / MODEL_ARTIFACT))
    out = model.predict(faces)
    assert len(out) == 2 and [a["region"] for a in out[0]["attention"]] == ["whole face", "top-left", "top-right"]
    assert sum(out[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
    assert out[0]["label"] == max(out[0]["probabilities"], key=out[0]["probabilities"].get)

    # `ranray predict --model models:/...` answers as the model file of the run does.
    tmp.mkdir(parents=True, exist_ok=True)
    capsys.readouterr()  # MLflow's "View run ... at" lines of the run's end
    face = tmp / "face.png"
    Image.fromarray(faces[0]).save(face)
    answers = []
    for model_arg in ("models:/ran-tiny/1", str(result.best_model)):
        assert main(["predict", "--model", model_arg, "--tracking-uri", server.url, "--detector", "given",
                     "--json", str(face)]) == 0
        answers.append(json.loads(capsys.readouterr().out))
    assert answers[0] == answers[1] and set(answers[0][0]["probabilities"]) == set(out[0]["probabilities"])

    assert main(["evaluate", "--model", "models:/ran-tiny/latest", "--tracking-uri", server.url,
                 "--data", cfg.data.dir, "--split", "test", "--out", str(tmp / "eval")]) == 0
    saved = json.loads((tmp / "eval" / "eval_test.json").read_text())
    offline = evaluate(result.best_model, cfg.data.dir, "test", out_dir=tmp / "eval_file")
    assert saved["metrics"]["test_accuracy"] == offline.accuracy
    assert saved["checkpoint"].startswith("models:/ran-tiny/latest")
    assert main(["predict", "--model", "models:/ran-tiny/7", "--tracking-uri", server.url, str(face)]) == 2
    assert "models:/ran-tiny/7" in capsys.readouterr().err


def test_an_mlflow_folder_that_is_not_a_ranray_model_is_refused_naming_the_uri(tmp_path):
    from ranray.model_registry import weights_in_model_folder

    with pytest.raises(ValueError, match="^models:/other/1 is not an MLflow model"):
        weights_in_model_folder(tmp_path, "models:/other/1")
    (tmp_path / "MLmodel").write_text(yaml.safe_dump(
        {"flavors": {"python_function": {"artifacts": {"config": {"path": "artifacts/c.yaml"}}}}}))
    with pytest.raises(ValueError, match="^models:/other/1 is not a ranray RAN model"):
        weights_in_model_folder(tmp_path, "models:/other/1")
