"""RAN fine-tuning on facial expressions: what the training engine runs for `ranray train`.

    loaders       the protocol's training split(s) (optionally one subset) and the split it watches
                  (ranray.train.protocols: val under `clean`, test under `ran`), this rank's part
    model         the RAN or one of its ablations (model.variant; a resume has its weights already:
                  model.init_backbone is not read again)
    loss          the expression loss plus the region-biased loss on the attention weights
    validation    accuracy (per class, per subset, confusion) on the watched split, all ranks reduced;
                  under `clean` the best epoch's model goes to model/best.pt with its confusion matrix
    finish        model/final.pt, the `clean` protocol's one test of model/best.pt, a picture of the
                  learned attention, all to MLflow (the driver then logs model/best.pt as an MLflow
                  model, ranray.train.launch: no worker imports MLflow's pyfunc)

Everything else (resume, DDP, precision, the optimiser step, checkpoints, reports, tracking) is
the engine's (ranray.train.engine).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ranray.config import TrainConfig, class_names_of, from_dict
from ranray.data.loader import FaceLoader, build_loader
from ranray.data.schema import read_manifest
from ranray.evaluation import evaluate_loader, plot_split_attention
from ranray.inference import TrainedModel, load_ran, read_weights, untrained_ran
from ranray.models import build_ran, expression_loss, region_biased_loss, share_concentration
from ranray.models.losses import rb_margin_for
from ranray.models.ran import VARIANTS
from ranray.train.checkpoint import atomic_write_text, export_model
from ranray.train.engine import Built, Engine, Validation, run_worker
from ranray.train.jobs import training_tags
from ranray.model_card import card_path, write_data_card
from ranray.train.protocols import Splits, protocol_splits
from ranray.train.runtime import Runtime

log = logging.getLogger("ranray.train")

ATTENTION_FACES = 8


def train_func_per_worker(config: dict[str, Any], runtime: Runtime) -> None:
    cfg = from_dict(TrainConfig, config["config"])
    run_worker(FineTune(cfg), cfg, config, runtime)


@dataclasses.dataclass
class FineTune:
    cfg: TrainConfig
    job: str = "train"

    def __post_init__(self) -> None:
        manifest = read_manifest(self.cfg.data.dir)
        splits = protocol_splits(self.cfg.protocol, self.cfg.data)
        if splits.test_once not in manifest.get("splits", {}) or splits.test_once == splits.monitor:
            # No test split of its own (AffectNet ships train and validation only): nothing to test once.
            splits = dataclasses.replace(splits, test_once=None)
        self.splits: Splits = splits
        self.rb_loss = VARIANTS[self.cfg.model.variant].rb_loss
        self.rb_margin = rb_margin_for(manifest.get("source"), self.cfg.loss.rb_margin)

    @property
    def score_name(self) -> str:
        return f"{self.splits.monitor_prefix}_accuracy"

    @property
    def selects_best(self) -> bool:
        return self.splits.selects_best

    @property
    def tags(self) -> dict[str, str]:
        return {**training_tags(self.cfg), "rb_margin": f"{self.rb_margin:g}", "rb_space": self.cfg.loss.rb_space}

    @property
    def use_landmarks(self) -> bool:
        # Only landmark regions read them; the other modes skip the transfer.
        return self.cfg.model.region_mode == "landmark"

    def build(self, e: Engine, resumed: bool) -> Built:
        cfg = self.cfg
        train_loader, val_loader = build_loaders(cfg, self.splits, e.rank, e.world_size, e.device, e.channels_last)
        net = untrained_ran(cfg.model) if resumed else build_ran(cfg.model)  # a resume loads its weights
        return Built(train_loader, val_loader, net)

    def loss(self, e: Engine, batch: dict[str, Any]) -> torch.Tensor:
        with e.autocast():
            out = e.model(batch["images"], batch["landmarks"] if self.use_landmarks else None)
        loss = expression_loss(out.logits, batch["labels"], batch["targets"], self.cfg.loss.label_mode)
        if self.rb_loss:
            loss = loss + region_biased_loss(out.mu, self.rb_margin, self.cfg.loss.rb_space)
        if self.cfg.loss.share_entropy and out.mu.shape[1] > 1:
            loss = loss + self.cfg.loss.share_entropy * share_concentration(out.mu, out.nu)
        return loss

    def validate(self, e: Engine) -> Validation:
        result = evaluate_loader(e.net, e.val_loader, e.autocast, self.use_landmarks,
                                 num_classes=self.cfg.model.num_classes, prefix=self.splits.monitor_prefix,
                                 class_names=class_names_of(self.cfg.model))
        return Validation(result.metrics, result.metrics[self.score_name], result, self.splits.selects_best)

    def save_best(self, e: Engine, v: Validation) -> None:
        # Here, not at the top: only rank 0 draws, and matplotlib costs every rank 0.4 s of start-up.
        from ranray.train.plots import plot_confusion_matrix

        export_model(e.net.state_dict(), self.cfg, e.run_dir.best_model)
        write_data_card(e.run_dir.best_model, self.cfg.data.dir)
        plot_confusion_matrix(v.detail.confusion, v.detail.class_names, e.run_dir.confusion,
                              title=f"{e.run_name}: {self.splits.monitor}, epoch {e.state.best_epoch + 1}, "
                                    f"accuracy {e.state.best_score:.3f}")

    def chief_state(self, e: Engine) -> dict[str, Any]:
        return {}

    def rank_state(self, e: Engine) -> dict[str, Any]:
        return {}

    def load_state(self, e: Engine, state: dict[str, Any], own: dict[str, Any] | None, path: str) -> None:
        """Nothing of its own: without this rank's file (another world size) the RNG streams restart."""

    def finish(self, e: Engine) -> tuple[list[tuple[Path, str]], dict[str, Any]]:
        model_path, config_path = export_model(e.net.state_dict(), self.cfg, e.run_dir.final_model)
        write_data_card(model_path, self.cfg.data.dir)
        faces = plot_attention(self, e)
        best = e.run_dir.best_model
        artifacts = [(e.run_dir.confusion, "plots"), (faces, "plots"), (best, "model"),
                     (best.with_suffix(".yaml"), "model"), (card_path(best), "model"), (config_path, "model")]
        # The task's tags again: a run the driver opened was started without them.
        tags = {**self.tags, "final_model": str(model_path), f"best_{self.score_name}": f"{e.state.best_score:.4f}"}
        if self.splits.test_once and best.is_file():
            test = test_best_model(self, e)
            e.tracker.log_metrics(test, step=e.state.step)
            atomic_write_text(e.run_dir.test_metrics, json.dumps(test))
            tags["test_accuracy"] = f"{test['test_accuracy']:.4f}"
        return artifacts, tags


def build_loaders(cfg: TrainConfig, splits: Splits, rank: int, world_size: int, device: torch.device,
                  channels_last: bool) -> tuple[FaceLoader, FaceLoader]:
    common = dict(rank=rank, world_size=world_size, seed=cfg.run.seed, backend=cfg.data.loader, device=device,
                  num_threads=cfg.data.num_threads, channels_last=channels_last,
                  subset=cfg.data.train_subset)
    train_loader = build_loader(cfg.data.dir, splits.train, batch_size=cfg.batch_size, training=True,
                                augment=cfg.data.augment, **common)
    val_loader = build_loader(cfg.data.dir, splits.monitor, batch_size=cfg.batch_size, training=False,
                              **common)
    if len(train_loader) == 0:
        raise ValueError(f"{cfg.data.dir} split '{splits.train}' (subset {cfg.data.train_subset}) has "
                         f"fewer rows than {world_size} workers x batch_size {cfg.batch_size}")
    return train_loader, val_loader


@torch.no_grad()
def test_best_model(task: FineTune, e: Engine) -> dict[str, float]:
    """The `clean` protocol's one look at the test split, with the model chosen on val (rank 0)."""
    cfg = task.cfg
    net = load_ran(cfg.model, read_weights(e.run_dir.best_model)).to(e.device)
    loader = build_loader(cfg.data.dir, task.splits.test_once, batch_size=cfg.batch_size, training=False, rank=0,
                          world_size=1, seed=cfg.run.seed, backend=cfg.data.loader, device=e.device,
                          num_threads=cfg.data.num_threads, channels_last=e.channels_last,
                          subset=cfg.data.train_subset)
    metrics = evaluate_loader(net, loader, e.autocast, task.use_landmarks, num_classes=cfg.model.num_classes,
                              prefix="test", reduce=False, class_names=class_names_of(cfg.model)).metrics
    log.info("test (%s, best epoch %d): accuracy %.4f on %d faces", task.splits.test_once, e.state.best_epoch + 1,
             metrics["test_accuracy"], metrics["test_samples"])
    return metrics


@torch.no_grad()
def plot_attention(task: FineTune, e: Engine) -> Path:
    """Clean and occluded faces of the watched split, each region's share of the decision on it."""
    trained = TrainedModel(e.net, task.cfg, source=str(e.run_dir.final_model))
    was_training = e.net.training
    e.net.eval()
    with e.autocast():
        path = plot_split_attention(trained, e.val_loader, ATTENTION_FACES // 2, e.run_dir.attention)
    e.net.train(was_training)
    return path
