"""Backbones returning multi-level feature maps (C3, C4, C5 by default)."""

from hcral.models.backbones.pretrained import WeightsDownloadError, load_pretrained
from hcral.models.backbones.resnet import FrozenBatchNorm2d, ResNet
from hcral.models.backbones.small import SmallBackbone
from hcral.models.backbones.timm_backbone import TimmBackbone

__all__ = ["FrozenBatchNorm2d", "ResNet", "SmallBackbone", "TimmBackbone", "WeightsDownloadError", "load_pretrained"]
