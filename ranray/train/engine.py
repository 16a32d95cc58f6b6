"""The life of one training worker, written once; fine-tuning and pretraining are its tasks.

`run_worker(task, cfg, config, runtime)` is what every worker runs, on a runtime
(ranray.train.runtime: Ray Train's worker group, or the local runtime in this process); the
engine asks the runtime, never Ray, for its rank, world size, device, DDP, resume and reports:

    the runtime's process set-up (Ray: stderr to RUN_DIR/logs/rank<r>.log), torch threads, seed
    -> the resume state (runtime.resume_state: the newest checkpoint that verifies)
    -> precision and memory format for this device -> task.build: loaders, the bare model
    -> the model made data-parallel (runtime.prepare_model), compiled when asked; optimizer, LR schedule, scaler;
       a resume restores those, the loader position, the loop state, RNG streams and running sums,
       on any worker count (ranray.train.elastic: the LR rule and the schedule's position)
    -> per epoch: steps (task.loss, then apply_gradients), a checkpointed report every
       checkpoint.every_n_steps, then task.validate, the best model kept, one checkpointed report
    -> rank 0: task.finish (the exported model), its artifacts and tags to MLflow

The hot loop never waits on the host: the loss is summed on the device and read (a sync) every
`log_every_n_steps` and at every report; that read checks that the loss is finite, and rank 0
sends the window's metrics to MLflow without waiting for the store (MLflow's async logging).

Exactness of a resume: a checkpoint holds everything that decides the next step, so a restarted
group applies each step to the model exactly once: work after the last checkpoint is lost and
redone, never doubled. Every rank reports (runtime.report) the same number of times: the loaders
give every rank the same number of batches, and every decision to report depends only on the step
and the epoch.

Hooks (`Hook`): objects every worker calls at its start, after each step, after each logged read
of the loss, after each committed checkpoint and at its exit; `run.hooks` names their factories by
import path. Progress, profilers, extra loggers and the tests' fault injection and step records
live there, not in the loop.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ranray.config import ConfigError, PretrainConfig, TrainConfig, flatten, to_dict
from ranray.hardware import resolve_channels_last, resolve_precision
from ranray.run_tracker import open_tracker
from ranray.train.checkpoint import STATE_FILE, capture_rng_state, restore_rng_state, save_checkpoint
from ranray.train.collectives import all_reduce_sum
from ranray.train.elastic import (BATCH_RULE, align_schedules, check_resumable, lr_scale, resume_summary,
                                  schedule_step, start_record)
from ranray.train.optim import OPTIMIZERS, PRECISIONS, Precision, lr_scheduler
from ranray.train.resume import RANK_FILE
from ranray.run_dir import RunDir
from ranray.train.runtime import Runtime, import_object

log = logging.getLogger("ranray.train")

JobConfig = TrainConfig | PretrainConfig
Stepper = tuple[torch.optim.Optimizer, Any]  # (optimizer, its LR scheduler)


# ---------------------------------------------------------------------------------------------
# What a task supplies, and what a hook sees
# ---------------------------------------------------------------------------------------------


@dataclass
class Built:
    """What a task builds for one worker; the engine adds DDP, the optimizer and the rest."""

    train_loader: Any  # FaceLoader
    val_loader: Any  # FaceLoader, or None when the task does not validate on a split
    net: nn.Module  # the bare model: checkpoints, validation, export
    extra_steppers: list[Stepper] = field(default_factory=list)  # stepped after the model's


@dataclass
class Validation:
    metrics: dict[str, float]
    score: float  # higher is better: picks the best model
    detail: Any = None  # what the task's save_best needs (e.g. the confusion matrix)
    selects_best: bool = True  # False: no epoch is chosen on this split, the last one is the model


class Task(Protocol):
    """What differs between fine-tuning and pretraining."""

    job: str  # MLflow's "job" tag
    score_name: str  # the metric `Validation.score` is, e.g. "val_accuracy"
    tags: dict[str, str]  # extra MLflow tags of a run the worker starts itself

    def build(self, e: Engine, resumed: bool) -> Built: ...

    def loss(self, e: Engine, batch: dict[str, Any]) -> torch.Tensor: ...

    def validate(self, e: Engine) -> Validation | None: ...

    def save_best(self, e: Engine, v: Validation) -> None: ...  # rank 0, when the score improved

    def chief_state(self, e: Engine) -> dict[str, Any]: ...  # extra keys of rank 0's state.pt

    def rank_state(self, e: Engine) -> dict[str, Any]: ...  # extra keys of rank<r>.pt

    def load_state(self, e: Engine, state: dict[str, Any], own: dict[str, Any] | None, path: str) -> None: ...

    def finish(self, e: Engine) -> tuple[list[tuple[Path, str]], dict[str, Any]]: ...  # rank 0: artifacts, tags


class Hook:
    """Called by every worker; override what you need. An exception fails the worker (and is retried
    under checkpoint.max_failures like any other failure)."""

    def on_start(self, e: Engine) -> None:
        """After building and resuming, before the first step of this start."""

    def on_step(self, e: Engine, batch: dict[str, Any]) -> None:
        """After optimizer step `e.state.step` (the loss is not read here: that would sync)."""

    def on_log(self, e: Engine) -> None:
        """After the loss was read and logged (every log_every_n_steps, and at an epoch's end):
        `e.since_log` holds this rank's steps read since the last call."""

    def on_report(self, e: Engine) -> None:
        """After a checkpointed report at `e.state.step`, once the runtime has committed it."""

    def on_exit(self, e: Engine) -> None:
        """When the worker's training function ends, whether it failed or not."""


# Built in, by import path: ranray.train.progress imports this module.
PROGRESS_HOOK = "ranray.train.progress:TrainProgress"


def load_hooks(specs: Iterable[str]) -> list[Hook]:
    """`module:factory` import paths (run.hooks), each called without arguments."""
    hooks = []
    for spec in specs:
        try:
            hooks.append(import_object(spec)())
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"config key 'run.hooks': cannot load {spec!r} ({exc})") from exc
    return hooks


# ---------------------------------------------------------------------------------------------
# Loop state
# ---------------------------------------------------------------------------------------------


@dataclass
class LoopState:
    """Scalars of the loop that a checkpoint carries (the loader keeps its own position)."""

    step: int = 0  # optimizer steps applied to the model
    epoch: int = 0  # the epoch in progress, or the next to start
    mid_epoch: bool = False
    generation: int = 0  # starts of this run; makes checkpoint names unique across restarts
    best_score: float = -1.0
    best_epoch: int = -1


@dataclass
class RankSums:
    """Per-rank running sums, read from the device; saved per rank so a resume is exact."""

    loss_sum: float = 0.0
    loss_steps: int = 0
    images: int = 0
    seconds: float = 0.0

    def add(self, other: RankSums) -> None:
        self.loss_sum += other.loss_sum
        self.loss_steps += other.loss_steps
        self.images += other.images
        self.seconds += other.seconds


@dataclass
class DeviceWindow:
    """The steps since the loss was last read: its sum stays on the device until then."""

    loss: torch.Tensor | None = None
    first_step: int = 1
    steps: int = 0
    images: int = 0
    seconds: float = 0.0

    def add(self, loss: torch.Tensor, images: int, seconds: float) -> None:
        loss = loss.detach().float()
        self.loss = loss if self.loss is None else self.loss + loss
        self.steps += 1
        self.images += images
        self.seconds += seconds


# ---------------------------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------------------------


@dataclass
class Engine:
    cfg: JobConfig
    task: Task
    runtime: Runtime
    rank: int
    world_size: int
    device: torch.device
    run_name: str
    run_dir: RunDir
    precision: Precision
    channels_last: bool
    hooks: list[Hook]
    train_loader: Any = None
    val_loader: Any = None
    net: nn.Module | None = None  # the bare model
    model: nn.Module | None = None  # what training calls: DDP-wrapped (and compiled) when asked
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    steppers: list[Stepper] = field(default_factory=list)  # the model's first, then the task's
    scaler: torch.amp.GradScaler | None = None
    state: LoopState = field(default_factory=LoopState)
    sums: RankSums = field(default_factory=RankSums)  # the epoch so far
    since_log: RankSums = field(default_factory=RankSums)  # read, not yet logged
    window: DeviceWindow = field(default_factory=DeviceWindow)  # not yet read
    tracker: Any = None  # ranray.tracking.Tracker, or ranray.journal.JournalTracker without MLflow
    owns_run: bool = False  # rank 0 ends the MLflow run only if it started it

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.precision.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision.dtype)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


def run_worker(task: Task, cfg: JobConfig, config: dict[str, Any], runtime: Runtime) -> None:
    """The training function of every worker: `config` is ranray.train.jobs.worker_config's."""
    runtime.setup_process(Path(config["run_dir"]))
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    seed_everything(cfg.run.seed + runtime.rank)
    resume = runtime.resume_state()
    e = start(task, cfg, config, runtime, resume)
    try:
        for hook in e.hooks:
            hook.on_start(e)
        train(e)
        finish(e)
    finally:
        if e.owns_run and e.tracker.active:  # finish() ended it FINISHED, so this is a failure
            e.tracker.end("FAILED")  # a restarted group resumes the same run, RUNNING again
        for hook in e.hooks:
            hook.on_exit(e)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device_settings(precision: str, channels_last: bool | str, device: torch.device,
                            rank: int) -> tuple[str, bool]:
    """`auto` precision and memory format for this worker's device (ranray.hardware's rules)."""
    name = resolve_precision(precision, device)
    nhwc = resolve_channels_last(channels_last, device, name)
    if rank == 0 and "auto" in (precision, channels_last):
        log.info("on %s: precision %s, channels_last %s (precision=%s, data.channels_last=%s)",
                 device.type, name, nhwc, precision, channels_last)
    return name, nhwc


def start(task: Task, cfg: JobConfig, config: dict[str, Any], runtime: Runtime,
          resume: dict[str, Any] | None) -> Engine:
    rank, world_size, device = runtime.rank, runtime.world_size, runtime.device
    precision, channels_last = resolve_device_settings(cfg.precision, cfg.data.channels_last, device, rank)
    e = Engine(cfg=cfg, task=task, runtime=runtime, rank=rank, world_size=world_size, device=device,
               run_name=config["run_name"], run_dir=RunDir(config["run_dir"]), precision=PRECISIONS[precision],
               channels_last=channels_last, hooks=load_hooks([PROGRESS_HOOK, *cfg.run.hooks]))
    built = task.build(e, resumed=resume is not None)
    e.train_loader, e.val_loader, net = built.train_loader, built.val_loader, built.net
    if resume:
        net.load_state_dict(resume["state"]["model"])
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    e.net = net
    e.model = runtime.prepare_model(net)
    if cfg.compile:
        e.model = torch.compile(e.model)
    e.optimizer = OPTIMIZERS[cfg.optim.name]([p for p in net.parameters() if p.requires_grad], cfg.optim)
    e.scheduler = lr_scheduler(e.optimizer, steps_per_epoch=len(e.train_loader), epochs=cfg.epochs, o=cfg.optim)
    e.steppers = [(e.optimizer, e.scheduler), *built.extra_steppers]
    e.scaler = torch.amp.GradScaler(device.type, enabled=e.precision.scaled)
    if resume:
        apply_resume_state(e, resume)
    align_schedules(e.steppers, lr_scale(world_size, cfg), schedule_step(e.train_loader))
    if e.is_chief:
        open_tracking(e, config)
        saved_world = resume["state"].get("world_size") if resume else None
        e.tracker.log_metrics(start_record(world_size, cfg, saved_world), step=e.state.step)
        e.tracker.set_tags({"elastic.workers": str(cfg.scaling.num_workers), "elastic.batch_rule": BATCH_RULE})
    return e


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def stopped(e: Engine) -> bool:
    return 0 < e.cfg.max_steps <= e.state.step


def train(e: Engine) -> None:
    while e.state.epoch < e.cfg.epochs and not stopped(e):
        run_epoch(e)
        end_epoch(e)


def run_epoch(e: Engine) -> None:
    """Train until the epoch ends (or max_steps), reading the loss and reporting at their cadences."""
    cfg, st = e.cfg, e.state
    if not st.mid_epoch:
        e.train_loader.set_epoch(st.epoch)
        e.sums = RankSums()
        align_schedules(e.steppers, lr_scale(e.world_size, cfg), schedule_step(e.train_loader))
    st.mid_epoch = True
    e.model.train()
    every = cfg.checkpoint.every_n_steps
    tick = time.perf_counter()
    for batch in e.train_loader:
        loss = e.task.loss(e, batch)
        apply_gradients(e, loss)
        st.step += 1
        e.window.add(loss, len(batch["keys"]), time.perf_counter() - tick)
        for hook in e.hooks:
            hook.on_step(e, batch)
        st.mid_epoch = not e.train_loader.epoch_finished()
        if st.step % cfg.log_every_n_steps == 0:
            read_loss(e)
            log_steps(e)
        if stopped(e):
            return  # end_epoch validates and checkpoints where it stopped
        if every > 0 and st.step % every == 0 and st.mid_epoch:
            read_loss(e)
            # "epoch" counts completed epochs in every report (Tune's ASHA may use it as its clock).
            report(e, {"step": st.step, "epoch": round(st.epoch + e.train_loader.epoch_progress(), 4), "epoch_end": 0,
                       "train_loss": e.sums.loss_sum / e.sums.loss_steps, "lr": e.lr()})
        tick = time.perf_counter()
    st.mid_epoch = False


def apply_gradients(e: Engine, loss: torch.Tensor) -> None:
    """Backward, clip the model's gradients (after unscaling them), step every optimizer and
    schedule. The loss is not read here: that would wait for the device (except under fp16, whose
    overflow check reads one flag, as GradScaler.step itself would)."""
    for optimizer, _ in e.steppers:
        optimizer.zero_grad(set_to_none=True)
    e.scaler.scale(loss).backward()
    for optimizer, _ in e.steppers:
        e.scaler.unscale_(optimizer)  # the true gradients, to clip and to check (a no-op without fp16)
    if e.cfg.optim.grad_clip > 0:
        # The model only: a task's own parameters (Partial FC's sparse centres) are bounded otherwise.
        nn.utils.clip_grad_norm_(e.net.parameters(), e.cfg.optim.grad_clip)
    if gradients_finite(e):
        for optimizer, _ in e.steppers:
            e.scaler.step(optimizer)
    e.scaler.update()  # halves the scale when any optimizer's unscale_ found an inf or nan
    for _, scheduler in e.steppers:
        scheduler.step()


def gradients_finite(e: Engine) -> bool:
    """One overflow decision for every optimizer: a step skipped for the head (fp16 overflow in its
    gradients) skips the backbone too, as one GradScaler over one optimizer would (insightface)."""
    if not e.scaler.is_enabled():
        return True
    grads = [p.grad._values() if p.grad.is_sparse else p.grad for optimizer, _ in e.steppers
             for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True


def read_loss(e: Engine) -> None:
    """Read the window's loss sum (one device sync) into the running sums; refuse a loss that is
    not finite, naming the steps it came from."""
    w = e.window
    if w.steps == 0:
        return
    total = float(w.loss)
    if not np.isfinite(total):
        steps = f"step {w.first_step}" if w.steps == 1 else f"steps {w.first_step}-{e.state.step}"
        raise FloatingPointError(f"rank {e.rank}: the loss is {total} in {steps}; "
                                 "lower optim.lr or use precision=bf16/fp32")
    read = RankSums(total, w.steps, w.images, w.seconds)
    e.sums.add(read)
    e.since_log.add(read)
    e.window = DeviceWindow(first_step=e.state.step + 1)


def log_steps(e: Engine) -> None:
    """Rank 0: the mean loss, LR and throughput since the last log, to MLflow without waiting; then
    the hooks' on_log."""
    s = e.since_log
    if not s.loss_steps:
        return
    if e.is_chief:
        e.tracker.log_metrics({"train_loss": s.loss_sum / s.loss_steps, "lr": e.lr(),
                               "images_per_s": s.images * e.world_size / max(s.seconds, 1e-9)},
                              step=e.state.step, wait=False)
    for hook in e.hooks:
        hook.on_log(e)
    e.since_log = RankSums()


def end_epoch(e: Engine) -> None:
    """Validate, keep the best model, report with a checkpoint (one report on every rank)."""
    st = e.state
    completed = not st.mid_epoch
    read_loss(e)
    log_steps(e)  # the epoch's last steps, short of a full window
    validation = e.task.validate(e)
    train_loss, throughput = epoch_train_stats(e)
    metrics = {"step": st.step, "epoch": st.epoch + 1 if completed else st.epoch, "epoch_end": int(completed),
               "train_loss": train_loss, "lr": e.lr(), "images_per_s": throughput}
    improved = validation is not None and (validation.score > st.best_score or not validation.selects_best)
    if improved:
        st.best_score, st.best_epoch = validation.score, st.epoch
    if validation is not None:
        metrics.update(validation.metrics)
        metrics.update({f"best_{e.task.score_name}": st.best_score, "best_epoch": st.best_epoch + 1})
    if completed:
        st.epoch += 1
    if e.is_chief:
        score = f"{validation.score:.4f}" if validation is not None else "-"
        log.info("epoch %d step %d: train_loss %.4f %s %s (%.1f images/s)", metrics["epoch"], st.step, train_loss,
                 e.task.score_name, score, throughput)
        e.tracker.log_metrics({("epoch_train_loss" if k == "train_loss" else k): v for k, v in metrics.items()},
                              step=st.step)
        if improved:
            e.task.save_best(e, validation)
    report(e, metrics)


def epoch_train_stats(e: Engine) -> tuple[float, float]:
    """(mean train loss over all ranks' steps, images/s of the whole group) for the epoch so far."""
    s = e.sums
    loss_sum, loss_steps, images, seconds = all_reduce_sum([s.loss_sum, s.loss_steps, s.images, s.seconds])
    mean_seconds = seconds / e.world_size  # ranks step together: their clocks cover the same span
    return loss_sum / max(loss_steps, 1.0), images / max(mean_seconds, 1e-9)


# ---------------------------------------------------------------------------------------------
# Checkpoints and resumption
# ---------------------------------------------------------------------------------------------


def checkpoint_name(state: LoopState) -> str:
    # Sorts by step, then by start: a step redone after a restart gets a new directory.
    return f"checkpoint_{state.step:08d}_g{state.generation:02d}"


def report(e: Engine, metrics: dict[str, Any]) -> None:
    """A report with a checkpoint from every rank (rank 0 the model, each rank its own state); it
    returns once the runtime has committed the checkpoint, so a failure loses at most one interval.
    The window's loss must have been read: the running sums go into the checkpoint."""
    e.runtime.report(metrics, checkpoint_name(e.state), lambda folder: write_checkpoint(e, folder))
    for hook in e.hooks:
        hook.on_report(e)


def write_checkpoint(e: Engine, folder: Path) -> None:
    if e.is_chief:
        save_checkpoint(chief_state(e), folder / STATE_FILE)
    save_checkpoint(rank_state(e), folder / RANK_FILE.format(rank=e.rank))


def chief_state(e: Engine) -> dict[str, Any]:
    task_state = e.task.chief_state(e)
    return {
        "model": e.net.state_dict(),
        "optimizer": e.optimizer.state_dict(),
        "scheduler": e.scheduler.state_dict(),
        "scaler": e.scaler.state_dict(),
        "loader": e.train_loader.state_dict(),
        "train_state": dataclasses.asdict(e.state),
        "step": e.state.step,
        "epoch": e.state.epoch,
        "world_size": e.world_size,
        "config": to_dict(e.cfg),
        "summary": resume_summary(e.cfg, e.world_size, task_state),  # also in the manifest: checked on resume
        **task_state,
    }


def rank_state(e: Engine) -> dict[str, Any]:
    return {"rank": e.rank, "step": e.state.step, "rng": capture_rng_state(), "sums": dataclasses.asdict(e.sums),
            **e.task.rank_state(e)}


def apply_resume_state(e: Engine, resume: dict[str, Any]) -> None:
    state, own = resume["state"], resume["rank_state"]
    # Before anything is loaded: another model, optimizer or class count is refused by key.
    check_resumable(state, resume_summary(e.cfg, e.world_size, e.task.chief_state(e)), resume["path"])
    e.task.load_state(e, state, own, resume["path"])  # may refuse (e.g. another class count)
    e.optimizer.load_state_dict(state["optimizer"])
    e.scheduler.load_state_dict(state["scheduler"])
    e.scaler.load_state_dict(state["scaler"])
    e.train_loader.load_state_dict(state["loader"])
    e.state = LoopState(**state["train_state"])
    e.state.generation += 1
    e.window = DeviceWindow(first_step=e.state.step + 1)
    if own is not None:
        restore_rng_state(own["rng"])
        e.sums = RankSums(**own["sums"])
    else:
        log.warning("rank %d: reseeding its RNG streams", e.rank)
        seed_everything(e.cfg.run.seed + e.rank + 7919 * e.state.step)
    if e.is_chief:
        log.info("resumed from %s at step %d (epoch %d%s) on %d workers (checkpoint of %s)", resume["path"],
                 e.state.step, e.state.epoch, ", mid-epoch" if e.state.mid_epoch else "", e.world_size,
                 state.get("world_size"))


# ---------------------------------------------------------------------------------------------
# Tracking and the end of the run (rank 0)
# ---------------------------------------------------------------------------------------------


def open_tracking(e: Engine, config: dict[str, Any]) -> None:
    """Rank 0 logs into the driver's run if it was given one, else starts (or resumes) its own."""
    e.tracker = open_tracker(e.cfg.tracking, e.run_dir)
    run_id = config.get("tracking_run_id")
    if run_id:
        e.tracker.start(e.run_name, run_id=run_id)
        return
    e.owns_run = True
    e.tracker.start(e.run_name, params=flatten(e.cfg), tags={"job": e.task.job, **e.task.tags},
                    parent_run_id=config.get("parent_run_id"), resume=True)


def finish(e: Engine) -> None:
    if not e.is_chief:
        return
    artifacts, tags = e.task.finish(e)
    t = e.tracker
    if e.state.best_epoch >= 0:
        t.log_metrics({f"best_{e.task.score_name}": e.state.best_score, "best_epoch": e.state.best_epoch + 1},
                      step=e.state.step)
    for path, where in artifacts:
        t.log_artifact(path, where)
    t.set_tags(tags)
    t.flush()  # the step metrics still in flight, before this process may end
    if e.owns_run:
        t.end("FINISHED")
