"""Face-recognition pretraining: iResNet + margin softmax with Partial FC, on Ray Train.

Driver side (`run_pretraining`, used by `ranray pretrain`): preflight checks, the MLflow run, a
TorchTrainer running `train_func_per_worker` on every worker. One worker's life:

    resume state (the newest good checkpoint: rank 0's state.pt + this rank's rank<r>.pt)
    -> train loader for this rank, the val split's loader when there is a pairs file
    -> backbone (create_model) on this rank's device under DDP; PartialFC outside DDP, holding this
       rank's shard of class centres, with its own PartialFCSGD (sparse rows, per-rank momentum)
    -> per epoch: steps (autocast; margin + softmax in float32), a checkpoint every N steps,
       verification on the pairs (all ranks embed their part, every rank scores), one report
    -> rank 0: best and final backbone exported as a plain insightface-keyed state_dict

A checkpoint is a Ray checkpoint directory holding state.pt (rank 0: backbone, its optimizer,
scheduler, scaler, loader position, loop state) and rank<r>.pt for every rank (its class-centre
shard, the shard's momentum and scheduler, its RNG streams and running sums). A resume needs the
same world size: the shards are not re-cut (PartialFC refuses another rank's shard).

Gradient scale: the loss is the mean over the global batch and every rank backpropagates it, so
each rank's embedding gradient is exact; DDP then averages the backbone's gradients over the W
ranks, so PartialFC's gather hands back W x the gradient (embedding_grad_scale), as insightface
does. The centre gradients need no correction.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ranray.config import ConfigError, PretrainConfig, flatten, from_dict, to_dict
from ranray.models.partial_fc import PartialFC, PartialFCSGD, make_optimizer
from ranray.train.verification import Pair, VerificationResult, evaluate_verification, read_pairs

log = logging.getLogger("ranray.pretrain")

PAIRS_FILE = "pairs.txt"  # `ranray prepare` copies an identity set's pairs file beside the shards
MODEL_DIR = "model"
BACKBONE_FINAL = "backbone.pt"
BACKBONE_BEST = "backbone_best.pt"


# ---------------------------------------------------------------------------------------------
# Preflight (driver, before Ray): every check that can fail without workers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainPlan:
    """What the driver resolved from the config and the dataset, handed to every worker."""

    num_classes: int
    pairs_file: str  # "" when there is no verification


def preflight(cfg: PretrainConfig) -> PretrainPlan:
    """Refuse, naming the config key, what would otherwise fail inside the workers."""
    from ranray.data.schema import DatasetError, read_manifest

    if not cfg.data.dir or not Path(cfg.data.dir).is_dir():
        raise ConfigError(f"config key 'data.dir' must be a prepared identity dataset, got {cfg.data.dir!r}")
    try:
        manifest = read_manifest(cfg.data.dir)
        _check_rows(cfg, manifest)
    except DatasetError as exc:
        raise ConfigError(f"config key 'data.dir': {exc}") from exc
    from ranray.hardware import check_cpu_settings

    num_classes = _check_classes(cfg, manifest)
    _check_backbone(cfg)
    check_cpu_settings(cfg.precision, cfg.data.channels_last, cfg.scaling.use_gpu)
    pairs = _resolve_pairs(cfg)
    return PretrainPlan(num_classes, pairs)


def _check_rows(cfg: PretrainConfig, manifest: dict[str, Any]) -> None:
    rows = manifest.get("splits", {}).get(cfg.data.train_split, {}).get("rows", 0)
    needed = cfg.scaling.num_workers * cfg.batch_size
    if rows < needed:
        raise ConfigError(f"config key 'batch_size': split '{cfg.data.train_split}' of {cfg.data.dir} has {rows} "
                          f"rows, fewer than scaling.num_workers x batch_size = {needed}")


def _check_classes(cfg: PretrainConfig, manifest: dict[str, Any]) -> int:
    """The classifier size: the dataset's identity count; a different num_classes is refused."""
    have = int(manifest.get("num_classes") or 0)
    if have <= 0:
        raise ConfigError(f"config key 'data.dir': {cfg.data.dir} records no num_classes (not an identity set?)")
    if cfg.num_classes and cfg.num_classes != have:
        raise ConfigError(f"config key 'num_classes' is {cfg.num_classes} but {cfg.data.dir} has {have} training "
                          "identities; leave it 0 to take the dataset's")
    if have < cfg.scaling.num_workers:
        raise ConfigError(f"config key 'scaling.num_workers': {cfg.scaling.num_workers} ranks for {have} classes; "
                          "every rank needs at least one class centre")
    return have


def _check_backbone(cfg: PretrainConfig) -> None:
    """The backbone exists and embeds in partial_fc.embedding_size: the size `ranray train` rebuilds
    it with, so the exported backbone loads strictly there."""
    from ranray.models import create_model

    try:
        size = create_model(cfg.backbone).embedding_size
    except ValueError as exc:
        raise ConfigError(f"config key 'backbone': {exc}") from exc
    if size != cfg.partial_fc.embedding_size:
        raise ConfigError(f"config key 'partial_fc.embedding_size' is {cfg.partial_fc.embedding_size} but "
                          f"{cfg.backbone} embeds in {size}; set it to {size}")


def _resolve_pairs(cfg: PretrainConfig) -> str:
    """The pairs file (verification_pairs, else the dataset's pairs.txt, else none), checked
    against the keys of the validation split."""
    path = Path(cfg.verification_pairs) if cfg.verification_pairs else Path(cfg.data.dir) / PAIRS_FILE
    if not path.is_file():
        if cfg.verification_pairs:
            raise ConfigError(f"config key 'verification_pairs': {path} does not exist")
        log.warning("no verification pairs (%s missing): pretraining runs without verification", path)
        return ""
    try:
        pairs = read_pairs(path)
    except ValueError as exc:
        raise ConfigError(f"config key 'verification_pairs': {exc}") from exc
    keys = _split_keys(cfg.data.dir, cfg.data.val_split)
    missing = sorted({k for p in pairs for k in (p.a, p.b)} - keys)
    if missing:
        raise ConfigError(f"config key 'verification_pairs': {len(missing)} key(s) of {path} are not in split "
                          f"'{cfg.data.val_split}' of {cfg.data.dir}, e.g. {missing[:3]}")
    return str(path.resolve())


def _split_keys(data_dir: str, split: str) -> set[str]:
    import pyarrow.parquet as pq

    from ranray.data.schema import DatasetError, shard_paths

    try:
        return {k for p in shard_paths(data_dir, split) for k in pq.read_table(p, columns=["key"])["key"].to_pylist()}
    except DatasetError as exc:
        raise ConfigError(f"config key 'data.val_split': {exc} (verification embeds that split)") from exc


# ---------------------------------------------------------------------------------------------
# Worker state
# ---------------------------------------------------------------------------------------------


@dataclass
class PretrainState:
    """Loop scalars a checkpoint carries (the loader keeps its own position)."""

    step: int = 0
    epoch: int = 0  # the epoch in progress, or the next to start
    mid_epoch: bool = False
    generation: int = 0  # starts of this run; makes checkpoint names unique across restarts
    best_verify_accuracy: float = -1.0
    best_epoch: int = -1


@dataclass
class PretrainWorker:
    cfg: PretrainConfig
    plan: PretrainPlan
    rank: int
    world_size: int
    device: torch.device
    run_name: str
    run_dir: Path
    train_loader: Any  # FaceLoader
    val_loader: Any  # FaceLoader, or None without pairs
    pairs: list[Pair]
    backbone: nn.Module  # the bare backbone: checkpoints, verification, export
    model: nn.Module  # what training calls: DDP-wrapped when world > 1
    head: PartialFC
    optimizer: torch.optim.Optimizer
    head_optimizer: PartialFCSGD
    scheduler: torch.optim.lr_scheduler.LambdaLR
    head_scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    precision: Any  # finetune.Precision
    state: PretrainState = field(default_factory=PretrainState)
    sums: Any = None  # finetune.RankSums
    tracker: Any = None
    owns_run: bool = False
    steps_log: Any = None

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.precision.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision.dtype)


# ---------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------


def train_func_per_worker(config: dict[str, Any]) -> None:
    import ray.train

    from ranray.train.failures import worker_log
    from ranray.train.finetune import _seed, load_resume_state

    cfg = from_dict(PretrainConfig, config["pretrain"])
    plan = PretrainPlan(**config["plan"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    worker_log(Path(config["run_dir"]), rank)
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    _seed(cfg.run.seed + rank)
    resume = load_resume_state(rank)
    w = build_worker(cfg, plan, config, rank, world_size, resume)
    try:
        train(w)
        finish(w)
    except BaseException:
        if w.tracker is not None and w.owns_run:
            w.tracker.end("FAILED")
        raise
    finally:
        if w.steps_log is not None:
            w.steps_log.close()


def build_worker(cfg: PretrainConfig, plan: PretrainPlan, config: dict[str, Any], rank: int, world_size: int,
                 resume: dict[str, Any] | None) -> PretrainWorker:
    import ray.train.torch

    from ranray.models import create_model
    from ranray.train.finetune import (OPTIMIZERS, PRECISIONS, RankSums, lr_factor, open_steps_log,
                                       resolve_device_settings)

    device = ray.train.torch.get_device()
    precision_name, channels_last = resolve_device_settings(cfg.precision, cfg.data.channels_last, device, rank)
    train_loader, val_loader = build_loaders(cfg, plan, rank, world_size, device, channels_last)
    backbone = create_model(cfg.backbone, num_features=cfg.partial_fc.embedding_size)
    if resume:
        backbone.load_state_dict(resume["state"]["backbone"])
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(backbone)
    head = PartialFC.from_config(plan.num_classes, cfg.partial_fc, cfg.margin, seed=cfg.run.seed,
                                 embedding_grad_scale=float(world_size)).to(device)
    optimizer = OPTIMIZERS[cfg.optim.name]([p for p in backbone.parameters() if p.requires_grad], cfg.optim)
    head_optimizer = make_optimizer(head, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay)
    spe = len(train_loader)

    def factor(s: int) -> float:
        return lr_factor(s, steps_per_epoch=spe, epochs=cfg.epochs, o=cfg.optim)

    precision = PRECISIONS[precision_name]
    w = PretrainWorker(
        cfg=cfg, plan=plan, rank=rank, world_size=world_size, device=device, run_name=config["run_name"],
        run_dir=Path(config["run_dir"]), train_loader=train_loader, val_loader=val_loader,
        pairs=read_pairs(plan.pairs_file) if plan.pairs_file else [], backbone=backbone, model=model, head=head,
        optimizer=optimizer, head_optimizer=head_optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, factor),
        head_scheduler=torch.optim.lr_scheduler.LambdaLR(head_optimizer, factor),
        scaler=torch.amp.GradScaler(device.type, enabled=precision.scaled), precision=precision, sums=RankSums())
    if resume:
        apply_resume_state(w, resume)
    else:
        w.train_loader.set_epoch(0)
    open_steps_log(w)  # steps/rank<r>.log: "start", "shard <start> <end> <digest>", "step ...", "saved ..."
    w.steps_log.file.write(f"shard {head.class_start} {head.class_end} {shard_digest(head)}\n")
    if w.is_chief:
        open_tracking(w, config)
    return w


def build_loaders(cfg: PretrainConfig, plan: PretrainPlan, rank: int, world_size: int, device: torch.device,
                  channels_last: bool):
    from ranray.data.loader import build_loader

    common = dict(rank=rank, world_size=world_size, seed=cfg.run.seed, backend=cfg.data.loader, device=device,
                  num_threads=cfg.data.num_threads, channels_last=channels_last)
    train_loader = build_loader(cfg.data.dir, cfg.data.train_split, batch_size=cfg.batch_size, training=True,
                                augment=cfg.data.augment, **common)
    val_loader = (build_loader(cfg.data.dir, cfg.data.val_split, batch_size=cfg.batch_size, training=False, **common)
                  if plan.pairs_file else None)
    return train_loader, val_loader


def shard_digest(head: PartialFC) -> str:
    """A short digest of this rank's class centres: the steps log records it at every start."""
    return hashlib.sha1(head.weight.detach().cpu().numpy().tobytes()).hexdigest()[:16]


def open_tracking(w: PretrainWorker, config: dict[str, Any]) -> None:
    from ranray.tracking import Tracker

    w.tracker = Tracker(w.cfg.tracking, w.run_dir)
    run_id = config.get("tracking_run_id")
    if run_id:
        w.tracker.start(w.run_name, run_id=run_id)
        return
    w.owns_run = True
    w.tracker.start(w.run_name, params=flatten(w.cfg), tags={"job": "pretrain"}, resume=True)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train(w: PretrainWorker) -> None:
    stop = w.cfg.testing.stop_after_steps
    while w.state.epoch < w.cfg.epochs and not (0 <= stop <= w.state.step):
        run_epoch(w)
        end_epoch(w)


def run_epoch(w: PretrainWorker) -> None:
    from ranray.train.finetune import RankSums, maybe_inject_fault

    cfg, st = w.cfg, w.state
    if not st.mid_epoch:
        w.train_loader.set_epoch(st.epoch)
        w.sums = RankSums()
    st.mid_epoch = True
    w.model.train()
    w.head.train()
    every, stop, spe = cfg.checkpoint.every_n_steps, cfg.testing.stop_after_steps, len(w.train_loader)
    tick = time.perf_counter()
    for batch in w.train_loader:
        loss = train_step(w, batch)
        now = time.perf_counter()
        st.step += 1
        n = len(batch["keys"])
        w.sums.loss_sum, w.sums.loss_steps = w.sums.loss_sum + loss, w.sums.loss_steps + 1
        w.sums.images, w.sums.seconds = w.sums.images + n, w.sums.seconds + now - tick
        w.steps_log.step(st, batch["keys"])
        if w.is_chief:
            w.tracker.log_metrics({"train_loss": loss, "lr": w.scheduler.get_last_lr()[0],
                                   "images_per_s": n * w.world_size / max(now - tick, 1e-9)}, step=st.step)
        maybe_inject_fault(w)
        if 0 <= stop <= st.step:
            return  # end_epoch verifies and checkpoints where it stopped
        last_batch = w.train_loader.state_dict()["batches"] >= spe
        if every > 0 and st.step % every == 0 and not last_batch:
            report(w, {"step": st.step, "epoch": st.epoch, "epoch_end": 0,
                       "train_loss": w.sums.loss_sum / w.sums.loss_steps, "lr": w.scheduler.get_last_lr()[0]})
        tick = time.perf_counter()
    st.mid_epoch = False


def train_step(w: PretrainWorker, batch: dict[str, Any]) -> float:
    from ranray.train.finetune import apply_gradients

    with w.autocast():
        embeddings = w.model(batch["images"])
        loss = w.head(embeddings, batch["labels"])  # matmul under autocast; margin and softmax float32
    # Clip the backbone only, as insightface: the centres' sparse rows are bounded by the margin softmax.
    return apply_gradients(w, loss, [(w.optimizer, w.scheduler), (w.head_optimizer, w.head_scheduler)],
                           w.backbone.parameters())


def end_epoch(w: PretrainWorker) -> None:
    """Verify, keep the best backbone, report with a checkpoint (one report on every rank)."""
    from ranray.train.finetune import epoch_train_stats

    st = w.state
    completed = not st.mid_epoch
    train_loss, throughput = epoch_train_stats(w)
    metrics = {"step": st.step, "epoch": st.epoch + 1 if completed else st.epoch, "epoch_end": int(completed),
               "train_loss": train_loss, "lr": w.scheduler.get_last_lr()[0], "images_per_s": throughput}
    result = verify(w)
    if result is not None:
        metrics.update(verification_metrics(result))
        if result.accuracy > st.best_verify_accuracy:
            st.best_verify_accuracy, st.best_epoch = result.accuracy, st.epoch
            if w.is_chief:
                export_backbone(w, BACKBONE_BEST)
        metrics.update(best_verify_accuracy=st.best_verify_accuracy, best_epoch=st.best_epoch + 1)
    if completed:
        st.epoch += 1
    if w.is_chief:
        log.info("epoch %d step %d: train_loss %.4f verify_accuracy %s (%.1f images/s)", metrics["epoch"], st.step,
                 train_loss, f"{result.accuracy:.4f}" if result else "-", throughput)
        w.tracker.log_metrics({("epoch_train_loss" if k == "train_loss" else k): v for k, v in metrics.items()},
                              step=st.step)
    report(w, metrics)


def verification_metrics(result: VerificationResult) -> dict[str, float]:
    return {"verify_accuracy": result.accuracy, "verify_accuracy_std": result.accuracy_std,
            "verify_threshold": result.threshold, "verify_tar_at_far": result.tar_at_far,
            "verify_far": result.far_achieved}


# ---------------------------------------------------------------------------------------------
# Verification: each rank embeds its part of the val split, every rank scores the pairs
# ---------------------------------------------------------------------------------------------


def verify(w: PretrainWorker) -> VerificationResult | None:
    if w.val_loader is None:
        return None
    wanted = {k for p in w.pairs for k in (p.a, p.b)}
    mine = embed_keys(w.backbone, w.val_loader, w.autocast, wanted)
    return evaluate_verification(gather_embeddings(mine), w.pairs)


@torch.no_grad()
def embed_keys(backbone: nn.Module, loader: Any, autocast: Any, wanted: set[str]) -> dict[str, np.ndarray]:
    """Embedding of the image plus that of its mirror image (insightface's test-time flip)."""
    was_training = backbone.training
    backbone.eval()
    loader.set_epoch(0)
    out: dict[str, np.ndarray] = {}
    for batch in loader:
        images = batch["images"]
        with autocast():
            emb = backbone(images) + backbone(torch.flip(images, dims=[3]))
        for key, row in zip(batch["keys"], emb.float().cpu().numpy()):
            if key in wanted:
                out[key] = row
    backbone.train(was_training)
    return out


def gather_embeddings(mine: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mine
    parts: list[dict[str, np.ndarray] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in (part or {}).items()}


# ---------------------------------------------------------------------------------------------
# Checkpoints and resumption
# ---------------------------------------------------------------------------------------------


def report(w: PretrainWorker, metrics: dict[str, Any]) -> None:
    """ray.train.report with a checkpoint from every rank: rank 0 the backbone, each rank its shard."""
    import ray.train

    from ranray.train.checkpoint import STATE_FILE, save_checkpoint
    from ranray.train.commits import wait_until_committed
    from ranray.train.finetune import RANK_FILE

    name = f"checkpoint_{w.state.step:08d}_g{w.state.generation:02d}"
    with tempfile.TemporaryDirectory(prefix="ranray-pretrain-ckpt-") as tmp:
        if w.is_chief:
            save_checkpoint(chief_state(w), Path(tmp) / STATE_FILE)
        save_checkpoint(rank_state(w), Path(tmp) / RANK_FILE.format(rank=w.rank))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
    wait_until_committed(name)  # a failure now loses at most one interval
    # The steps log pairs this with the "shard" line of a later start: a resume restored the shard saved here.
    w.steps_log.file.write(f"saved {w.state.step} {shard_digest(w.head)}\n")


def chief_state(w: PretrainWorker) -> dict[str, Any]:
    return {"backbone": w.backbone.state_dict(), "optimizer": w.optimizer.state_dict(),
            "scheduler": w.scheduler.state_dict(), "scaler": w.scaler.state_dict(),
            "loader": w.train_loader.state_dict(), "train_state": dataclasses.asdict(w.state),
            "step": w.state.step, "epoch": w.state.epoch, "world_size": w.world_size,
            "num_classes": w.plan.num_classes, "config": to_dict(w.cfg)}


def rank_state(w: PretrainWorker) -> dict[str, Any]:
    from ranray.train.checkpoint import capture_rng_state

    return {"rank": w.rank, "step": w.state.step, "rng": capture_rng_state(), "sums": dataclasses.asdict(w.sums),
            "partial_fc": w.head.state_dict(), "partial_fc_optimizer": w.head_optimizer.state_dict(),
            "partial_fc_scheduler": w.head_scheduler.state_dict()}


def apply_resume_state(w: PretrainWorker, resume: dict[str, Any]) -> None:
    from ranray.train.checkpoint import CheckpointError, restore_rng_state
    from ranray.train.finetune import RankSums

    state, own = resume["state"], resume["rank_state"]
    if state.get("world_size") != w.world_size or own is None:
        raise CheckpointError(
            f"rank {w.rank}: {resume['path']} was written by {state.get('world_size')} workers and holds "
            f"{'no' if own is None else 'its'} class-centre shard for this rank; Partial FC resumes only with the "
            f"same scaling.num_workers ({state.get('world_size')})")
    w.head.load_state_dict(own["partial_fc"])  # refuses a shard of other classes
    w.head_optimizer.load_state_dict(own["partial_fc_optimizer"])
    w.head_scheduler.load_state_dict(own["partial_fc_scheduler"])
    w.optimizer.load_state_dict(state["optimizer"])
    w.scheduler.load_state_dict(state["scheduler"])
    w.scaler.load_state_dict(state["scaler"])
    w.train_loader.load_state_dict(state["loader"])
    w.state = PretrainState(**state["train_state"])
    w.state.generation += 1
    restore_rng_state(own["rng"])
    w.sums = RankSums(**own["sums"])
    if w.is_chief:
        log.info("resumed from %s at step %d (epoch %d)", resume["path"], w.state.step, w.state.epoch)


# ---------------------------------------------------------------------------------------------
# The end of the run (rank 0): the backbone hand-over
# ---------------------------------------------------------------------------------------------


def export_backbone(w: PretrainWorker, name: str) -> Path:
    """A plain state_dict with insightface's keys: `ranray train model.init_backbone=` loads it strictly."""
    from ranray.train.checkpoint import export_model

    path, _ = export_model(w.backbone.state_dict(), w.cfg, w.run_dir / MODEL_DIR / name)
    return path


def finish(w: PretrainWorker) -> None:
    if not w.is_chief:
        return
    path = export_backbone(w, BACKBONE_FINAL)
    t = w.tracker
    if w.state.best_epoch >= 0:
        t.log_metrics({"best_verify_accuracy": w.state.best_verify_accuracy, "best_epoch": w.state.best_epoch + 1},
                      step=w.state.step)
    for artifact in (path, path.with_suffix(".yaml"), w.run_dir / MODEL_DIR / BACKBONE_BEST):
        t.log_artifact(artifact, MODEL_DIR)
    t.set_tags({"backbone": str(path), "num_classes": w.plan.num_classes})
    if w.owns_run:
        t.end("FINISHED")


# ---------------------------------------------------------------------------------------------
# Driver: the TorchTrainer and a whole run
# ---------------------------------------------------------------------------------------------


def resolve_run_name(cfg: PretrainConfig) -> str:
    return cfg.run.name or time.strftime("pretrain-%Y%m%d-%H%M%S")


def build_trainer(cfg: PretrainConfig, plan: PretrainPlan, *, run_name: str, storage_path: str,
                  tracking_run_id: str | None = None):
    import ray.train
    from ray.train.torch import TorchTrainer

    from ranray.train.launch import run_dir_for

    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    return TorchTrainer(
        train_func_per_worker,
        train_loop_config={"pretrain": to_dict(cfg), "plan": dataclasses.asdict(plan), "run_name": run_name,
                           "run_dir": str(run_dir_for(storage_path, run_name)), "tracking_run_id": tracking_run_id},
        scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures)),
    )


def run_pretraining(cfg: PretrainConfig, *, run_name: str | None = None):
    """Check, start Ray if needed, pretrain, and return where everything is (a launch.TrainingResult)."""
    from ranray.train.launch import (CONFIG_FILE, TrainingResult, fit_or_explain, open_run, resolve_storage_path,
                                     run_dir_for)

    plan = preflight(cfg)
    name = run_name or resolve_run_name(cfg)
    storage = resolve_storage_path(cfg)
    run_dir = run_dir_for(storage, name)
    final = run_dir / MODEL_DIR / BACKBONE_FINAL
    resumed, tracker, run_id = open_run(cfg, name, run_dir, final, tags={"job": "pretrain"})
    started = time.perf_counter()
    with fit_or_explain("pretraining", run_dir, cfg.checkpoint.max_failures), tracker:
        result = build_trainer(cfg, plan, run_name=name, storage_path=storage, tracking_run_id=run_id).fit()
    artifacts = {k: p for k, p in (("config", run_dir / CONFIG_FILE), ("backbone", final),
                                   ("best_backbone", run_dir / MODEL_DIR / BACKBONE_BEST)) if p.exists()}
    return TrainingResult(
        run_name=name, run_dir=run_dir, metrics=dict(result.metrics or {}),
        checkpoint=result.checkpoint.path if result.checkpoint else None, final_model=artifacts.get("backbone"),
        best_model=artifacts.get("best_backbone"), tracking_uri=tracker.tracking_uri, mlflow_run_id=run_id,
        ui_command=tracker.ui_command(), elapsed_s=time.perf_counter() - started, resumed=resumed,
        artifacts=artifacts)


def describe(result: Any) -> list[tuple[str, str]]:
    """Rows of the summary table `ranray pretrain` prints."""
    m = result.metrics
    rows = [("run", result.run_name + (" (resumed)" if result.resumed else "")),
            ("epochs / steps", f"{m.get('epoch', '?')} / {m.get('step', '?')}"),
            ("train loss", f"{m.get('train_loss', float('nan')):.4f}")]
    if "verify_accuracy" in m:
        rows += [("verification accuracy (last / best)",
                  f"{m['verify_accuracy']:.4f} / {m.get('best_verify_accuracy', float('nan')):.4f}"),
                 ("TAR @ FAR=1e-3", f"{m['verify_tar_at_far']:.4f} (FAR met: {m['verify_far']:.2g})")]
    rows += [("throughput", f"{m.get('images_per_s', float('nan')):.1f} images/s"),
             ("time", f"{result.elapsed_s:.0f} s"), ("run dir", str(result.run_dir))]
    rows += [(key.replace("_", " "), str(path)) for key, path in result.artifacts.items()]
    rows += [("MLflow run", f"{result.mlflow_run_id} in {result.tracking_uri}"), ("MLflow UI", result.ui_command)]
    return rows
