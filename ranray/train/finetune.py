"""RAN fine-tuning on facial expressions: what the training engine runs for `ranray train`.

    loaders       the train split (optionally one subset of it) and the val split, this rank's part
    model         the RAN (a resume has its weights already: model.init_backbone is not read again)
    loss          the expression loss plus the region-biased loss on the attention weights
    validation    accuracy (per class, per subset, confusion) on the val split, all ranks reduced;
                  the best epoch's model goes to model/best.pt with its confusion matrix
    finish        model/final.pt and a picture of the learned attention, both to MLflow

Everything else (resume, DDP, precision, the optimiser step, checkpoints, reports, tracking) is
the engine's (ranray.train.engine).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from ranray.config import CLASS_NAMES, TrainConfig, from_dict
from ranray.data.loader import FaceLoader, build_loader
from ranray.models import build_ran, expression_loss, region_biased_loss
from ranray.train.checkpoint import export_model
from ranray.train.engine import Built, Engine, Validation, run_worker
from ranray.train.evaluate import evaluate_loader
from ranray.train.plots import plot_attention_faces, plot_confusion_matrix

log = logging.getLogger("ranray.train")

ATTENTION_FACES = 8


def train_func_per_worker(config: dict[str, Any]) -> None:
    cfg = from_dict(TrainConfig, config["config"])
    run_worker(FineTune(cfg), cfg, config)


@dataclasses.dataclass
class FineTune:
    cfg: TrainConfig
    job: str = "train"
    score_name: str = "val_accuracy"

    @property
    def tags(self) -> dict[str, str]:
        return {"train_subset": self.cfg.data.train_subset}

    @property
    def use_landmarks(self) -> bool:
        # Only landmark regions read them; the other modes skip the transfer.
        return self.cfg.model.region_mode == "landmark"

    def build(self, e: Engine, resumed: bool) -> Built:
        cfg = self.cfg
        train_loader, val_loader = build_loaders(cfg, e.rank, e.world_size, e.device, e.channels_last)
        net = build_ran(dataclasses.replace(cfg.model, init_backbone="") if resumed else cfg.model)
        return Built(train_loader, val_loader, net)

    def loss(self, e: Engine, batch: dict[str, Any]) -> torch.Tensor:
        with e.autocast():
            out = e.model(batch["images"], batch["landmarks"] if self.use_landmarks else None)
        return (expression_loss(out.logits, batch["labels"], batch["targets"], self.cfg.loss.label_mode)
                + region_biased_loss(out.mu, self.cfg.loss.rb_margin))

    def validate(self, e: Engine) -> Validation:
        result = evaluate_loader(e.net, e.val_loader, e.autocast, self.use_landmarks,
                                 num_classes=self.cfg.model.num_classes)
        return Validation(result.metrics, result.metrics["val_accuracy"], result)

    def save_best(self, e: Engine, v: Validation) -> None:
        export_model(e.net.state_dict(), self.cfg, e.run_dir.best_model)
        plot_confusion_matrix(v.detail.confusion, v.detail.class_names, e.run_dir.confusion,
                              title=f"{e.run_name}: validation, epoch {e.state.best_epoch + 1}, "
                                    f"accuracy {e.state.best_score:.3f}")

    def chief_state(self, e: Engine) -> dict[str, Any]:
        return {}

    def rank_state(self, e: Engine) -> dict[str, Any]:
        return {}

    def load_state(self, e: Engine, state: dict[str, Any], own: dict[str, Any] | None, path: str) -> None:
        """Nothing of its own: without this rank's file (another world size) the RNG streams restart."""

    def finish(self, e: Engine) -> tuple[list[tuple[Path, str]], dict[str, Any]]:
        model_path, config_path = export_model(e.net.state_dict(), self.cfg, e.run_dir.final_model)
        faces = plot_attention(self, e)
        best = e.run_dir.best_model
        artifacts = [(e.run_dir.confusion, "plots"), (faces, "plots"), (best, "model"),
                     (best.with_suffix(".yaml"), "model"), (config_path, "model")]
        return artifacts, {"final_model": str(model_path), "best_val_accuracy": f"{e.state.best_score:.4f}"}


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


@torch.no_grad()
def plot_attention(task: FineTune, e: Engine) -> Path:
    """A few validation faces with their regions and the learned mu / nu written on them."""
    net = e.net
    net.eval()
    e.val_loader.set_epoch(0)
    batch = next(iter(e.val_loader))
    n = min(ATTENTION_FACES, len(batch["keys"]))
    images = batch["images"][:n]
    landmarks = batch["landmarks"][:n] if task.use_landmarks else None
    with e.autocast():
        out = net(images, landmarks)
    boxes = net.region_boxes(images, landmarks) * images.shape[-1]
    return plot_attention_faces(images, boxes, out.mu, out.nu, out.logits.argmax(1).tolist(),
                                batch["labels"][:n].tolist(), e.run_dir.attention,
                                class_names=CLASS_NAMES[: task.cfg.model.num_classes])
