"""iResNet backbones, module for module as insightface's arcface_torch `backbones/iresnet.py`.

Module names, state_dict keys and shapes match insightface, so a public `backbone.pth` (or one
saved from DDP with a `module.` prefix) loads with strict=True via `load_backbone_state`.
`iresnet_tiny` keeps the block structure with fewer blocks and channels, for tests and demos on
a CPU; it does not load insightface weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ranray.models.registry import register_model

INPUT_SIZE = 112  # insightface's: a 7x7 last map (112 / 2**4), the size its checkpoints' fc layer expects
STRIDE = 16  # four stages, each halving the map


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class IBasicBlock(nn.Module):
    """BN, conv3x3, BN, PReLU, conv3x3 (carries the stride), BN, + shortcut; no activation after the add."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """input_size: the square input side, a multiple of 16; the fc layer is sized for its last map
    (112 -> 7x7, insightface's; 64 -> 4x4, a third of the compute for 48-pixel FER2013 faces)."""

    def __init__(self, layers: Sequence[int], widths: Sequence[int] = (64, 128, 256, 512),
                 num_features: int = 512, dropout: float = 0.0, input_size: int = INPUT_SIZE):
        super().__init__()
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"iResNet needs 4 stages, got layers={list(layers)} widths={list(widths)}")
        if input_size < STRIDE or input_size % STRIDE:
            raise ValueError(f"iResNet input size must be a multiple of {STRIDE} (>= {STRIDE}), got {input_size}")
        self.input_size = input_size
        self.layers_per_stage = tuple(layers)
        self.embedding_size = num_features
        self.feature_channels = widths[-1]
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes, eps=1e-5)
        self.prelu = nn.PReLU(self.inplanes)
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1])
        self.layer3 = self._make_layer(widths[2], layers[2])
        self.layer4 = self._make_layer(widths[3], layers[3])
        self.bn2 = nn.BatchNorm2d(widths[3], eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(widths[3] * (input_size // STRIDE) ** 2, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        # insightface freezes the embedding BN's scale at 1; checkpoints carry it, so it stays a parameter.
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        # Every stage halves the resolution, so its first block always needs a projection shortcut.
        downsample = nn.Sequential(conv1x1(self.inplanes, planes, 2), nn.BatchNorm2d(planes, eps=1e-5))
        layers = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> the last stage's map (B, feature_channels, S/16, S/16), before the head's BN."""
        s = self.input_size
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-2:] != (s, s):
            raise ValueError(f"iResNet expects (B, 3, {s}, {s}) images, got {tuple(x.shape)}")
        x = self.prelu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """A last-stage map (N, feature_channels, S/16, S/16) -> the embedding (N, embedding_size) in float32."""
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        # The embedding layers in float32 whatever the caller's autocast, as insightface does: a bf16
        # embedding would round every face-recognition feature to 8 bits of mantissa.
        with torch.autocast(x.device.type, enabled=False):
            return self.features(self.fc(x.float()))


@register_model
def iresnet18(**kwargs) -> IResNet:
    return IResNet([2, 2, 2, 2], **kwargs)


@register_model
def iresnet34(**kwargs) -> IResNet:
    return IResNet([3, 4, 6, 3], **kwargs)


@register_model
def iresnet50(**kwargs) -> IResNet:
    return IResNet([3, 4, 14, 3], **kwargs)


@register_model
def iresnet100(**kwargs) -> IResNet:
    return IResNet([3, 13, 30, 3], **kwargs)


@register_model
def iresnet200(**kwargs) -> IResNet:
    return IResNet([6, 26, 60, 6], **kwargs)


@register_model
def iresnet_tiny(**kwargs) -> IResNet:
    """One block per stage, 1/8 of the channels, a 64-d embedding: 0.28 M parameters.

    Sized so that a forward+backward of 12 crops (batch 2, K=6) stays near 0.1 s on 2 busy CPU
    cores; 16/32/64/128 channels took 2.5x longer there, dominated by the full-resolution stage.
    """
    kwargs.setdefault("num_features", 64)
    return IResNet([1, 1, 1, 1], widths=(8, 16, 32, 64), **kwargs)


@register_model
def iresnet_small(**kwargs) -> IResNet:
    """iresnet18's depth at half its channels, a 256-d embedding: 3.4 M parameters at input 48, 3.8 M at 64.

    For real 48-pixel FER faces on a CPU (jobs/ferplus_cpu.yaml, at input_size 48 or 64): tiny's 0.28 M
    parameters underfit FERPlus, full iresnet18 costs 4x the time per face.
    """
    kwargs.setdefault("num_features", 256)
    return IResNet([2, 2, 2, 2], widths=(32, 64, 128, 256), **kwargs)


def load_backbone_state(model: nn.Module, path_or_state: str | os.PathLike | Mapping[str, torch.Tensor],
                        ) -> nn.Module:
    """Load an insightface-style backbone state dict into `model` with strict=True.

    Accepts a file (read with weights_only=True) or a mapping. A DDP `module.` prefix is stripped;
    a mapping with a `backbone` entry (a training checkpoint) is unwrapped. Any missing, unexpected
    or wrong-shaped key raises ValueError naming the source and the keys.
    """
    source = "<state dict>"
    state = path_or_state
    if isinstance(path_or_state, (str, os.PathLike)):
        source = str(path_or_state)
        if not Path(source).is_file():
            raise FileNotFoundError(f"backbone checkpoint not found: {source}")
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for corrupt or non-weights files
            raise ValueError(f"cannot read backbone checkpoint {source}: {e}") from e
    if not isinstance(state, Mapping):
        raise ValueError(f"backbone checkpoint {source} holds a {type(state).__name__}, not a state dict")
    if "backbone" in state and isinstance(state["backbone"], Mapping):
        state = state["backbone"]
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}

    expected = model.state_dict()
    problems = []
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
              for k, v in state.items()
              if k in expected and isinstance(v, torch.Tensor) and v.shape != expected[k].shape]
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:8])}{more}")
    if problems:
        raise ValueError(f"backbone checkpoint {source} does not match {type(model).__name__} "
                         f"({sum(p.numel() for p in model.parameters()):,} parameters): " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    return model
