"""Face-recognition pretraining: iResNet + margin softmax with Partial FC, on the training engine.

Driver side: `preflight` checks what can fail without workers and resolves the `PretrainPlan`
(class count, pairs file) that launch.run_pretraining hands to every worker. Worker side, what the
engine (ranray.train.engine) runs for `ranray pretrain`:

    loaders       the train split; the val split when there is a pairs file
    model         the backbone (create_model) under DDP; PartialFC outside DDP, holding this rank's
                  shard of class centres, with its own optimizer (optim.name: PartialFCSGD on the sampled
                  rows, or AdamW as insightface), state per rank
    loss          margin softmax over the sampled centres (matmul under autocast, the rest float32)
    validation    verification on the pairs: each rank embeds its part, every rank scores them all;
                  the best epoch's backbone goes to model/backbone_best.pt
    finish        model/backbone.pt, a plain insightface-keyed state_dict

A checkpoint's rank<r>.pt carries the rank's class-centre shard, its optimizer state (SGD's
momentum, or AdamW's moments: the head gets optim.name like the backbone) and scheduler. A resume
on the same world size loads its own file; on another one each new rank re-cuts its class range
from the old ranks' files that overlap it (partial_fc.load_resharded; docs/ELASTIC.md). A
checkpoint of another class count is refused, naming both, before any step.

Gradient scale: the loss is the mean over the global batch and every rank backpropagates it, so
each rank's embedding gradient is exact; DDP then averages the backbone's gradients over the W
ranks, so PartialFC's gather hands back W x the gradient (embedding_grad_scale), as insightface
does. The centre gradients need no correction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ranray.config import ConfigError, PretrainConfig, from_dict
from ranray.models.partial_fc import (PartialFC, make_optimizer, overlapping_ranks, reshard_optimizer_state,
                                     shard_range)
from ranray.train import preflight as preflight_checks
from ranray.train.checkpoint import export_model
from ranray.train.collectives import all_gather
from ranray.train.engine import Built, Engine, Validation, run_worker
from ranray.train.optim import lr_scheduler
from ranray.train.runtime import Runtime
from ranray.train.summary import summary_rows
from ranray.train.verification import Pair, VerificationResult, evaluate_verification, read_pairs

log = logging.getLogger("ranray.pretrain")

PAIRS_FILE = "pairs.txt"  # `ranray prepare` copies an identity set's pairs file beside the shards


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
    manifest = preflight_checks.prepared_dataset(cfg, "a prepared identity dataset")
    rows = manifest.get("splits", {}).get(cfg.data.train_split, {}).get("rows", 0)
    preflight_checks.rows_per_step(cfg, cfg.data.train_split, rows)
    num_classes = _check_classes(cfg, manifest)
    _check_backbone(cfg)
    preflight_checks.hardware(cfg)
    return PretrainPlan(num_classes, _resolve_pairs(cfg))


def _check_classes(cfg: PretrainConfig, manifest: dict[str, Any]) -> int:
    """The classifier size: the dataset's identity count; a different num_classes is refused."""
    have = int(manifest.get("num_classes") or 0)
    if have <= 0:
        raise ConfigError(f"config key 'data.dir': {cfg.data.dir} records no num_classes (not an identity set?)")
    if cfg.num_classes and cfg.num_classes != have:
        raise ConfigError(f"config key 'num_classes' is {cfg.num_classes} but {cfg.data.dir} has {have} training "
                          "identities; leave it 0 to take the dataset's")
    if have < cfg.scaling.max_workers:
        raise ConfigError(f"config key 'scaling.num_workers': {cfg.scaling.max_workers} ranks for {have} classes; "
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
# The task
# ---------------------------------------------------------------------------------------------


def train_func_per_worker(config: dict[str, Any], runtime: Runtime) -> None:
    cfg = from_dict(PretrainConfig, config["config"])
    run_worker(Pretrain(cfg, PretrainPlan(**config["plan"])), cfg, config, runtime)


@dataclass
class Pretrain:
    cfg: PretrainConfig
    plan: PretrainPlan
    job: str = "pretrain"
    score_name: str = "verify_accuracy"
    tags: dict[str, str] = field(default_factory=dict)
    pairs: list[Pair] = field(default_factory=list)
    head: PartialFC | None = None  # this rank's class centres, outside DDP
    head_optimizer: Any = None  # PartialFCSGD or PartialFCAdamW
    head_scheduler: Any = None

    def build(self, e: Engine, resumed: bool) -> Built:
        from ranray.models import create_model

        cfg, plan = self.cfg, self.plan
        train_loader, val_loader = build_loaders(cfg, plan, e.rank, e.world_size, e.device, e.channels_last)
        self.pairs = read_pairs(plan.pairs_file) if plan.pairs_file else []
        backbone = create_model(cfg.backbone, num_features=cfg.partial_fc.embedding_size)
        self.head = PartialFC.from_config(plan.num_classes, cfg.partial_fc, cfg.margin, seed=cfg.run.seed,
                                          embedding_grad_scale=float(e.world_size)).to(e.device)
        self.head_optimizer = make_optimizer(self.head, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay,
                                             name=cfg.optim.name)
        self.head_scheduler = lr_scheduler(self.head_optimizer, steps_per_epoch=len(train_loader),
                                           epochs=cfg.epochs, o=cfg.optim)
        return Built(train_loader, val_loader, backbone, [(self.head_optimizer, self.head_scheduler)])

    def loss(self, e: Engine, batch: dict[str, Any]) -> torch.Tensor:
        with e.autocast():
            embeddings = e.model(batch["images"])
            return self.head(embeddings, batch["labels"])  # matmul under autocast; margin and softmax float32

    def validate(self, e: Engine) -> Validation | None:
        if e.val_loader is None:
            return None
        wanted = {k for p in self.pairs for k in (p.a, p.b)}
        mine = embed_keys(e.net, e.val_loader, e.autocast, wanted)
        result = evaluate_verification(gather_embeddings(mine), self.pairs)
        return Validation(verification_metrics(result), result.accuracy, result)

    def save_best(self, e: Engine, v: Validation) -> None:
        export_backbone(e, e.run_dir.best_backbone)

    def chief_state(self, e: Engine) -> dict[str, Any]:
        return {"num_classes": self.plan.num_classes}

    def rank_state(self, e: Engine) -> dict[str, Any]:
        return {"partial_fc": self.head.state_dict(), "partial_fc_optimizer": self.head_optimizer.state_dict(),
                "partial_fc_scheduler": self.head_scheduler.state_dict()}

    def load_state(self, e: Engine, state: dict[str, Any], own: dict[str, Any] | None, path: str) -> None:
        saved_classes = state.get("num_classes")
        if saved_classes != self.plan.num_classes:
            raise ConfigError(f"config key 'num_classes': checkpoint {path} was trained on {saved_classes} classes, "
                              f"this run has {self.plan.num_classes}; start a new run (run.name) for another "
                              "identity set")
        if state.get("world_size") == e.world_size and own is not None:
            self.head.load_state_dict(own["partial_fc"])  # refuses a shard of other classes
            self.head_optimizer.load_state_dict(own["partial_fc_optimizer"])
            self.head_scheduler.load_state_dict(own["partial_fc_scheduler"])
            return
        old_world = int(state["world_size"])
        needed = overlapping_ranks(self.plan.num_classes, old_world, self.head.class_start, self.head.class_end)
        parts = [e.runtime.read_rank_state(path, r) for r in needed]
        self.head.load_resharded([p["partial_fc"] for p in parts])
        ranges = [shard_range(self.plan.num_classes, old_world, r) for r in needed]
        self.head_optimizer.load_state_dict(reshard_optimizer_state(
            [p["partial_fc_optimizer"] for p in parts], ranges, self.head.class_start, self.head.class_end))
        self.head_scheduler.load_state_dict(parts[0]["partial_fc_scheduler"])  # the same on every rank
        log.info("rank %d: classes [%d, %d) re-cut from ranks %s of the %d-worker checkpoint %s", e.rank,
                 self.head.class_start, self.head.class_end, needed, old_world, path)

    def finish(self, e: Engine) -> tuple[list[tuple[Path, str]], dict[str, Any]]:
        path = export_backbone(e, e.run_dir.backbone)
        artifacts = [(path, "model"), (path.with_suffix(".yaml"), "model"), (e.run_dir.best_backbone, "model")]
        return artifacts, {"backbone": str(path), "num_classes": self.plan.num_classes}


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


def export_backbone(e: Engine, path: Path) -> Path:
    """A plain state_dict with insightface's keys: `ranray train model.init_backbone=` loads it strictly."""
    return export_model(e.net.state_dict(), e.cfg, path)[0]


def verification_metrics(result: VerificationResult) -> dict[str, float]:
    return {"verify_accuracy": result.accuracy, "verify_accuracy_std": result.accuracy_std,
            "verify_threshold": result.threshold, "verify_tar_at_far": result.tar_at_far,
            "verify_far": result.far_achieved}


# ---------------------------------------------------------------------------------------------
# Verification: each rank embeds its part of the val split, every rank scores the pairs
# ---------------------------------------------------------------------------------------------


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
    return {k: v for part in all_gather(mine) for k, v in (part or {}).items()}


# ---------------------------------------------------------------------------------------------
# The summary `ranray pretrain` prints
# ---------------------------------------------------------------------------------------------


def describe(result: Any) -> list[tuple[str, str]]:
    """Rows of the summary table `ranray pretrain` prints."""
    m = result.metrics
    scores = []
    if "verify_accuracy" in m:
        scores += [("verification accuracy (last / best)",
                    f"{m['verify_accuracy']:.4f} / {m.get('best_verify_accuracy', float('nan')):.4f}"),
                   ("TAR @ FAR=1e-3", f"{m['verify_tar_at_far']:.4f} (FAR met: {m['verify_far']:.2g})")]
    return summary_rows(result, [], scores)
