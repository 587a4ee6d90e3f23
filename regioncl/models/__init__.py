"""Backbones, heads, and momentum machinery shared by the pretraining methods."""

from regioncl.models.backbone import RESNET_BUILDERS, ResNetBackbone
from regioncl.models.heads import MLPHead
from regioncl.models.momentum import FeatureQueue, ema_update_, make_target

__all__ = ["RESNET_BUILDERS", "FeatureQueue", "MLPHead", "ResNetBackbone", "ema_update_", "make_target"]
