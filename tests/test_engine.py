"""The engine's loss window without Ray: the loss stays on the device until it is read, and a loss
that is not finite is refused naming the steps it came from."""

from __future__ import annotations

import math

import pytest
import torch

from ranray.config import ConfigError, TrainConfig
from ranray.train.engine import Engine, apply_gradients, load_hooks, read_loss
from ranray.train.optim import PRECISIONS
from ranray.run_dir import RunDir


def engine(tmp_path) -> Engine:
    return Engine(cfg=TrainConfig(), task=None, runtime=None, rank=1, world_size=2, device=torch.device("cpu"),
                  run_name="t", run_dir=RunDir(tmp_path), precision=PRECISIONS["fp32"], channels_last=False, hooks=[])


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


# ---------------------------------------------------------------------------------------------
# fp16: one overflow decision for the model and a task's own optimizer (Partial FC's)
# ---------------------------------------------------------------------------------------------


def fp16_engine(tmp_path) -> Engine:
    from ranray.train.optim import lr_scheduler

    e = engine(tmp_path)
    e.precision = PRECISIONS["fp16"]
    torch.manual_seed(0)
    e.net = e.model = torch.nn.Linear(3, 2)
    head = torch.nn.Linear(2, 1)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (e.net, head)]
    e.steppers = [(o, lr_scheduler(o, steps_per_epoch=10, epochs=1, o=e.cfg.optim)) for o in opts]
    e.optimizer, e.scheduler = e.steppers[0]
    e.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    return e, head


def params(*modules) -> list[torch.Tensor]:
    return [p.detach().clone() for m in modules for p in m.parameters()]


def test_an_overflow_in_the_head_alone_skips_the_backbone_step_too(tmp_path):
    e, head = fp16_engine(tmp_path)
    x = torch.randn(4, 3)
    before = params(e.net, head)
    # x 2^10 (the scale) overflows float32 in the head's weight gradient only; the backbone's are 2^10
    apply_gradients(e, e.net(x).sum() + head.weight.sum() * 3e38)
    assert torch.isfinite(e.net.weight.grad).all() and not torch.isfinite(head.weight.grad).all()
    assert all(torch.equal(a, b) for a, b in zip(before, params(e.net, head)))  # neither stepped
    assert e.scaler.get_scale() == 2.0 ** 9  # one decision: the scale backs off once
    apply_gradients(e, head(e.net(x)).sum())
    after = params(e.net, head)
    assert not any(torch.equal(a, b) for a, b in zip(before, after))  # a finite step moves both
    assert e.scaler.get_scale() == 2.0 ** 9


# ---------------------------------------------------------------------------------------------
# Elastic: the schedule's position and the LR rule
# ---------------------------------------------------------------------------------------------


def test_the_schedule_goes_on_from_the_epoch_position_with_the_lr_scaled_by_workers():
    from ranray.config import load_config
    from ranray.train.elastic import align_schedules, lr_scale
    from ranray.train.optim import lr_factor, lr_scheduler

    cfg = load_config(TrainConfig, None, ["scaling.num_workers=1-4", "optim.schedule=cosine", "optim.lr=0.4"])
    assert lr_scale(2, cfg) == 0.5 and lr_scale(4, cfg) == 1.0
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=cfg.optim.lr)
    sched = lr_scheduler(opt, steps_per_epoch=30, epochs=2, o=cfg.optim)  # 30 steps per epoch on 2 workers
    align_schedules([(opt, sched)], lr_scale(2, cfg), 0)  # what the engine does at a start
    for _ in range(44):
        opt.step()
        sched.step()
    at, saved = sched.get_last_lr()[0], (opt.state_dict(), sched.state_dict())
    # A restart on 4 workers: 15 steps per epoch, so the 44/30 epochs done are step 22 of its schedule.
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=cfg.optim.lr)
    sched = lr_scheduler(opt, steps_per_epoch=15, epochs=2, o=cfg.optim)
    opt.load_state_dict(saved[0])
    sched.load_state_dict(saved[1])
    align_schedules([(opt, sched)], lr_scale(4, cfg), 22)
    torch.testing.assert_close(sched.get_last_lr()[0], 0.4 * lr_factor(22, steps_per_epoch=15, epochs=2, o=cfg.optim))
    torch.testing.assert_close(sched.get_last_lr()[0], 2 * at)  # the same factor, x 2 for twice the workers
    opt.step()
    sched.step()
    assert sched.last_epoch == 23 and opt.param_groups[0]["lr"] == sched.get_last_lr()[0]
