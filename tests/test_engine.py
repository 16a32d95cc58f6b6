"""The engine's loss window without Ray: the loss stays on the device until it is read, and a loss
that is not finite is refused naming the steps it came from."""

from __future__ import annotations

import math

import pytest
import torch

from ranray.config import ConfigError, TrainConfig
from ranray.train.engine import Engine, load_hooks, read_loss
from ranray.train.optim import PRECISIONS
from ranray.train.run_dir import RunDir


def engine(tmp_path) -> Engine:
    return Engine(cfg=TrainConfig(), task=None, rank=1, world_size=2, device=torch.device("cpu"), run_name="t",
                  run_dir=RunDir(tmp_path), precision=PRECISIONS["fp32"], channels_last=False, hooks=[])


def step(e: Engine, loss: float) -> None:
    e.state.step += 1
    e.window.add(torch.tensor(loss), images=8, seconds=0.5)


def test_the_window_sums_on_the_device_and_a_read_moves_it_to_the_running_sums(tmp_path):
    e = engine(tmp_path)
    for loss in (1.0, 2.0, 3.0):
        step(e, loss)
    assert e.sums.loss_steps == 0 and isinstance(e.window.loss, torch.Tensor)  # nothing read yet
    read_loss(e)
    assert (e.sums.loss_sum, e.sums.loss_steps, e.sums.images, e.sums.seconds) == (6.0, 3, 24, 1.5)
    assert e.since_log == e.sums and e.window.steps == 0 and e.window.first_step == 4
    step(e, 4.0)
    read_loss(e)
    assert e.sums.loss_sum == 10.0 and e.since_log.loss_steps == 4


def test_a_loss_that_is_not_finite_names_the_rank_and_the_steps_of_its_window(tmp_path):
    e = engine(tmp_path)
    step(e, 1.0)
    read_loss(e)
    for loss in (1.0, math.nan, 2.0):
        step(e, loss)
    with pytest.raises(FloatingPointError, match=r"rank 1: the loss is nan in steps 2-4"):
        read_loss(e)


def test_hooks_are_named_by_import_path_and_a_bad_one_is_refused_by_key():
    (hook,) = load_hooks(["step_hooks:StepsLog"])
    assert type(hook).__name__ == "StepsLog"
    with pytest.raises(ConfigError, match="config key 'run.hooks': cannot load 'step_hooks:Nope'"):
        load_hooks(["step_hooks:Nope"])
