"""`ranray tune`: an ASHA search on a real local Ray with a tiny model and data, MLflow parent and
child runs, an interrupted search resumed, and config errors refused before Ray starts."""

from __future__ import annotations

import csv
import dataclasses
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import ImageDraw
from ray import tune
from shard_fixtures import draw_face, write_dataset

from ranray.config import ConfigError, SearchSpaceConfig, TrainConfig, TuneConfig, load_config
from ranray.tracking import HTTP_ENV_DEFAULTS, find_runs, list_artifacts
from ranray.tune import (FAILED, FINISHED, KNOBS, STOPPED_EARLY, apply_params, max_concurrent, param_space,
                         plan_search, run_search, train_scaling, trial_config, trial_run_dir, trial_status)

NUM_CLASSES = 4
# The class shows as the colour of a band across the forehead: one a far too small learning rate
# cannot learn in a few epochs and a reasonable one learns in one or two.
BAND_COLORS = [(230, 30, 30), (30, 230, 30), (30, 30, 230), (240, 240, 240)]
SPLITS = {"train": 32, "val": 16}


class BandedFaces:
    """A `draw` for write_dataset: rows come in the order write_dataset labels them (i % classes)."""

    def __init__(self, splits: dict[str, int], num_classes: int):
        self.labels = iter([i % num_classes for n in splits.values() for i in range(n)])

    def __call__(self, rng: np.random.Generator):
        img, landmarks = draw_face(rng)
        ImageDraw.Draw(img).rectangle([0, 0, 111, 24], fill=BAND_COLORS[next(self.labels)])
        return img, landmarks


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tune_data") / "banded"
    return write_dataset(root, SPLITS, num_classes=NUM_CLASSES, draw=BandedFaces(SPLITS, NUM_CLASSES))


@pytest.fixture(autouse=True)
def _own_mlflow_store(monkeypatch):
    for key in ("MLFLOW_TRACKING_URI", *HTTP_ENV_DEFAULTS):
        monkeypatch.delenv(key, raising=False)  # every search here gets the sqlite store in its summary dir


def write_base(tmp_path: Path, data_dir: Path) -> Path:
    base = {
        "data": {"dir": str(data_dir), "loader": "torch", "num_threads": 0, "augment": {"enabled": False}},
        "model": {"backbone": "iresnet_tiny", "num_classes": NUM_CLASSES, "num_regions": 2},
        "optim": {"lr": 0.05, "milestones": [0.9], "weight_decay": 0.0},
        "checkpoint": {"keep": 1},
        "epochs": 5, "batch_size": 8, "precision": "bf16",
        "run": {"hooks": ["step_hooks:StepsLog"]},  # steps/rank<r>.log: each start of a trial's workers
    }
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


class InterruptAfter(tune.Callback):
    """Interrupts the search like Ctrl+C after `n` trials end.

    SIGUSR1 is the signal Tune's own handler (installed when the Tuner runs in the main thread, as
    under pytest) treats like Ctrl+C: the experiment is snapshotted with the running trials
    unfinished, the state a real interruption leaves. Tune pickles this callback with the run
    config and restores its state on resume, so it fires once per search, not again after the resume.
    """

    def __init__(self, n: int):
        self.n = n
        self.completed = 0
        self.fired = False

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.completed += 1
        if self.completed >= self.n and not self.fired:
            self.fired = True
            signal.raise_signal(signal.SIGUSR1)

    def get_state(self) -> dict:
        return {"completed": self.completed, "fired": self.fired}

    def set_state(self, state: dict) -> None:
        self.completed, self.fired = state["completed"], state["fired"]


def write_tune(tmp_path: Path, base: Path, **overrides) -> Path:
    cfg = {"name": "search", "storage_path": str(tmp_path / "runs"), "base_config": str(base),
           "space": {"margin_min": 0.0, "margin_max": 0.3, "lr_min": 0.001, "lr_max": 0.3},
           "num_samples": 4, "grace_period": 1, "reduction_factor": 2, "max_epochs": 3,
           "workers_per_trial": 1, "cpus_per_worker": 1.0, "tracking": {"experiment": "tune-test"}}
    for key, value in overrides.items():
        section, _, leaf = key.partition("__")
        (cfg.setdefault(section, {}).__setitem__(leaf, value) if leaf else cfg.__setitem__(section, value))
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---------------------------------------------------------------------------------------------
# Before Ray: the space, the plan, the resources
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("space.margin_min=0.5", "config key 'space.margin_min' needs 0 <= margin_min <= margin_max"),
    ("space.lr_min=0", "config key 'space.lr_min' needs 0 < lr_min"),
    ("space.lr_max=0.0001", "config key 'space.lr_min' needs 0 < lr_min <= lr_max"),
    ("space.momentum_max=0.99", "unknown config key 'space.momentum_max'"),
    ("space.region_mode=[fixed,spiral]", "config key 'space.region_mode' value 'spiral' is invalid"),
    ("space.batch_size=[16,0]", "config key 'space.batch_size' has 0, below the minimum 1"),
    ("space.weight_decay=[-0.1]", "config key 'space.weight_decay' has -0.1, below the minimum 0.0"),
    ("max_epochs=0", "config key 'max_epochs' must be >= grace_period"),
    ("base_overrides=[model.backbone=resnet_nope]", "base_config .*model"),
    ("base_overrides=[protocol=ran]", "base_config .*'protocol' is 'ran'; a search selects on the val split"),
])
def test_bad_search_config_is_refused_naming_the_key(tmp_path, dataset, override, message):
    path = write_tune(tmp_path, write_base(tmp_path, dataset))
    with pytest.raises(ConfigError, match=message):
        plan_search(path, [override])
    assert not (tmp_path / "runs").exists()


def test_cli_refuses_a_bad_space_before_ray_starts(tmp_path, dataset):
    path = write_tune(tmp_path, write_base(tmp_path, dataset), space__lr_min=-1.0)
    out = subprocess.run([sys.executable, "-m", "ranray.cli", "tune", "--config", str(path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "ranray tune: config key 'space.lr_min' needs 0 < lr_min <= lr_max (got -1.0, 0.3)" in out.stderr
    assert "Ray" not in out.stdout + out.stderr  # no "Started a local Ray instance"
    assert not (tmp_path / "runs").exists()


def test_every_space_key_is_a_knob():
    bounds = {f.name.rsplit("_", 1)[0] if f.name.endswith(("_min", "_max")) else f.name
              for f in dataclasses.fields(SearchSpaceConfig)}
    assert bounds == set(KNOBS)
    for knob in KNOBS.values():  # each lands on a real TrainConfig key
        apply_params(TrainConfig(), {}, {knob.train_key: getattr_dotted(TrainConfig(), knob.train_key)})


def getattr_dotted(obj, key: str):
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def test_param_space_samples_ranges_and_choices_and_fixes_degenerate_ones():
    from ray import tune

    space = param_space(SearchSpaceConfig(margin_min=0.1, margin_max=0.1, lr_min=1e-4, lr_max=1e-1,
                                          region_mode=["fixed", "landmark"], batch_size=[32]))
    assert space["margin"] == 0.1 and space["batch_size"] == 32 and "weight_decay" not in space
    assert isinstance(space["lr"], tune.search.sample.Float)
    lrs = [space["lr"].sample() for _ in range(200)]
    assert 1e-4 <= min(lrs) and max(lrs) <= 1e-1
    assert np.mean(np.array(lrs) < 1e-2) > 0.5  # log-uniform: 2 of the 3 decades lie below 1e-2
    assert set(space["region_mode"].categories) == {"fixed", "landmark"}


def test_trial_config_carries_the_trial_values_name_and_resources(tmp_path, dataset):
    path = write_tune(tmp_path, write_base(tmp_path, dataset), workers_per_trial=2, cpus_per_worker=0.5)
    plan = plan_search(path, ["space.region_mode=[landmark]"])
    cfg = trial_config(plan, {"margin": np.float64(0.2), "lr": 0.01, "region_mode": "landmark"}, "abc_00001")
    assert (cfg.loss.rb_margin, cfg.optim.lr, cfg.model.region_mode) == (0.2, 0.01, "landmark")
    assert type(cfg.loss.rb_margin) is float
    assert cfg.run.name == "search-abc_00001" and cfg.epochs == plan.cfg.max_epochs
    assert cfg.run.storage_path == str(tmp_path.resolve() / "runs" / "search" / "train")
    assert (cfg.scaling.num_workers, cfg.scaling.cpus_per_worker, cfg.scaling.use_gpu) == (2, 0.5, False)
    assert cfg.tracking.uri == plan.tracking.uri and cfg.tracking.uri.endswith("search/summary/mlflow.db")
    assert Path(cfg.data.dir).is_absolute()


@pytest.mark.parametrize("workers, cpus, gpus, cluster, expected", [
    (1, 1.0, 0.0, {"CPU": 4.0}, 3),  # 4 x 1.01 CPUs would not fit: the 4th trial would wait
    (1, 1.0, 0.0, {"CPU": 4.04}, 4),
    (2, 1.0, 0.0, {"CPU": 4.0}, 1),
    (1, 2.0, 1.0, {"CPU": 16.0, "GPU": 2.0}, 2),
    (1, 0.5, 0.0, {"CPU": 64.0}, 5),  # never more than num_samples
    ("1-2", 1.0, 0.0, {"CPU": 4.0}, 1),  # an elastic trial is counted at its max
])
def test_max_concurrent_trials_follows_the_cluster(workers, cpus, gpus, cluster, expected):
    cfg = TuneConfig(num_samples=5, workers_per_trial=workers, cpus_per_worker=cpus, gpus_per_worker=gpus)
    assert max_concurrent(cfg, cluster) == expected


def test_elastic_trials_pass_their_worker_range_to_the_training_config():
    cfg = TuneConfig(workers_per_trial="2-4")
    assert cfg.workers_per_trial == [2, 4] and cfg.max_workers_per_trial == 4
    assert train_scaling(cfg, TrainConfig())["scaling.num_workers"] == [2, 4]
    with pytest.raises(ConfigError, match="'workers_per_trial'"):
        load_config(TuneConfig, None, ["workers_per_trial=4-2"])


def test_max_concurrent_trials_refuses_a_trial_the_cluster_cannot_hold_and_respects_a_given_cap():
    with pytest.raises(ConfigError, match="one trial needs"):
        max_concurrent(TuneConfig(workers_per_trial=2, gpus_per_worker=1.0), {"CPU": 8.0})
    assert max_concurrent(TuneConfig(max_concurrent_trials=2), {"CPU": 64.0}) == 2


def test_trial_status_from_tune_status_and_epochs():
    assert trial_status("TERMINATED", 3, 3) == FINISHED
    assert trial_status("TERMINATED", 1, 3) == STOPPED_EARLY
    assert trial_status("ERROR", 1, 3) == FAILED
    assert trial_status("RUNNING", 1, 3) == "interrupted"


def test_job_config_loads():
    cfg = load_config(TuneConfig, Path(__file__).parents[1] / "jobs" / "tune_asha.yaml")
    assert cfg.use_asha and cfg.metric == "val_accuracy" and cfg.mode == "max"
    assert cfg.space.lr_min < cfg.space.lr_max


# ---------------------------------------------------------------------------------------------
# Real searches (real local Ray, tiny model and data)
# ---------------------------------------------------------------------------------------------


def child_runs(result, experiment="tune-test"):
    runs = find_runs(result.tracking_uri, experiment)
    parent = next(r for r in runs if r["run_id"] == result.parent_run_id)
    return parent, [r for r in runs if r["parent_run_id"] == result.parent_run_id]


def test_asha_stops_bad_trials_and_keeps_the_best_among_the_good(ray_session, tmp_path, dataset):
    # lr spans 1e-6..0.1; seed 1 draws 0.057, 0.055, 1.3e-4 and 1.1e-4: the first two learn the bands
    # in an epoch, the last two do not. Two at a time, so the good ones set ASHA's first rung.
    path = write_tune(tmp_path, write_base(tmp_path, dataset), num_samples=4, seed=1, max_epochs=2,
                      space__lr_min=1e-6, space__lr_max=0.1, max_concurrent_trials=2)
    plan = plan_search(path)
    result = run_search(plan)

    rows = {r.trial_id: r for r in result.rows}
    assert len(rows) == 4 and not result.interrupted
    statuses = [r.status for r in rows.values()]
    assert STOPPED_EARLY in statuses, statuses
    assert all(r.epochs_run < 2 for r in rows.values() if r.status == STOPPED_EARLY)
    assert all(r.epochs_run == 2 for r in rows.values() if r.status == FINISHED)
    best = result.best
    assert best is not None and best.params["lr"] > 0.01, result.rows
    assert best.best_metric > 0.5
    assert Path(best.best_model).is_file() and Path(best.checkpoint).is_dir()

    with result.table_csv.open() as f:
        table = list(csv.DictReader(f))
    assert {r["trial_id"] for r in table} == set(rows)
    assert set(table[0]) >= {"margin", "lr", "best_val_accuracy", "epochs_run", "status", "checkpoint"}
    best_cfg = load_config(TrainConfig, result.best_config)
    assert best_cfg.optim.lr == pytest.approx(best.params["lr"])
    assert best_cfg.loss.rb_margin == pytest.approx(best.params["margin"])
    assert best_cfg.epochs == 5  # the base config's schedule, not the search's max_epochs
    assert result.plot.read_bytes()[:4] == b"\x89PNG"

    parent, children = child_runs(result)
    assert parent["status"] == "FINISHED" and parent["metrics"]["best_val_accuracy"] == pytest.approx(best.best_metric)
    assert {c["tags"]["trial_id"] for c in children} == set(rows)
    for child in children:
        row = rows[child["tags"]["trial_id"]]
        assert child["tags"]["trial_status"] == row.status
        assert child["status"] == {FINISHED: "FINISHED", STOPPED_EARLY: "KILLED"}[row.status]
        assert float(child["params"]["lr"]) == pytest.approx(row.params["lr"])
        assert "val_accuracy" in child["metrics"]
        if row.status == FINISHED:  # its driver logged the best model as an MLflow model
            assert "ran_model/MLmodel" in list_artifacts(result.tracking_uri, child["run_id"])
    assert {"trials.csv", "best_config.yaml", "accuracy_vs_params.png"} <= set(
        list_artifacts(result.tracking_uri, result.parent_run_id))


def result_lines(plan, trial_id: str) -> int:
    return len((plan.experiment_dir / f"trial_{trial_id}" / "result.json").read_text().splitlines())


def test_an_interrupted_search_resumes_and_keeps_its_finished_trials(ray_session, tmp_path, dataset):
    path = write_tune(tmp_path, write_base(tmp_path, dataset), num_samples=2, use_asha=False, max_epochs=1,
                      max_concurrent_trials=1)
    plan = plan_search(path)
    first = run_search(plan, callbacks=[InterruptAfter(1)])
    assert first.interrupted
    done = {r.trial_id: r for r in first.rows if r.status == FINISHED}
    assert len(done) == 1, first.rows
    lines = {tid: result_lines(plan, tid) for tid in done}
    parent, _ = child_runs(first)
    assert parent["status"] == "KILLED"

    second = run_search(plan_search(path))  # the same command again
    assert second.restored and not second.interrupted
    assert [r.status for r in second.rows] == [FINISHED] * 2
    assert second.parent_run_id == first.parent_run_id
    for tid, row in done.items():
        again = next(r for r in second.rows if r.trial_id == tid)
        assert (again.params, again.best_metric, again.epochs_run) == (row.params, row.best_metric, row.epochs_run)
        assert result_lines(plan, tid) == lines[tid]  # not run again
        steps = (trial_run_dir(plan, tid) / "steps" / "rank0.log").read_text()
        assert steps.count("start ") == 1
    parent, children = child_runs(second)
    assert parent["status"] == "FINISHED"
    assert sorted(c["tags"]["trial_status"] for c in children) == [FINISHED] * 2
    assert all(type(v) is float for v in second.best.params.values())  # plain Python, not numpy
