"""Datasets, transforms and batching for detection training and evaluation.

Every dataset returns ``(image, target)`` pairs with the target layout described in
:class:`hcral.data.base.DetectionDataset` and provides ``coco_gt()`` for the COCO metric.
"""

from __future__ import annotations

from hcral.data.base import DetectionDataset, ImageRecord, load_image, read_image_size
from hcral.data.coco import CocoDataset
from hcral.data.collate import collate, padded_size
from hcral.data.errors import DatasetError
from hcral.data.synthetic import SHAPE_NAMES, SyntheticShapes
from hcral.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    ResizeKeepRatio,
    ToTensor,
    build_transforms,
    clip_and_drop_boxes,
    empty_target,
    horizontal_flip,
)
from hcral.data.voc import VOCDataset
from hcral.data.yolo import YOLODataset

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SHAPE_NAMES",
    "CocoDataset",
    "Compose",
    "DatasetError",
    "DetectionDataset",
    "ImageRecord",
    "Normalize",
    "RandomHorizontalFlip",
    "ResizeKeepRatio",
    "SyntheticShapes",
    "ToTensor",
    "VOCDataset",
    "YOLODataset",
    "build_transforms",
    "clip_and_drop_boxes",
    "collate",
    "empty_target",
    "load_image",
    "horizontal_flip",
    "padded_size",
    "read_image_size",
]
