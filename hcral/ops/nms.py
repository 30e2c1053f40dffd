"""Class-aware greedy NMS: :func:`torchvision.ops.batched_nms` behind a thin, checked contract.

torchvision does the suppression; this wrapper adds what hcral's callers rely on and torchvision
leaves open:

- shape checks with errors that name the argument (torchvision raises a bare C++ error or none);
- every floating dtype: torchvision's CPU kernel has no float16/bfloat16;
- boxes in float64 for the NMS. ``batched_nms`` keeps classes apart by shifting each class's boxes
  by ``class * (max coordinate + 1)``; in float32 (80 classes x 1333 px is about 1e5, spacing
  0.008 px) that shift rounds the coordinates and can flip an IoU that sits at the threshold. In
  float64 a float32 coordinate plus that shift is exact, so the IoUs are those of the boxes given
  (MPS has no float64 and stays in float32);
- the order of the kept indices: by decreasing score, equal scores by lower index (for more than
  1000 boxes torchvision runs NMS per class and merges them with an unstable sort).

Semantics: boxes are visited by decreasing score (equal scores: lower index first); a box is kept
unless a kept box of the same class overlaps it with ``IoU > iou_threshold`` (an IoU equal to the
threshold does not suppress). For class-agnostic NMS pass ``idxs = zeros``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms as _tv_batched_nms

__all__ = ["batched_nms"]


@torch.no_grad()
def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Class-aware greedy NMS: boxes of different ``idxs`` never suppress each other.

    Args:
        boxes: ``(N, 4)`` xyxy, any floating dtype.
        scores: ``(N,)``.
        idxs: ``(N,)`` integer class (or image, or image x class) of each box.
        iou_threshold: a box is suppressed by a kept box with ``IoU > iou_threshold``.

    Returns:
        ``(K,)`` int64 indices into ``boxes`` of the kept boxes, by decreasing score, equal scores
        by increasing index.
    """
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"scores must have shape (N,) = ({boxes.shape[0]},), got {tuple(scores.shape)}")
    if idxs.shape != boxes.shape[:1]:
        raise ValueError(f"idxs must have shape (N,) = ({boxes.shape[0]},), got {tuple(idxs.shape)}")
    dtype = torch.float32 if boxes.device.type == "mps" else torch.float64
    scores = scores.to(dtype)
    keep = _tv_batched_nms(boxes.to(dtype), scores, idxs, float(iou_threshold))
    # Restore the documented order: torchvision's per-class path merges with an unstable sort.
    keep = keep.sort().values
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]
