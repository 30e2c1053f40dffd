"""Batching: pad images bottom/right to a common size that the largest stride divides."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["collate", "padded_size"]


def padded_size(height: int, width: int, size_divisor: int) -> tuple[int, int]:
    """Smallest ``(H, W) >= (height, width)`` with both multiples of ``size_divisor``."""
    if size_divisor < 1:
        raise ValueError(f"size_divisor must be >= 1, got {size_divisor}")
    return (
        math.ceil(height / size_divisor) * size_divisor,
        math.ceil(width / size_divisor) * size_divisor,
    )


def collate(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]], size_divisor: int = 128
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Stack ``(image, target)`` pairs into ``images (B, 3, Hp, Wp)`` and a list of targets.

    Every image is zero-padded at the bottom and right (top-left stays at the origin, so boxes need
    no shift) to ``(Hp, Wp)``: the batch's largest height and width rounded up to multiples of
    ``size_divisor`` (128 = the P7 stride of RetinaNet/ATSS/FCOS FPNs). Zero is the padding value
    after normalisation, as in MMDetection. Each target gets ``pad_shape = (Hp, Wp)``; its ``size``
    stays the unpadded ``(h, w)``, which tells the model where the valid pixels are.

    Use with a DataLoader as ``collate_fn=functools.partial(collate, size_divisor=...)``.
    """
    if len(batch) == 0:
        raise ValueError("collate got an empty batch")
    images = [image for image, _ in batch]
    channels = {int(image.shape[0]) for image in images}
    if any(image.dim() != 3 for image in images) or len(channels) != 1:
        shapes = [tuple(image.shape) for image in images]
        raise ValueError(f"collate expects (C, H, W) images with one C for the batch, got {shapes}")
    max_h = max(int(image.shape[1]) for image in images)
    max_w = max(int(image.shape[2]) for image in images)
    pad_h, pad_w = padded_size(max_h, max_w, size_divisor)
    out = images[0].new_zeros((len(images), channels.pop(), pad_h, pad_w))  # (B, C, Hp, Wp)
    targets: list[dict[str, Any]] = []
    for i, (image, target) in enumerate(batch):
        out[i, :, : image.shape[1], : image.shape[2]] = image
        target = dict(target)
        target["pad_shape"] = (pad_h, pad_w)
        targets.append(target)
    return out, targets
