"""Elastic training without Ray workers: the worker range, the global-batch rule, the schedule position
and the loader's re-planned epoch (the runs on a real Ray are in test_pretrain / test_finetune_elastic)."""

from __future__ import annotations

import shutil

import pytest
import yaml

from ranray.config import ConfigError, PretrainConfig, TrainConfig, load_config, save_config
from ranray.train.ray_train import build_trainer


@pytest.mark.parametrize("given, fixed, low, high", [
    ("scaling.num_workers=4", 4, 4, 4),
    ("scaling.num_workers=2-8", None, 2, 8),
    ("scaling.num_workers=[2, 8]", None, 2, 8),
    ("scaling.num_workers=3-3", 3, 3, 3),
])
def test_num_workers_is_a_count_or_a_range(given, fixed, low, high, tmp_path):
    cfg = load_config(TrainConfig, None, [given])
    s = cfg.scaling
    assert (s.min_workers, s.max_workers, s.elastic) == (low, high, fixed is None)
    assert s.ray_num_workers() == (fixed if fixed is not None else (low, high))
    again = load_config(TrainConfig, save_config(cfg, tmp_path / "c.yaml"))  # YAML [2, 8] round trip
    assert again.scaling.num_workers == s.num_workers


def test_yaml_range_and_pretraining_take_it_too(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"scaling": {"num_workers": [2, 8]}}))
    assert load_config(PretrainConfig, path).scaling.ray_num_workers() == (2, 8)


@pytest.mark.parametrize("bad, why", [
    ("8-2", r"range \[8, 2\] needs 1 <= min <= max"),
    ("0", "must be >= 1, got 0"),
    ("two", "must be a worker count or a range MIN-MAX, got 'two'"),
    ("[1, 2, 3]", r"as a range must be \[min, max\] of two ints"),
    ("1.5", "must be a worker count or a range MIN-MAX, got .1.5."),
])
def test_a_bad_range_is_refused_by_key(bad, why):
    with pytest.raises(ConfigError, match=f"config key 'scaling.num_workers' {why}"):
        load_config(TrainConfig, None, [f"scaling.num_workers={bad}"])


def test_the_trainer_asks_ray_for_the_range(tmp_path):
    cfg = load_config(TrainConfig, None, ["scaling.num_workers=2-3", f"run.storage_path={tmp_path}", "run.name=t"])
    scaling = build_trainer(cfg).scaling_config
    assert scaling.num_workers == (2, 3) and scaling.elasticity_enabled
    assert (scaling.min_workers, scaling.max_workers) == (2, 3)


# ---------------------------------------------------------------------------------------------
# Fine-tuning stopped mid-epoch on 2 Ray workers, resumed on 1 (the local runtime) and on 3 (Ray)
# ---------------------------------------------------------------------------------------------

TRAIN_ROWS = 96  # train_fixtures.SPLITS["train"]: 6 steps of 2 x 8 per epoch on 2 workers
RUNTIMES = {1: "local", 3: "ray"}  # one worker: the local runtime, which resumes a Ray run's checkpoints too


@pytest.fixture(scope="module")
def resumed_runs(ray_session, data_dir, tmp_path_factory) -> dict[int, object]:
    """Rank 0 fails after step 3 (max_failures 0): the step-2 checkpoint, 32 of the epoch's 96 rows
    used, is resumed from a copy of the run on 1 worker (the local runtime) and on 3 (Ray)."""
    from train_fixtures import tiny_config

    from ranray.failures import RunFailed
    from ranray.train.launch import run_training

    tmp = tmp_path_factory.mktemp("elastic_ft")
    hooks = ("step_hooks:KeysLog", "step_hooks:fail_at_step_3")
    with pytest.raises(RunFailed):
        run_training(tiny_config(data_dir, tmp / "first", "ft", "checkpoint.max_failures=0", hooks=hooks))
    results = {}
    for workers, runtime in RUNTIMES.items():
        storage = tmp / f"on{workers}"
        shutil.copytree(tmp / "first", storage)
        results[workers] = run_training(tiny_config(data_dir, storage, "ft", "checkpoint.max_failures=0",
                                                    f"scaling.num_workers={workers}", hooks=hooks), runtime=runtime)
    return results


@pytest.mark.parametrize("workers", [1, 3])
def test_every_sample_of_the_interrupted_epoch_is_used_once_over_both_world_sizes(resumed_runs, workers):
    from step_hooks import committed_batches

    result = resumed_runs[workers]
    batches = committed_batches(result.run_dir)
    expected = sorted(f"train/{i:05d}.png" for i in range(TRAIN_ROWS))
    for epoch in (0, 1):
        keys = sorted(k for _, e, ks in batches if e == epoch for k in ks)
        assert keys == expected, f"epoch {epoch}: each of the {TRAIN_ROWS} rows once"
    steps = sorted({s for s, _, _ in batches})
    rest = {1: 8, 3: 3}[workers]  # 64 rows left: 8 batches of 8 on 1 worker; 3 of 7-8 rows on each of 3
    whole = TRAIN_ROWS // (workers * 8)
    assert steps == list(range(1, 2 + rest + whole + 1)) and result.metrics["epoch"] == 2


@pytest.mark.parametrize("workers", [1, 3])
def test_the_lr_schedule_goes_on_from_the_epoch_position(resumed_runs, workers):
    from ranray.config import OptimConfig
    from mlflow_reads import metric_history
    from ranray.train.optim import lr_factor

    result = resumed_runs[workers]
    lrs = dict(metric_history(result.tracking_uri, result.mlflow_run_id, "lr"))
    per_epoch = TRAIN_ROWS // (workers * 8)
    position = round(32 / TRAIN_ROWS * per_epoch)  # a third of epoch 0, in steps of this world size
    o = OptimConfig(name="sgd", lr=0.05, schedule="cosine", weight_decay=0.0)
    # the first step after the resume (step 3) ran at schedule step `position`; the LR logged after it is the next
    assert lrs[3] == pytest.approx(0.05 * lr_factor(position + 1, steps_per_epoch=per_epoch, epochs=2, o=o))
    workers_logged = dict(metric_history(result.tracking_uri, result.mlflow_run_id, "workers"))
    assert workers_logged[2] == workers


def test_a_run_dir_whose_checkpoint_cannot_be_resumed_is_refused_before_ray(tmp_path):
    """The newest committed checkpoint's manifest names what it was trained with; the driver compares."""
    import json

    from ranray.train.checkpoint import STATE_FILE, save_checkpoint
    from ranray.train.commits import SNAPSHOT
    from ranray.train.elastic import resume_summary
    from ranray.train.pretrain import PretrainPlan

    cfg = load_config(PretrainConfig, None, [f"run.storage_path={tmp_path}", "run.name=pt", "backbone=iresnet_tiny",
                                              "partial_fc.embedding_size=64"])
    run_dir = tmp_path / "pt"
    save_checkpoint({"step": 4, "summary": resume_summary(cfg, 3, {"num_classes": 24})},
                    run_dir / "checkpoint_00000004_g00" / STATE_FILE)
    (run_dir / SNAPSHOT).write_text(json.dumps({"checkpoint_results": [
        {"checkpoint_dir_name": "checkpoint_00000004_g00", "metrics": {"step": 4}}]}))
    build_trainer(cfg, plan=PretrainPlan(24, ""))  # the same classes: any worker count resumes
    with pytest.raises(ConfigError, match=r"config key 'num_classes' is 30 but checkpoint .*checkpoint_00000004_g00 "
                                          r"was trained with 24"):
        build_trainer(cfg, plan=PretrainPlan(30, ""))
    other = load_config(PretrainConfig, None, [f"run.storage_path={tmp_path}", "run.name=pt", "optim.name=adamw",
                                                "backbone=iresnet_tiny", "partial_fc.embedding_size=64"])
    with pytest.raises(ConfigError, match="config key 'optim.name' is 'adamw' but .* was trained with 'sgd'"):
        build_trainer(other, plan=PretrainPlan(24, ""))
