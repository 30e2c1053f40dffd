"""Backbones returning multi-level feature maps (C3, C4, C5 by default)."""

from hcral.models.backbones.resnet import FrozenBatchNorm2d, ResNet, load_pretrained
from hcral.models.backbones.small import SmallBackbone

__all__ = ["FrozenBatchNorm2d", "ResNet", "SmallBackbone", "load_pretrained"]
