"""The RAN fine-tuning loop that every Ray Train worker runs: `train_func_per_worker(config)`.

`ranray.train.launch.build_trainer` hands it `config = {"train": to_dict(TrainConfig), "run_name",
"run_dir", "tracking_run_id", "parent_run_id"}`. One worker's life:

    resume state (ray.train.get_checkpoint(), verified; a corrupt newest one falls back to an older one)
    -> loaders for this rank -> RAN on this rank's device, wrapped in DDP by prepare_model
    -> per epoch: steps (autocast, clipping, per-step LR), a checkpoint every N steps,
       validation (all ranks, all-reduced), one report with a checkpoint
    -> rank 0: best and final model exported, pictures and artifacts to MLflow

Exactness of a resume: a checkpoint holds everything that decides the next step (weights,
optimizer, scheduler, scaler, the loader's position, every rank's RNG streams and running sums),
so a restarted group applies each step to the model exactly once: work after the last checkpoint
is lost and redone, never doubled. Each rank appends the steps it trains to `steps/rank<r>.log`
(with a line per start), which is how tests prove it (`committed_steps`).

Every rank calls `ray.train.report` the same number of times: the loaders give every rank the same
number of batches, and every decision to report depends only on the step and the epoch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from ranray.config import CLASS_NAMES, OptimConfig, TrainConfig, flatten, from_dict, to_dict
from ranray.data.loader import FaceLoader, build_loader
from ranray.data.schema import SUBSET_FLAGS
from ranray.hardware import resolve_channels_last, resolve_precision
from ranray.models import RegionAttentionNetwork, build_ran, expression_loss, region_biased_loss
from ranray.tracking import Tracker
from ranray.train.checkpoint import (STATE_FILE, CheckpointError, capture_rng_state, export_model,
                                     load_checkpoint, restore_rng_state, save_checkpoint,
                                     verify_checkpoint)
from ranray.train.commits import wait_until_committed
from ranray.train.failures import worker_log
from ranray.train.metrics import EvalAccumulator, EvalResult
from ranray.train.plots import plot_attention_faces, plot_confusion_matrix

log = logging.getLogger("ranray.train")

# Files inside the run directory (storage_path/run_name), beside Ray's checkpoint_* folders.
MODEL_DIR = "model"  # best.pt / final.pt (+ .yaml): plain state_dicts, never read as checkpoints
PLOTS_DIR = "plots"
STEPS_DIR = "steps"
FAULTS_DIR = "faults"
RANK_FILE = "rank{rank}.pt"  # per-rank RNG streams and running sums inside a checkpoint
ATTENTION_FACES = 8
SUBSET_MASK = sum(SUBSET_FLAGS.values())  # "clean" rows: no occlusion and no large pose


class InjectedFault(RuntimeError):
    """Raised once by `testing.fail_at_step`, to exercise FailureConfig and resumption."""


# ---------------------------------------------------------------------------------------------
# Registries: precision, optimizers, LR schedules
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype | None  # autocast dtype; None runs in float32
    scaled: bool  # fp16 needs a GradScaler, bf16 has float32's range and does not


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision(None, False),
    "bf16": Precision(torch.bfloat16, False),
    "fp16": Precision(torch.float16, True),
}

OPTIMIZERS: dict[str, Callable[[Iterable[nn.Parameter], OptimConfig], torch.optim.Optimizer]] = {
    "sgd": lambda params, o: torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay),
    "adamw": lambda params, o: torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay),
}


def _step_factor(progress: float, epoch_progress: float, o: OptimConfig) -> float:
    # The RAN reference drops the LR at epoch boundaries: whole epochs decide, not steps.
    return o.gamma ** sum(epoch_progress >= m for m in o.milestones)


def _cosine_factor(progress: float, epoch_progress: float, o: OptimConfig) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


SCHEDULES: dict[str, Callable[[float, float, OptimConfig], float]] = {
    "step": _step_factor,
    "cosine": _cosine_factor,
}


def lr_factor(step: int, *, steps_per_epoch: int, epochs: int, o: OptimConfig) -> float:
    """LR multiplier before optimizer step `step + 1`: linear warm-up, then the schedule."""
    total = steps_per_epoch * epochs
    warmup = int(round(o.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    epoch_progress = (step // steps_per_epoch) / epochs
    return SCHEDULES[o.schedule](step / total, epoch_progress, o)


# ---------------------------------------------------------------------------------------------
# Worker state
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Scalars of the loop that a checkpoint carries (the loader keeps its own position)."""

    step: int = 0  # optimizer steps applied to the model
    epoch: int = 0  # the epoch in progress, or the next to start
    mid_epoch: bool = False
    generation: int = 0  # starts of this run; makes checkpoint names unique across restarts
    best_val_accuracy: float = -1.0
    best_epoch: int = -1


@dataclass
class RankSums:
    """Per-rank running sums of the epoch in progress, saved per rank so a resume is exact."""

    loss_sum: float = 0.0
    loss_steps: int = 0
    images: int = 0
    seconds: float = 0.0


@dataclass
class Worker:
    """Everything one worker's loop needs; built once per (re)start of the worker group."""

    cfg: TrainConfig
    rank: int
    world_size: int
    device: torch.device
    run_name: str
    run_dir: Path
    train_loader: FaceLoader
    val_loader: FaceLoader
    net: RegionAttentionNetwork  # the bare module: checkpoints, evaluation, export
    model: nn.Module  # what training calls: DDP-wrapped (and compiled) when asked
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    precision: Precision
    state: TrainState = field(default_factory=TrainState)
    sums: RankSums = field(default_factory=RankSums)
    tracker: Tracker | None = None
    owns_run: bool = False  # rank 0 ends the MLflow run only if it started it
    steps_log: StepsLog | None = None

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.precision.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision.dtype)

    def landmarks(self, batch: dict[str, Any]) -> torch.Tensor | None:
        # Only landmark regions read them; the other modes skip the transfer.
        return batch["landmarks"] if self.cfg.model.region_mode == "landmark" else None


# ---------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------


def train_func_per_worker(config: dict[str, Any]) -> None:
    cfg = from_dict(TrainConfig, config["train"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    worker_log(Path(config["run_dir"]), rank)
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    _seed(cfg.run.seed + rank)
    resume = load_resume_state(rank)
    w = build_worker(cfg, config, rank, world_size, resume)
    try:
        train(w)
        finish(w)
    except BaseException:
        if w.tracker is not None and w.owns_run:
            w.tracker.end("FAILED")  # a restarted group resumes the same run, RUNNING again
        raise
    finally:
        if w.steps_log is not None:
            w.steps_log.close()


def build_worker(cfg: TrainConfig, config: dict[str, Any], rank: int, world_size: int,
                 resume: dict[str, Any] | None) -> Worker:
    device = ray.train.torch.get_device()
    run_dir = Path(config["run_dir"])
    precision_name, channels_last = resolve_device_settings(cfg.precision, cfg.data.channels_last, device, rank)
    train_loader, val_loader = build_loaders(cfg, rank, world_size, device, channels_last)
    # A resume has the fine-tuned weights already: the init backbone is not read again.
    net = build_ran(dataclasses.replace(cfg.model, init_backbone="") if resume else cfg.model)
    if resume:
        net.load_state_dict(resume["state"]["model"])
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(net)
    if cfg.compile:
        model = torch.compile(model)
    optimizer = OPTIMIZERS[cfg.optim.name](net.parameters(), cfg.optim)
    spe = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps_per_epoch=spe, epochs=cfg.epochs, o=cfg.optim))
    precision = PRECISIONS[precision_name]
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaled)
    w = Worker(cfg=cfg, rank=rank, world_size=world_size, device=device, run_name=config["run_name"],
               run_dir=run_dir, train_loader=train_loader, val_loader=val_loader, net=net, model=model,
               optimizer=optimizer, scheduler=scheduler, scaler=scaler, precision=precision)
    if resume:
        apply_resume_state(w, resume)
    open_steps_log(w)
    if w.is_chief:
        open_tracking(w, config)
    return w


def resolve_device_settings(precision: str, channels_last: bool | str, device: torch.device,
                            rank: int) -> tuple[str, bool]:
    """`auto` precision and memory format for this worker's device (ranray.hardware's rules)."""
    name = resolve_precision(precision, device)
    nhwc = resolve_channels_last(channels_last, device, name)
    if rank == 0 and "auto" in (precision, channels_last):
        log.info("on %s: precision %s, channels_last %s (precision=%s, data.channels_last=%s)",
                 device.type, name, nhwc, precision, channels_last)
    return name, nhwc


def build_loaders(cfg: TrainConfig, rank: int, world_size: int, device: torch.device,
                  channels_last: bool) -> tuple[FaceLoader, FaceLoader]:
    common = dict(rank=rank, world_size=world_size, seed=cfg.run.seed, backend=cfg.data.loader, device=device,
                  num_threads=cfg.data.num_threads, channels_last=channels_last,
                  subset=cfg.data.train_subset)
    train_loader = build_loader(cfg.data.dir, cfg.data.train_split, batch_size=cfg.batch_size, training=True,
                                augment=cfg.data.augment, **common)
    val_loader = build_loader(cfg.data.dir, cfg.data.val_split, batch_size=cfg.batch_size, training=False,
                              **common)
    if len(train_loader) == 0:
        raise ValueError(f"{cfg.data.dir} split '{cfg.data.train_split}' (subset {cfg.data.train_subset}) has "
                         f"fewer rows than {world_size} workers x batch_size {cfg.batch_size}")
    return train_loader, val_loader


def _seed(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train(w: Worker) -> None:
    cfg, st = w.cfg, w.state
    stop = cfg.testing.stop_after_steps
    while st.epoch < cfg.epochs and not (0 <= stop <= st.step):
        run_epoch(w)
        end_epoch(w)


def run_epoch(w: Worker) -> None:
    """Train until the epoch ends (or testing.stop_after_steps), reporting every N steps."""
    cfg, st = w.cfg, w.state
    if not st.mid_epoch:
        w.train_loader.set_epoch(st.epoch)
        w.sums = RankSums()
    st.mid_epoch = True
    w.model.train()
    every, stop = cfg.checkpoint.every_n_steps, cfg.testing.stop_after_steps
    tick = time.perf_counter()
    for batch in w.train_loader:
        loss = train_step(w, batch)
        record_step(w, batch, loss, time.perf_counter() - tick)
        maybe_inject_fault(w)
        st.mid_epoch = epoch_fraction(w) < 1.0
        if 0 <= stop <= st.step:
            return  # end_epoch validates and checkpoints where it stopped
        if every > 0 and st.step % every == 0 and st.mid_epoch:
            # "epoch" counts completed epochs in every report (Tune's ASHA may use it as its clock).
            report(w, {"step": st.step, "epoch": round(st.epoch + epoch_fraction(w), 4), "epoch_end": 0,
                       "train_loss": w.sums.loss_sum / w.sums.loss_steps, "lr": w.scheduler.get_last_lr()[0]})
        tick = time.perf_counter()
    st.mid_epoch = False


def epoch_fraction(w: Worker) -> float:
    return w.train_loader.state_dict()["batches"] / len(w.train_loader)


def record_step(w: Worker, batch: dict[str, Any], loss: float, seconds: float) -> None:
    st, n = w.state, len(batch["keys"])
    st.step += 1
    w.sums.loss_sum += loss
    w.sums.loss_steps += 1
    w.sums.images += n
    w.sums.seconds += seconds
    w.steps_log.step(st, batch["keys"])
    if w.is_chief:
        w.tracker.log_metrics({"train_loss": loss, "lr": w.scheduler.get_last_lr()[0],
                               "images_per_s": n * w.world_size / max(seconds, 1e-9)}, step=st.step)


def train_step(w: Worker, batch: dict[str, Any]) -> float:
    with w.autocast():
        out = w.model(batch["images"], w.landmarks(batch))
    loss = (expression_loss(out.logits, batch["labels"], batch["targets"], w.cfg.data.label_mode)
            + region_biased_loss(out.mu, w.cfg.model.rb_margin))
    return apply_gradients(w, loss, [(w.optimizer, w.scheduler)], w.net.parameters())


def apply_gradients(w: Any, loss: torch.Tensor, steppers: list[tuple[Any, Any]], clipped) -> float:
    """Backward, clip `clipped` (after unscaling the first optimizer), step every (optimizer,
    scheduler); the loss as a float, or an error naming the rank and step when it is not finite."""
    for optimizer, _ in steppers:
        optimizer.zero_grad(set_to_none=True)
    w.scaler.scale(loss).backward()
    if w.cfg.optim.grad_clip > 0:
        w.scaler.unscale_(steppers[0][0])  # clip the true gradients, not the fp16-scaled ones
        nn.utils.clip_grad_norm_(clipped, w.cfg.optim.grad_clip)
    for optimizer, _ in steppers:
        w.scaler.step(optimizer)
    w.scaler.update()
    for _, scheduler in steppers:
        scheduler.step()
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"rank {w.rank}: the loss is {value} at step {w.state.step + 1}; "
                                 "lower optim.lr or use precision=bf16/fp32")
    return value


def end_epoch(w: Worker) -> None:
    """Validate, keep the best model, report with a checkpoint (one report on every rank)."""
    st = w.state
    completed = not st.mid_epoch
    result = evaluate_loader(w.net, w.val_loader, w.autocast, w.cfg.model.region_mode == "landmark",
                             num_classes=w.cfg.model.num_classes)
    train_loss, throughput = epoch_train_stats(w)
    val_acc = result.metrics["val_accuracy"]
    improved = val_acc > st.best_val_accuracy
    if improved:
        st.best_val_accuracy, st.best_epoch = val_acc, st.epoch
    metrics = {"step": st.step, "epoch": st.epoch + 1 if completed else st.epoch, "epoch_end": int(completed),
               "train_loss": train_loss, "lr": w.scheduler.get_last_lr()[0], "images_per_s": throughput,
               **result.metrics, "best_val_accuracy": st.best_val_accuracy, "best_epoch": st.best_epoch + 1}
    if completed:
        st.epoch += 1
    if w.is_chief:
        log.info("epoch %d step %d: train_loss %.4f val_accuracy %.4f (%.1f images/s)", metrics["epoch"], st.step,
                 train_loss, val_acc, throughput)
        w.tracker.log_metrics({("epoch_train_loss" if k == "train_loss" else k): v for k, v in metrics.items()},
                              step=st.step)
        if improved:
            save_best(w, result)
    report(w, metrics)


def epoch_train_stats(w: Worker) -> tuple[float, float]:
    """(mean train loss over all ranks' steps, images/s of the whole group) for the epoch so far."""
    s = w.sums
    packed = torch.tensor([s.loss_sum, s.loss_steps, s.images, s.seconds], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        packed = packed.to(_collective_device())
        dist.all_reduce(packed)
        packed = packed.cpu()
    loss_sum, loss_steps, images, seconds = packed.tolist()
    mean_seconds = seconds / w.world_size  # ranks step together: their clocks cover the same span
    return loss_sum / max(loss_steps, 1.0), images / max(mean_seconds, 1e-9)


@torch.no_grad()
def evaluate_loader(net: RegionAttentionNetwork, loader: FaceLoader, autocast: Callable[[], Any],
                    use_landmarks: bool, num_classes: int, prefix: str = "val") -> EvalResult:
    """Accuracy (majority labels), per class, per subset flag and the confusion matrix of `loader`.

    Runs the bare module (no DDP collectives per batch); EvalAccumulator all-reduces the counts
    once at the end when a process group is up, so every rank gets the whole split's numbers.
    """
    names = CLASS_NAMES[:num_classes]
    acc = EvalAccumulator(num_classes, names, prefix=prefix)
    clean = EvalAccumulator(num_classes, names, prefix=prefix)  # rows with no subset flag
    was_training = net.training
    net.eval()
    loader.set_epoch(0)
    for batch in loader:
        with autocast():
            out = net(batch["images"], batch["landmarks"] if use_landmarks else None)
        logits = out.logits.float()
        loss = nn.functional.cross_entropy(logits, batch["labels"])
        acc.update(logits, batch["labels"], batch["flags"], loss=loss)
        keep = (batch["flags"] & SUBSET_MASK) == 0
        clean.update(logits[keep], batch["labels"][keep])
    net.train(was_training)
    result = acc.compute()
    clean_result = clean.compute()
    if clean_result.metrics[f"{prefix}_samples"] > 0:
        result.metrics[f"{prefix}_acc_clean"] = clean_result.metrics[f"{prefix}_accuracy"]
    return result


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Checkpoints and resumption
# ---------------------------------------------------------------------------------------------


def checkpoint_name(state: TrainState) -> str:
    # Sorts by step, then by start: a step redone after a restart gets a new directory.
    return f"checkpoint_{state.step:08d}_g{state.generation:02d}"


def report(w: Worker, metrics: dict[str, Any]) -> None:
    """ray.train.report with a checkpoint from every rank (rank 0 the model, each rank its RNG)."""
    with tempfile.TemporaryDirectory(prefix="ranray-ckpt-") as tmp:
        if w.is_chief:
            save_checkpoint(chief_state(w), Path(tmp) / STATE_FILE)
        save_checkpoint(rank_state(w), Path(tmp) / RANK_FILE.format(rank=w.rank))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=checkpoint_name(w.state))
    wait_until_committed(checkpoint_name(w.state))  # a failure now loses at most one interval


def chief_state(w: Worker) -> dict[str, Any]:
    return {
        "model": w.net.state_dict(),
        "optimizer": w.optimizer.state_dict(),
        "scheduler": w.scheduler.state_dict(),
        "scaler": w.scaler.state_dict(),
        "loader": w.train_loader.state_dict(),
        "train_state": dataclasses.asdict(w.state),
        "step": w.state.step,
        "epoch": w.state.epoch,
        "world_size": w.world_size,
        "config": to_dict(w.cfg),
    }


def rank_state(w: Worker) -> dict[str, Any]:
    return {"rank": w.rank, "step": w.state.step, "rng": capture_rng_state(), "sums": dataclasses.asdict(w.sums)}


def load_resume_state(rank: int) -> dict[str, Any] | None:
    """The newest good checkpoint Ray knows for this run: {"state", "rank_state", "path"} or None.

    Rank 0 picks it (the newest that verifies) and tells the others, so a half-written newest
    checkpoint sends every rank to the same older one.
    """
    latest = ray.train.get_checkpoint()
    if latest is None:
        return None
    chosen = pick_good_checkpoint(latest) if rank == 0 else None
    chosen = _broadcast(chosen)
    ckpt = ray.train.Checkpoint(path=chosen, filesystem=latest.filesystem)
    with ckpt.as_directory() as d:
        state = load_checkpoint(Path(d) / STATE_FILE)
        try:
            own = load_checkpoint(Path(d) / RANK_FILE.format(rank=rank))
        except CheckpointError as exc:
            # A new world size, or a lost file: the weights still resume, RNG streams restart.
            log.warning("rank %d: no usable RNG state in %s (%s); reseeding", rank, chosen, exc)
            own = None
    return {"state": state, "rank_state": own, "path": chosen}


def pick_good_checkpoint(latest: ray.train.Checkpoint) -> str:
    """Path of `latest` if its state verifies, else of the newest older sibling that does."""
    import pyarrow.fs as pafs

    fs = latest.filesystem
    parent = latest.path.rstrip("/").rsplit("/", 1)[0]
    infos = fs.get_file_info(pafs.FileSelector(parent))
    siblings = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                       and i.base_name.startswith("checkpoint_") and i.path != latest.path), reverse=True)
    for path in [latest.path, *siblings]:
        with ray.train.Checkpoint(path=path, filesystem=fs).as_directory() as d:
            try:
                verify_checkpoint(Path(d) / STATE_FILE)
            except CheckpointError as exc:
                log.warning("not resuming from %s: %s", path, exc)
                continue
        if path != latest.path:
            log.warning("resuming from the older good checkpoint %s", path)
        return path
    raise CheckpointError(f"no checkpoint under {parent} verifies; delete the run directory to start afresh")


def apply_resume_state(w: Worker, resume: dict[str, Any]) -> None:
    state = resume["state"]
    w.optimizer.load_state_dict(state["optimizer"])
    w.scheduler.load_state_dict(state["scheduler"])
    w.scaler.load_state_dict(state["scaler"])
    w.train_loader.load_state_dict(state["loader"])
    w.state = TrainState(**state["train_state"])
    w.state.generation += 1
    own = resume["rank_state"]
    if own is not None:
        restore_rng_state(own["rng"])
        w.sums = RankSums(**own["sums"])
    else:
        _seed(w.cfg.run.seed + w.rank + 7919 * w.state.step)
    if w.is_chief:
        log.info("resumed from %s at step %d (epoch %d%s)", resume["path"], w.state.step, w.state.epoch,
                 ", mid-epoch" if w.state.mid_epoch else "")


def _broadcast(obj: Any) -> Any:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


# ---------------------------------------------------------------------------------------------
# Steps log and fault injection (how tests see what was trained)
# ---------------------------------------------------------------------------------------------


class StepsLog:
    """`steps/rank<r>.log`: "start <generation> <resume step>" per start, "step <n> <epoch> <keys digest>"."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", buffering=1)

    def start(self, state: TrainState) -> None:
        self.file.write(f"start {state.generation} {state.step}\n")

    def step(self, state: TrainState, keys: list[str]) -> None:
        digest = hashlib.sha1("\0".join(keys).encode()).hexdigest()[:16]
        self.file.write(f"step {state.step} {state.epoch} {digest}\n")

    def close(self) -> None:
        self.file.close()


def open_steps_log(w: Worker) -> None:
    w.steps_log = StepsLog(w.run_dir / STEPS_DIR / f"rank{w.rank}.log")
    w.steps_log.start(w.state)


def committed_steps(path: str | Path) -> list[tuple[int, int, str]]:
    """The (step, epoch, keys digest) lineage of the final model from a steps log.

    A start at step S discards what the log holds after S: that work was lost with the failed
    group and redone. A step that appears twice in the result was applied twice.
    """
    lineage: list[tuple[int, int, str]] = []
    for line in Path(path).read_text().splitlines():
        kind, *fields = line.split()
        if kind == "start":
            resume_step = int(fields[1])
            lineage = [entry for entry in lineage if entry[0] <= resume_step]
        elif kind == "step":
            lineage.append((int(fields[0]), int(fields[1]), fields[2]))
    return lineage


def maybe_inject_fault(w: Worker) -> None:
    t = w.cfg.testing
    if t.fail_at_step != w.state.step or w.rank != t.fail_rank:
        return
    marker = w.run_dir / FAULTS_DIR / f"fail_at_step_{t.fail_at_step}"
    if marker.exists():
        return  # the restarted group passes this step
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    raise InjectedFault(f"testing.fail_at_step: rank {w.rank} fails after step {w.state.step}")


# ---------------------------------------------------------------------------------------------
# Tracking and the end of the run (rank 0)
# ---------------------------------------------------------------------------------------------


def open_tracking(w: Worker, config: dict[str, Any]) -> None:
    """Rank 0 logs into the driver's run if it was given one, else starts (or resumes) its own."""
    w.tracker = Tracker(w.cfg.tracking, w.run_dir)
    run_id = config.get("tracking_run_id")
    if run_id:
        w.tracker.start(w.run_name, run_id=run_id)
        return
    w.owns_run = True
    w.tracker.start(w.run_name, params=flatten(w.cfg), tags={"job": "train", "train_subset": w.cfg.data.train_subset},
                    parent_run_id=config.get("parent_run_id"), resume=True)


def save_best(w: Worker, result: EvalResult) -> None:
    export_model(w.net.state_dict(), w.cfg, w.run_dir / MODEL_DIR / "best.pt")
    plot_confusion_matrix(result.confusion, result.class_names, w.run_dir / PLOTS_DIR / "confusion_val.png",
                          title=f"{w.run_name}: validation, epoch {w.state.best_epoch + 1}, "
                                f"accuracy {w.state.best_val_accuracy:.3f}")


def finish(w: Worker) -> None:
    if not w.is_chief:
        return
    model_path, config_path = export_model(w.net.state_dict(), w.cfg, w.run_dir / MODEL_DIR / "final.pt")
    faces = plot_attention(w)
    t = w.tracker
    t.log_metrics({"best_val_accuracy": w.state.best_val_accuracy, "best_epoch": w.state.best_epoch + 1},
                  step=w.state.step)
    for path, where in ((w.run_dir / PLOTS_DIR / "confusion_val.png", "plots"), (faces, "plots"),
                        (w.run_dir / MODEL_DIR / "best.pt", "model"), (w.run_dir / MODEL_DIR / "best.yaml", "model"),
                        (config_path, "model")):
        t.log_artifact(path, where)
    t.set_tags({"final_model": str(model_path), "best_val_accuracy": f"{w.state.best_val_accuracy:.4f}"})
    if w.owns_run:
        t.end("FINISHED")


@torch.no_grad()
def plot_attention(w: Worker) -> Path:
    """A few validation faces with their regions and the learned mu / nu written on them."""
    net = w.net
    net.eval()
    w.val_loader.set_epoch(0)
    batch = next(iter(w.val_loader))
    n = min(ATTENTION_FACES, len(batch["keys"]))
    images = batch["images"][:n]
    landmarks = batch["landmarks"][:n] if w.cfg.model.region_mode == "landmark" else None
    with w.autocast():
        out = net(images, landmarks)
    boxes = net.region_boxes(images, landmarks) * images.shape[-1]
    return plot_attention_faces(images, boxes, out.mu, out.nu, out.logits.argmax(1).tolist(),
                                batch["labels"][:n].tolist(), w.run_dir / PLOTS_DIR / "attention_faces.png",
                                class_names=CLASS_NAMES[: w.cfg.model.num_classes])
