"""Elastic training without Ray workers: the worker range, the global-batch rule, the schedule position
and the loader's re-planned epoch (the runs on a real Ray are in test_pretrain / test_finetune_elastic)."""

from __future__ import annotations

import pytest
import yaml

from ranray.config import ConfigError, PretrainConfig, TrainConfig, load_config, save_config
from ranray.train.launch import build_trainer


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
    ("1.5", "must be an int or \\[min, max\\], got float 1.5"),
])
def test_a_bad_range_is_refused_by_key(bad, why):
    with pytest.raises(ConfigError, match=f"config key 'scaling.num_workers' {why}"):
        load_config(TrainConfig, None, [f"scaling.num_workers={bad}"])


def test_the_trainer_asks_ray_for_the_range(tmp_path):
    cfg = load_config(TrainConfig, None, ["scaling.num_workers=2-3", f"run.storage_path={tmp_path}", "run.name=t"])
    scaling = build_trainer(cfg).scaling_config
    assert scaling.num_workers == (2, 3) and scaling.elasticity_enabled
    assert (scaling.min_workers, scaling.max_workers) == (2, 3)
