"""A trained RAN, loaded one way from wherever it is, and its answer for aligned faces.

    load_trained_model(source)   an exported model (model/best.pt, model/final.pt + the .yaml beside
                                 it), a training checkpoint folder (state.pt, config inside), a run
                                 directory (its best model), or a registered MLflow model
                                 (models:/NAME/VERSION, /latest, @alias: ranray.model_registry)
                                 -> TrainedModel
    load_ran(model_cfg, state)   the RAN of a config with trained weights in it (what evaluation,
                                 prediction and fine-tuning's test of its best model share)
    read_weights(path)           a weights file, verified against its manifest when it has one,
                                 always with torch.load(weights_only=True)
    face_tensor / classify_aligned   the model's input for aligned faces; class, probabilities
                                 and attention per region of aligned faces (prediction and the
                                 MLflow model share it)

Imports neither Ray, MLflow, DALI nor dlib: a registry download imports MLflow when it happens.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ranray.config import ModelConfig, TrainConfig, class_names_of, from_dict
from ranray.data.schema import FACE_SIZE, NUM_LANDMARKS, PIXEL_MEAN, PIXEL_STD, normalize
from ranray.model_card import read_data_card
from ranray.model_registry import download_weights, is_model_uri
from ranray.models import RegionAttentionNetwork, build_ran
from ranray.models.ran import LANDMARK_GROUPS
from ranray.pretrained import DEFAULT_MODEL, SHIPPED
from ranray.train.checkpoint import STATE_FILE, CheckpointError, load_checkpoint, manifest_path, resolve_state_file
from ranray.run_dir import RunDir


@dataclass
class TrainedModel:
    net: RegionAttentionNetwork
    cfg: TrainConfig
    source: str  # what was loaded: the weights file, or the models:/ URI
    data: dict[str, Any] = field(default_factory=dict)  # what it was trained on (ranray.model_card)
    weights: Path | None = None  # the local weights file (None when it came from the registry)

    @property
    def class_names(self) -> tuple[str, ...]:
        return class_names_of(self.cfg.model)

    @property
    def uses_landmarks(self) -> bool:
        return self.cfg.model.region_mode == "landmark"

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.of(self.cfg, self.data)


# FER2013's faces are 48x48 grey images: a model trained on them has never seen colour, so a
# photograph is made grey the same way before it sees it.
GREY_SOURCES = frozenset({"ferplus"})
# ITU-R BT.601 luma, what PIL's convert("L") uses; the weights sum to 1, so it commutes with normalize.
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Preprocessing:
    """What a photograph goes through before this model sees it, as its training faces did."""

    detector: str  # for photographs; the training faces' own detector is in the data card
    landmarks: int
    align_template: str
    aligned_size: int  # the aligned face; the model resamples each region to input_size
    input_size: int
    colour: str  # "grey" (luma, repeated in 3 channels) or "rgb"
    mean: float  # model input = (pixel - mean) / std, pixels 0..255
    std: float

    @classmethod
    def of(cls, cfg: TrainConfig, card: Mapping[str, Any]) -> Preprocessing:
        return cls(detector="dlib HOG", landmarks=NUM_LANDMARKS,
                   # Datasets prepared before the template became a choice used insightface's.
                   align_template=card.get("align_template", "insightface"), aligned_size=FACE_SIZE,
                   input_size=cfg.model.input_size,
                   colour="grey" if card.get("source") in GREY_SOURCES else "rgb",
                   mean=float(PIXEL_MEAN), std=float(PIXEL_STD))

    @property
    def grey(self) -> bool:
        return self.colour == "grey"

    def rows(self) -> list[tuple[str, str]]:
        return [("detector", f"{self.detector}, {self.landmarks} landmarks"),
                ("alignment", f"similarity to the {self.align_template} template, {self.aligned_size}x"
                              f"{self.aligned_size}; regions resampled to {self.input_size}"),
                ("colour", self.colour), ("normalisation", f"(x - {self.mean:g}) / {self.std:g}")]


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_trained_model(source: str | Path | None = None, device: str | torch.device = "cpu",
                       tracking_uri: str | None = None) -> TrainedModel:
    """A file, folder or run directory; a shipped model's name (ranray.pretrained; None: the
    default one); or models:/NAME/VERSION (also /latest, @alias) from the MLflow registry at
    `tracking_uri` (default MLFLOW_TRACKING_URI)."""
    source = DEFAULT_MODEL if source is None else source
    if str(source) in SHIPPED:
        return _load_file(SHIPPED[str(source)].weights, device)
    if is_model_uri(source):
        return _load_registered(str(source), device, tracking_uri)
    return _load_file(resolve_weights(source), device)


def resolve_weights(path: str | Path) -> Path:
    """The weights file behind what a user may point at: a file, a checkpoint folder, a run dir."""
    p = Path(path)
    candidates = [p, p / STATE_FILE, RunDir(p).best_model, RunDir(p).final_model]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"no model at {p}: expected a .pt file, a checkpoint folder with {STATE_FILE}, "
                            "or a run directory with model/best.pt")


def _load_file(weights: Path, device: str | torch.device) -> TrainedModel:
    state = read_weights(weights)
    if "model" in state and "config" in state:  # a training checkpoint carries its config
        cfg_dict, model_state = state["config"], state["model"]
    else:
        cfg_file = weights.with_suffix(".yaml")
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{weights} is a bare state_dict and {cfg_file} (its config) is missing")
        cfg_dict, model_state = yaml.safe_load(cfg_file.read_text()), state
    cfg = from_dict(TrainConfig, cfg_dict)
    net = load_ran(cfg.model, model_state)
    return TrainedModel(net=net.to(device).eval(), cfg=cfg, source=str(weights),
                        data=read_data_card(weights, cfg), weights=weights)


def _load_registered(uri: str, device: str | torch.device, tracking_uri: str | None) -> TrainedModel:
    """The registered model's folder is downloaded to a temporary folder and read as a file is."""
    with tempfile.TemporaryDirectory(prefix="ranray-model-") as tmp:
        weights, version = download_weights(uri, tracking_uri, tmp)
        trained = _load_file(weights, device)
    trained.source, trained.weights = f"{uri} (run {version.run_id})", None
    return trained


def load_ran(model: ModelConfig, state: Mapping[str, torch.Tensor]) -> RegionAttentionNetwork:
    """The RAN of `model` holding the trained `state` (strict: every key, every shape)."""
    net = untrained_ran(model)
    net.load_state_dict(state, strict=True)
    return net


def untrained_ran(model: ModelConfig) -> RegionAttentionNetwork:
    """The RAN that trained weights are loaded into: they already hold the fine-tuned backbone, so
    model.init_backbone is not read again."""
    return build_ran(replace(model, init_backbone=""))


def read_weights(path: str | Path) -> dict[str, Any]:
    """The state dict in `path`. Files from this project carry a manifest and are verified; a copy
    without one (e.g. an MLflow artifact download) is still read safely with weights_only."""
    path = Path(path)
    if manifest_path(resolve_state_file(path)).is_file():
        return load_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refusals are pickle errors of several types
        raise CheckpointError(f"{path} could not be loaded with weights_only=True: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


# ---------------------------------------------------------------------------------------------
# Aligned faces in, classes and attention out
# ---------------------------------------------------------------------------------------------


@dataclass
class FaceResult:
    """The RAN's answer for one aligned face."""

    label: str
    probabilities: dict[str, float]
    attention: list[dict[str, Any]]  # per region: name, box (aligned face pixels), mu, nu


_FIXED_NAMES = ("whole face", "top-left", "top-right", "centre-bottom", "centre 0.90", "centre 0.85")
# In eval mode random regions are the fixed boxes (ranray.models.ran), so they share names.
REGION_NAMES: dict[str, tuple[str, ...]] = {
    "fixed": _FIXED_NAMES,
    "random": _FIXED_NAMES,
    "landmark": ("whole face", *(name for name, _ in LANDMARK_GROUPS)),
}


def region_names(mode: str, k: int) -> list[str]:
    return list(REGION_NAMES[mode][:k])


def face_tensor(face: Any) -> torch.Tensor:
    """(1, 3, S, S) model input for one aligned RGB face (a PIL image or an (S, S, 3) array)."""
    return faces_tensor(np.asarray(face)[None])


def faces_tensor(faces: np.ndarray) -> torch.Tensor:
    """(N, 3, S, S) float32 model input for (N, S, S, 3) aligned RGB faces, normalised as the
    loaders do."""
    return normalize(torch.from_numpy(np.asarray(faces, dtype=np.float32)).permute(0, 3, 1, 2))


def to_grey(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) RGB -> the same shape, every channel the BT.601 luma (normalised or not)."""
    luma = torch.einsum("nchw,c->nhw", images, images.new_tensor(LUMA))
    return luma.unsqueeze(1).expand_as(images).contiguous()


@torch.no_grad()
def classify_aligned(trained: TrainedModel, images: torch.Tensor,
                     landmarks: torch.Tensor | None = None) -> list[FaceResult]:
    """Class, probabilities and per-region attention of aligned faces: images (N, 3, S, S)
    normalised (face_tensor), landmarks (N, 68, 2) aligned pixels (needed by landmark regions)."""
    if trained.uses_landmarks and landmarks is None:
        raise ValueError("this model cuts its regions at landmarks (model.region_mode=landmark): "
                         "pass the 68 aligned landmarks of every face")
    landmarks = landmarks if trained.uses_landmarks else None
    if trained.preprocessing.grey:
        images = to_grey(images)
    out = trained.net(images, landmarks)
    probs = torch.softmax(out.logits.float(), 1).tolist()
    boxes = (trained.net.region_boxes(images, landmarks) * images.shape[-1]).tolist()
    names = region_names(trained.cfg.model.region_mode, len(boxes[0]))
    classes = trained.class_names
    results = []
    for p, b, mu, nu in zip(probs, boxes, out.mu.tolist(), out.nu.tolist()):
        attention = [{"region": n, "box": [round(v, 1) for v in box], "mu": float(m), "nu": float(v)}
                     for n, box, m, v in zip(names, b, mu, nu)]
        results.append(FaceResult(label=classes[int(np.argmax(p))],
                                  probabilities={c: round(x, 4) for c, x in zip(classes, p)}, attention=attention))
    return results
