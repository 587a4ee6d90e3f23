"""Backbones, heads, momentum machinery and shuffle-BN shared by the pretraining methods."""

from regioncl.models.backbone import RESNET_BUILDERS, ResNetBackbone
from regioncl.models.box_head import ConvFCBoxHead
from regioncl.models.fpn import FPN
from regioncl.models.heads import MLPHead
from regioncl.models.momentum import FeatureQueue, cosine_momentum, ema_update_, make_target
from regioncl.models.shuffle_bn import shuffle_bn_encode

__all__ = [
    "FPN", "RESNET_BUILDERS", "ConvFCBoxHead", "FeatureQueue", "MLPHead", "ResNetBackbone", "cosine_momentum", "ema_update_",
    "make_target", "shuffle_bn_encode",
]
