"""Region Attention Network (Wang et al., "Region Attention Networks for Pose and Occlusion Robust
Facial Expression Recognition", IEEE TIP 2020) on an iResNet backbone.

    images (B,3,H,W) -> K boxes per face (region 0 = whole face) -> bilinear crops (B*K,3,S,S)
    -> ONE backbone call -> F (B,K,d)
    -> mu_i = sigmoid(alpha(F_i)),  F_m = sum mu_i F_i / sum mu_i            (self-attention)
    -> nu_i = sigmoid(beta([F_i;F_m])), P = sum mu_i nu_i [F_i;F_m] / sum mu_i nu_i  (relation-attention)
    -> logits = classifier(dropout(P))

Boxes are normalised (x0, y0, x1, y1) in [0, 1] of the image. Region modes live in REGION_MODES:

- fixed: the paper's fixed-position cropping as we read it: top-left, top-right and centre-bottom
  squares of side `crop_frac` (0.75 in the paper; ModelConfig's default is 0.6), then two centred
  crops at 0.9 and 0.85 of the face. K <= 6 takes the first K-1 of these in that order.
- landmark: squares of side `crop_frac` centred on 68-point landmark groups (image-left eye,
  image-right eye, nose tip, mouth, brows, the two mouth corners, chin), moved inside the image;
  K <= 9 takes the first K-1. Landmarks are (x, y) in the input image's pixels, pixel centres at
  integer coordinates (dlib's convention).
- random: during training, per face and region, a square of side crop_frac * U(0.8, 1.2) at a
  uniform position inside the image; in eval mode the fixed boxes, so K <= 6. With the RB loss it
  trained to chance in the occlusion study (docs/OCCLUSION.md); training warns about it.

Region features live in REGION_FEATURES (model.region_features):

- crops (the paper's): every box is resampled from the image to the backbone's input size and all
  B*K crops go through the whole backbone in one call: K backbone passes a face.
- pooled: the whole face goes through the backbone's stages once; every box is resampled (bilinear,
  one sample at each output cell's centre: RoIAlign with one sample a bin) from the last stage's map to
  that map's own size, and the backbone's head (BN, flatten, fc, BN) turns each into a region feature.
  The whole-face box reads the map back unchanged, so region 0 is exactly the whole-face network's
  feature; a face costs one backbone pass plus K heads. Region features from a shared feature map are
  pACNN / gACNN's way (Li et al., IEEE TIP 2019); unlike crops, a region's cells have seen the whole face
  through their receptive fields (docs/REPRODUCE.md).

Batch folding changes one thing against the reference code's loop over regions: in training mode
the backbone's BatchNorm sees statistics over all B*K crops together instead of per region.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ranray.config import ConfigError, ModelConfig, check_model
from ranray.models.iresnet import load_backbone_state
from ranray.models.registry import create_model


class RANOutput(NamedTuple):
    logits: torch.Tensor  # (B, C) float32
    mu: torch.Tensor  # (B, K) self-attention weights, region 0 the whole face
    nu: torch.Tensor  # (B, K) relation-attention weights
    features: torch.Tensor  # (B, 2d) P_RAN


# ---------------------------------------------------------------------------------------------
# Region modes: each returns the K-1 part boxes (B, K-1, 4); the whole face is added in front.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionMode:
    boxes: Callable[["RegionAttentionNetwork", torch.Tensor, torch.Tensor | None], torch.Tensor]
    max_regions: int  # K, whole face included
    smallest_side: Callable[[float], float]  # crop_frac -> the smallest box side it can draw


def fixed_layout(crop_frac: float) -> torch.Tensor:
    c = crop_frac
    return torch.tensor([
        [0.0, 0.0, c, c],  # top-left
        [1.0 - c, 0.0, 1.0, c],  # top-right
        [(1.0 - c) / 2, 1.0 - c, (1.0 + c) / 2, 1.0],  # centre-bottom
        [0.05, 0.05, 0.95, 0.95],  # centred, 0.9 of the face
        [0.075, 0.075, 0.925, 0.925],  # centred, 0.85 of the face
    ])


# 68-point (iBUG / dlib) index groups; a region is centred on the mean of its group.
LANDMARK_GROUPS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("eye_image_left", tuple(range(36, 42))),
    ("eye_image_right", tuple(range(42, 48))),
    ("nose_tip", tuple(range(30, 36))),
    ("mouth", tuple(range(48, 68))),
    ("brows", tuple(range(17, 27))),
    ("mouth_corner_image_left", (48,)),
    ("mouth_corner_image_right", (54,)),
    ("chin", (8,)),
)


def landmark_weights() -> torch.Tensor:
    """(G, 68) averaging matrix: one matmul turns (B, 68, 2) landmarks into (B, G, 2) group centres."""
    w = torch.zeros(len(LANDMARK_GROUPS), 68)
    for g, (_, idx) in enumerate(LANDMARK_GROUPS):
        w[g, list(idx)] = 1.0 / len(idx)
    return w


def square_boxes(centres: torch.Tensor, side: torch.Tensor | float) -> torch.Tensor:
    """(..., 2) normalised centres -> (..., 4) boxes of the given side, shifted to lie inside [0, 1]."""
    side = torch.as_tensor(side, dtype=centres.dtype, device=centres.device).expand(centres.shape[:-1])
    lo = torch.minimum(torch.clamp(centres - side[..., None] / 2, min=0.0), 1.0 - side[..., None])
    return torch.cat([lo, lo + side[..., None]], dim=-1)


def _fixed_boxes(net: "RegionAttentionNetwork", images: torch.Tensor,
                 landmarks: torch.Tensor | None) -> torch.Tensor:
    k = net.cfg.num_regions - 1
    return net.fixed_boxes[:k].expand(images.shape[0], k, 4)


def _landmark_boxes(net: "RegionAttentionNetwork", images: torch.Tensor,
                    landmarks: torch.Tensor | None) -> torch.Tensor:
    if landmarks is None:
        raise ValueError("region_mode 'landmark' needs landmarks of shape (B, 68, 2) in image pixels; got none")
    h, w = images.shape[-2:]
    centres = net.landmark_weights[: net.cfg.num_regions - 1] @ landmarks.float() + 0.5
    centres = torch.stack([centres[..., 0] / w, centres[..., 1] / h], dim=-1)
    return square_boxes(centres, net.cfg.crop_frac)


def _random_boxes(net: "RegionAttentionNetwork", images: torch.Tensor,
                  landmarks: torch.Tensor | None) -> torch.Tensor:
    if not net.training:
        return _fixed_boxes(net, images, landmarks)
    b, k = images.shape[0], net.cfg.num_regions - 1
    u = torch.rand(b, k, 3, device=images.device)
    side = (net.cfg.crop_frac * (RANDOM_SIDE_MIN + 0.4 * u[..., 0])).clamp(max=1.0)
    lo = u[..., 1:] * (1.0 - side[..., None])
    return torch.cat([lo, lo + side[..., None]], dim=-1)


RANDOM_SIDE_MIN = 0.8  # a random box's side is crop_frac * U(RANDOM_SIDE_MIN, 1.2)

REGION_MODES: dict[str, RegionMode] = {
    "fixed": RegionMode(_fixed_boxes, max_regions=1 + 5, smallest_side=lambda c: min(c, 0.85)),
    "landmark": RegionMode(_landmark_boxes, max_regions=1 + len(LANDMARK_GROUPS), smallest_side=lambda c: c),
    # eval falls back to the fixed boxes
    "random": RegionMode(_random_boxes, max_regions=1 + 5, smallest_side=lambda c: RANDOM_SIDE_MIN * c),
}


def crop_regions(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear crops: images (B,C,H,W), boxes (B,K,4) normalised -> (B,K,C,size,size).

    All K grids are stacked along the grid's height so one grid_sample reads each image once,
    without materialising K copies of it. With align_corners=False a [0,0,1,1] box at H == size
    samples exactly the pixel centres, i.e. returns the image unchanged.
    """
    b, k = boxes.shape[:2]
    t = (torch.arange(size, device=images.device, dtype=torch.float32) + 0.5) / size
    x = boxes[..., 0:1] + t * (boxes[..., 2:3] - boxes[..., 0:1])  # (B, K, S)
    y = boxes[..., 1:2] + t * (boxes[..., 3:4] - boxes[..., 1:2])
    grid = torch.stack(torch.broadcast_tensors(x[:, :, None, :], y[:, :, :, None]), dim=-1)  # (B,K,S,S,2)
    grid = (grid * 2.0 - 1.0).reshape(b, k * size, size, 2)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.view(b, images.shape[1], k, size, size).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Region features: boxes (B, K, 4) -> features (B, K, d)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionFeatures:
    features: Callable[["RegionAttentionNetwork", torch.Tensor, torch.Tensor], torch.Tensor]
    code: int  # what a state_dict records (the `region_features` buffer); never reuse a retired code


def _crop_features(net: "RegionAttentionNetwork", images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    crops = net.resample(images, boxes)
    b, k = crops.shape[:2]
    return net.backbone(crops.flatten(0, 1)).view(b, k, -1)


def _pooled_features(net: "RegionAttentionNetwork", images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    b, k = boxes.shape[:2]
    face = net.resample(images, net.whole_face_box.expand(b, 1, 4))[:, 0]
    fmap = net.backbone.forward_features(face)
    with torch.autocast(images.device.type, enabled=False):
        cells = crop_regions(fmap.float(), boxes, fmap.shape[-1])  # each box at the map's own size
    return net.backbone.forward_head(cells.flatten(0, 1)).view(b, k, -1)


REGION_FEATURES: dict[str, RegionFeatures] = {
    "crops": RegionFeatures(_crop_features, code=0),
    "pooled": RegionFeatures(_pooled_features, code=1),
}
FEATURE_STRIDE = 16  # image pixels per cell of an iResNet's last map


def check_pooled_boxes(cfg: ModelConfig) -> None:
    """pooled: every box must cover at least one cell of the last feature map (input_size / 16 a side)."""
    cells = cfg.input_size // FEATURE_STRIDE
    smallest_side = REGION_MODES[cfg.region_mode].smallest_side
    side = smallest_side(cfg.crop_frac)
    if side * cells >= 1.0:
        return
    # Rounded up to 3 decimals, so that the figure given works; None where no crop_frac does.
    frac = math.ceil(1000 * cfg.crop_frac / (side * cells)) / 1000
    frac_fix = f"crop_frac {frac:g}, " if frac <= 1.0 and smallest_side(frac) * cells >= 1.0 else ""
    size_fix = FEATURE_STRIDE * math.ceil(1.0 / side)  # the input side whose map gives the box one cell
    raise ConfigError(
        f"config key 'model.crop_frac': with model.region_features=pooled every region is read from the "
        f"backbone's last feature map ({cells}x{cells} cells at model.input_size {cfg.input_size}); region_mode "
        f"'{cfg.region_mode}' at crop_frac {cfg.crop_frac:g} draws boxes {side * cells:.2f} cells wide, under one "
        f"cell. The smallest sizes that work: {frac_fix}model.input_size {size_fix} (or model.region_features=crops)")


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One row of the paper's ablation table, as a model."""

    regions: bool  # False: the whole face only (K = 1), the baseline every RAN figure is set against
    relation_attention: bool  # False: P = F_m, the self-attention pooling alone
    rb_loss: bool


VARIANTS: dict[str, Variant] = {
    "ran": Variant(regions=True, relation_attention=True, rb_loss=True),
    "whole_face": Variant(regions=False, relation_attention=True, rb_loss=False),
    "no_rb_loss": Variant(regions=True, relation_attention=True, rb_loss=False),
    "no_relation": Variant(regions=True, relation_attention=False, rb_loss=True),
}


def check_regions(cfg: ModelConfig) -> None:
    """The model keys' ranges, and the K the region mode supports; a ConfigError names the key."""
    if cfg.variant not in VARIANTS:
        raise ConfigError(f"config key 'model.variant': unknown variant '{cfg.variant}'; "
                          f"known: {', '.join(VARIANTS)}")
    if cfg.region_features not in REGION_FEATURES:
        raise ConfigError(f"config key 'model.region_features': unknown region_features '{cfg.region_features}'; "
                          f"known: {', '.join(REGION_FEATURES)}")
    if not VARIANTS[cfg.variant].regions:
        check_model(cfg)
        return
    mode = REGION_MODES.get(cfg.region_mode)
    if mode is None:
        raise ConfigError(f"config key 'model.region_mode': unknown region_mode '{cfg.region_mode}'; "
                          f"known: {', '.join(sorted(REGION_MODES))}")
    if not 2 <= cfg.num_regions <= mode.max_regions:
        raise ConfigError(f"config key 'model.num_regions': region_mode '{cfg.region_mode}' supports num_regions "
                          f"in 2..{mode.max_regions} (whole face included), got {cfg.num_regions}")
    check_model(cfg)
    if cfg.region_features == "pooled":
        check_pooled_boxes(cfg)


def _backbone(name: str, input_size: int) -> nn.Module:
    try:
        return create_model(name, input_size=input_size)
    except ValueError as exc:
        raise ConfigError(f"config key 'model.backbone': {exc}") from exc


class RegionAttentionNetwork(nn.Module):
    def __init__(self, cfg: ModelConfig, backbone: nn.Module | None = None):
        super().__init__()
        check_regions(cfg)
        self.cfg = cfg
        self.backbone = backbone if backbone is not None else _backbone(cfg.backbone, cfg.input_size)
        d = getattr(self.backbone, "embedding_size", None)
        if not isinstance(d, int):
            raise ValueError(f"backbone {type(self.backbone).__name__} has no integer .embedding_size")
        self.variant = VARIANTS[cfg.variant]
        self.alpha = nn.Linear(d, 1)  # self-attention head
        relation = self.variant.relation_attention
        self.beta = nn.Linear(2 * d, 1) if relation else None  # relation-attention head
        self.dropout = nn.Dropout(cfg.dropout)
        self.attention_dropout = nn.Dropout(cfg.attention_dropout)
        self.classifier = nn.Linear(2 * d if relation else d, cfg.num_classes)
        self.region_mode = REGION_MODES[cfg.region_mode]
        self.region_features = REGION_FEATURES[cfg.region_features]
        if cfg.region_features == "pooled" and not all(
                hasattr(self.backbone, m) for m in ("forward_features", "forward_head")):
            raise ValueError(f"model.region_features=pooled needs a backbone with forward_features and forward_head "
                             f"(an iResNet); {type(self.backbone).__name__} has not both")
        # Persistent: every state_dict says how its regions became features, so that weights trained one
        # way are refused by a model built the other (the two share every parameter name and shape).
        self.register_buffer("region_features_code", torch.tensor(self.region_features.code))
        # Non-persistent: derived from the config, so checkpoints stay plain weights; buffers so
        # that they follow .to(device) and no step copies boxes from the host.
        self.register_buffer("fixed_boxes", fixed_layout(cfg.crop_frac), persistent=False)
        self.register_buffer("landmark_weights", landmark_weights(), persistent=False)
        self.register_buffer("whole_face_box", torch.tensor([[0.0, 0.0, 1.0, 1.0]]), persistent=False)

    @property
    def num_regions(self) -> int:
        return self.cfg.num_regions if self.variant.regions else 1

    def region_boxes(self, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K, 4) normalised boxes, the whole face first."""
        whole = self.whole_face_box.expand(images.shape[0], 1, 4)
        if not self.variant.regions:
            return whole
        parts = self.region_mode.boxes(self, images, landmarks)
        return torch.cat([whole, parts.float()], dim=1)

    def regions(self, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K, 3, S, S) crops in float32, resampled to the backbone's input size."""
        self._check_inputs(images, landmarks)
        return self.resample(images, self.region_boxes(images, landmarks))

    def resample(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Boxes (B, K, 4) of the images -> (B, K, 3, S, S) at the backbone's input size, in float32."""
        with torch.autocast(images.device.type, enabled=False):
            return crop_regions(images.float(), boxes, self.cfg.input_size)

    def attend(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Region features (B, K, d) -> mu (B, K), nu (B, K), P_RAN (B, 2d), all float32.

        Without relation-attention nu is all ones and P_RAN is F_m (B, d). In training, the regions
        region_keep_mask drops take no part in F_m or P_RAN; mu and nu are returned unmasked."""
        with torch.autocast(features.device.type, enabled=False):
            f = features.float()
            mu = torch.sigmoid(self.alpha(self.attention_dropout(f))).squeeze(-1)
            mu_kept = mu * self.region_keep_mask(mu) if self.training and self.cfg.region_dropout > 0 else mu
            f_m = (mu_kept[..., None] * f).sum(1) / mu_kept.sum(1, keepdim=True)
            if self.beta is None:
                return mu, torch.ones_like(mu), f_m
            fc = torch.cat([f, f_m[:, None, :].expand_as(f)], dim=-1)  # [F_i ; F_m]
            nu = torch.sigmoid(self.beta(self.attention_dropout(fc))).squeeze(-1)
            w = mu_kept * nu
            p = (w[..., None] * fc).sum(1) / w.sum(1, keepdim=True)
        return mu, nu, p

    def region_keep_mask(self, mu: torch.Tensor) -> torch.Tensor:
        """(B, K) of 0 / 1: each part region dropped with probability region_dropout; the whole face
        (region 0) always kept, or, with region_dropout_whole_face, dropped like the parts and a face
        that lost every region keeps one at random. Every face keeps at least one region."""
        keep = torch.rand_like(mu) >= self.cfg.region_dropout
        if not self.cfg.region_dropout_whole_face:
            keep[:, 0] = True
        # A region drawn for every face, kept where the face lost all: masks, no nonzero(), no device sync.
        pick = F.one_hot(torch.randint(mu.shape[1], mu.shape[:1], device=mu.device), mu.shape[1]).bool()
        return (keep | (pick & ~keep.any(1, keepdim=True))).to(mu.dtype)

    def classify(self, p: torch.Tensor) -> torch.Tensor:
        with torch.autocast(p.device.type, enabled=False):
            return self.classifier(self.dropout(p.float()))

    def forward(self, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> RANOutput:
        self._check_inputs(images, landmarks)
        feats = self.region_features.features(self, images, self.region_boxes(images, landmarks))
        mu, nu, p = self.attend(feats)
        return RANOutput(self.classify(p), mu, nu, p)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + "region_features_code"
        # Weights from before region_features existed were all trained on crops.
        saved = int(state_dict.setdefault(key, torch.tensor(REGION_FEATURES["crops"].code)))
        if saved != self.region_features.code:
            names = {f.code: name for name, f in REGION_FEATURES.items()}
            raise ValueError(
                f"these weights were trained with model.region_features={names.get(saved, f'<code {saved}>')} and "
                f"this model is built with model.region_features={self.cfg.region_features}: the two modes share "
                f"every parameter but not what the parameters mean; build the model with "
                f"model.region_features={names.get(saved, '?')} (the weights' own config does)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _check_inputs(self, images: torch.Tensor, landmarks: torch.Tensor | None) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        b, c, h, w = images.shape
        if c != 3:
            raise ValueError(f"images must have 3 channels (RGB), got {c} in shape {tuple(images.shape)}")
        if h != w or h < self.cfg.input_size:
            raise ValueError(f"images must be square and at least {self.cfg.input_size}x{self.cfg.input_size} "
                             f"(aligned faces), got {h}x{w}")
        if not images.is_floating_point():
            raise ValueError(f"images must be normalised floats, got {images.dtype}")
        if landmarks is not None and tuple(landmarks.shape) != (b, 68, 2):
            raise ValueError(f"landmarks must be ({b}, 68, 2) pixel coordinates, got {tuple(landmarks.shape)}")


def build_ran(cfg: ModelConfig) -> RegionAttentionNetwork:
    """The RAN a job config asks for; `init_backbone` (if set) is loaded strictly into the backbone."""
    model = RegionAttentionNetwork(cfg)
    if cfg.init_backbone:
        try:
            load_backbone_state(model.backbone, cfg.init_backbone)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"config key 'model.init_backbone': {exc}") from exc
    return model
