"""Checkpoints: atomic save, verified load, weights_only, RNG restore, Ray directories, export."""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ranray.train.checkpoint import (
    STATE_FILE, CheckpointError, capture_rng_state, export_model, load_checkpoint, manifest_path,
    restore_rng_state, save_checkpoint, verify_checkpoint,
)


def _state(step: int) -> dict:
    torch.manual_seed(step)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3, 5], gamma=0.1)
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
            "loader": {"epoch": 1, "batches": 7}, "step": step, "epoch": 1, "rng": capture_rng_state(),
            "config": {"model": {"backbone": "iresnet_tiny"}, "optim": {"milestones": [0.3, 0.5]}}}


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_round_trip_keeps_every_tensor_and_value(tmp_path: Path) -> None:
    state = _state(step=12)
    path = save_checkpoint(state, tmp_path / "step_000012.pt")
    manifest = json.loads(manifest_path(path).read_text())
    assert manifest["step"] == 12 and manifest["size"] == path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000012.pt", "step_000012.pt.meta.json"]
    _assert_same(state, load_checkpoint(path))


def test_restored_rng_state_replays_the_same_random_numbers(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.normal(), torch.randn(2)  # move off the seed; catch gauss caches too
    path = save_checkpoint({"rng": capture_rng_state()}, tmp_path / "rng.pt")
    first = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.normal(),
             torch.randn(4).tolist())
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng_state(load_checkpoint(path)["rng"])
    again = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.normal(),
             torch.randn(4).tolist())
    assert again == first


def test_a_truncated_checkpoint_is_refused_by_name(tmp_path: Path) -> None:
    for step in (20, 30):
        save_checkpoint(_state(step), tmp_path / f"ckpt_{step}.pt")
    latest = tmp_path / "ckpt_30.pt"
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])

    assert load_checkpoint(tmp_path / "ckpt_20.pt")["step"] == 20  # its neighbour is untouched
    with pytest.raises(CheckpointError, match="ckpt_30.pt.*truncated"):
        verify_checkpoint(latest)
    with pytest.raises(CheckpointError, match="ckpt_30.pt.*truncated"):
        load_checkpoint(latest)


def test_same_size_corruption_is_caught_by_the_digest(tmp_path: Path) -> None:
    path = save_checkpoint({"w": torch.zeros(256)}, tmp_path / "a.pt")
    data = bytearray(path.read_bytes())
    data[-200] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"a\.pt is corrupt: sha256"):
        load_checkpoint(path)


def test_a_state_file_without_manifest_was_never_committed(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "orphan.pt")
    with pytest.raises(CheckpointError, match="orphan.pt has no manifest"):
        load_checkpoint(tmp_path / "orphan.pt")


@pytest.mark.parametrize("bad, where", [
    (object(), r"state\['extra'\] is a builtins.object"),
    (np.float64(0.5), r"state\['extra'\] is a numpy.float64.*torch.from_numpy"),
    ({"rng": np.zeros(3)}, r"state\['extra'\]\['rng'\] is a numpy.ndarray"),
])
def test_objects_weights_only_would_refuse_are_refused_at_save(tmp_path: Path, bad, where) -> None:
    with pytest.raises(CheckpointError, match=where):
        save_checkpoint({"w": torch.ones(1), "extra": bad}, tmp_path / "bad.pt")
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_a_pickled_object_smuggled_past_save_is_refused_at_load(tmp_path: Path) -> None:
    path = save_checkpoint({"w": torch.ones(1)}, tmp_path / "x.pt")
    torch.save({"w": torch.ones(1), "obj": Path("/etc")}, path)  # replaced with a digest to match
    manifest = json.loads(manifest_path(path).read_text())
    manifest.update(sha256=hashlib.sha256(path.read_bytes()).hexdigest(), size=path.stat().st_size)
    manifest_path(path).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"x\.pt could not be loaded with weights_only=True"):
        load_checkpoint(path)


def test_ray_checkpoint_directories_share_the_format(tmp_path: Path) -> None:
    """As the trainers report them: DIR/state.pt + manifest, persisted by Ray, loaded by directory."""
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint({"step": 15, "w": torch.full((2,), 15.0)}, Path(tmp) / STATE_FILE)
        # What Ray Train does with a reported checkpoint: persist the directory under storage.
        Checkpoint.from_directory(tmp).to_directory(str(tmp_path / "checkpoint_000015"))
    persisted = tmp_path / "checkpoint_000015"
    assert verify_checkpoint(persisted)["step"] == 15
    state = load_checkpoint(persisted)
    assert state["step"] == 15 and torch.equal(state["w"], torch.full((2,), 15.0))


def test_export_model_strips_wrappers_and_writes_its_config(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    wrapped = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    model_path, config_path = export_model(wrapped, {"model": {"backbone": "iresnet_tiny"}},
                                           tmp_path / "final" / "model.pt")
    fresh = torch.nn.Linear(3, 2)
    fresh.load_state_dict(torch.load(model_path, weights_only=True))
    assert torch.equal(fresh.weight, model.weight)
    assert yaml.safe_load(config_path.read_text()) == {"model": {"backbone": "iresnet_tiny"}}
    assert config_path.name == "model.yaml"
