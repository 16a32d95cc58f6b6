"""Backbones (iResNet), the Region Attention Network and its losses."""

from ranray.models.registry import create_model, list_models, register_model
from ranray.models import iresnet as _iresnet  # noqa: F401  (registers the backbones)
from ranray.models.iresnet import IResNet, load_backbone_state
from ranray.models.ran import RANOutput, RegionAttentionNetwork, build_ran, check_regions
from ranray.models.losses import LABEL_MODES, expression_loss, region_biased_loss, share_concentration

__all__ = [
    "create_model", "list_models", "register_model", "IResNet", "load_backbone_state",
    "RANOutput", "RegionAttentionNetwork", "build_ran", "check_regions",
    "LABEL_MODES", "expression_loss", "region_biased_loss", "share_concentration",
]
