"""Box operations in plain PyTorch.

Why hand-written and not ``torchvision.ops`` (0.29). torchvision offers pairwise ``(N, M)``
``box_iou``, ``generalized_box_iou``, ``distance_box_iou``, ``complete_box_iou`` and aligned
(elementwise) ``generalized_box_iou_loss``, ``distance_box_iou_loss``, ``complete_box_iou_loss``.
The losses here need what those lack:

- the separate terms of one pass (IoU, union, enclosing box, ρ², c², widths, see
  :class:`AlignedBoxTerms`): HCRA-R differentiates ``1 - GIoU`` and reads the detached IoU and
  ``ρ²/c²`` of the same pass for its weights; torchvision's losses return only the final loss;
- EIoU / Focal-EIoU: torchvision has no EIoU;
- the guards: torchvision divides by ``union + eps`` (so the IoU of two identical 1 px boxes is
  ``1 / (1 + eps)``, not 1), does not clamp the width and height of inverted predicted boxes (a
  negative width times a negative height gives a positive area), and its CIoU's ``atan(w / h)``
  divides by a zero height unguarded (NaN for a zero-size predicted box); here widths are clamped
  at 0 and every quotient is guarded by ``eps``;
- torchvision's aligned intersection is a boolean-mask scatter (dynamic shape, a device sync
  under CUDA); here it is ``clamp(min=0)`` arithmetic.

Pairwise :func:`box_iou` (assigners, evaluation, NMS references) stays too, although for boxes of
positive area it is bit-identical to torchvision's ``box_iou``: torchvision's gives ``0 / 0 = NaN``
for two zero-area boxes, subtracts fp16 corners before upcasting (``2047 - 0.5`` rounds to 2046),
and on CPU it is about 1.5x slower (20000 x 30 boxes, one thread: 12.7 ms vs 8.3 ms) because it
builds ``(N, M, 2)`` temporaries.

All boxes are ``(x1, y1, x2, y2)`` in pixels ("xyxy") unless a name says otherwise. Every IoU-type
function computes in float32 at least: fp16/bf16 inputs are upcast (areas of large boxes overflow
fp16, and bf16 keeps only 8 bits of mantissa), float64 stays float64 (for gradcheck). Every quotient
is guarded by ``eps`` so zero-area, identical and disjoint boxes give finite values and gradients.

Pairwise functions take ``(N, 4)`` and ``(M, 4)`` and return ``(N, M)``; aligned functions take two
``(..., 4)`` tensors of the same shape and return ``(...)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# Guards every division by an area or a squared length; the same default as MMDetection's
# IoU-loss family, small enough to leave the IoU of boxes of one pixel unchanged to 1e-7.
EPS = 1e-7


def _upcast(t: Tensor) -> Tensor:
    """Floating types narrower than float32 go to float32; float32/float64 are kept."""
    if t.is_floating_point():
        return t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t.float()


# ---------------------------------------------------------------------------------------------
# Conversions and simple geometry
# ---------------------------------------------------------------------------------------------


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``(..., 4)`` xyxy boxes; boxes with x2 < x1 or y2 < y1 count as zero area."""
    boxes = _upcast(boxes)
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_centers(boxes: Tensor) -> Tensor:
    """Centres ``(..., 2)`` of xyxy boxes."""
    return torch.stack(((boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2), dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def box_xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """xyxy to COCO's (x, y, width, height)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((x1, y1, x2 - x1, y2 - y1), dim=-1)


def box_xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """COCO's (x, y, width, height) to xyxy."""
    x, y, w, h = boxes.unbind(-1)
    return torch.stack((x, y, x + w, y + h), dim=-1)


def clip_boxes(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clip xyxy boxes to an image of ``size = (height, width)``."""
    height, width = size
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(
        (x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height)), dim=-1
    )


# ---------------------------------------------------------------------------------------------
# Pairwise IoU
# ---------------------------------------------------------------------------------------------


def box_iou(boxes1: Tensor, boxes2: Tensor, *, eps: float = EPS) -> Tensor:
    """Pairwise IoU of ``boxes1 (N, 4)`` and ``boxes2 (M, 4)`` -> ``(N, M)`` in float32 or float64.

    Peak memory is a few (N, M) float tensors; callers with very large N·M chunk over one side.
    """
    boxes1, boxes2 = _upcast(boxes1), _upcast(boxes2)
    area1, area2 = box_area(boxes1), box_area(boxes2)
    # Width and height of the overlap separately: no (N, M, 2) temporaries.
    inter_w = (torch.minimum(boxes1[:, None, 2], boxes2[None, :, 2]) - torch.maximum(boxes1[:, None, 0], boxes2[None, :, 0])).clamp_(min=0)
    inter_h = (torch.minimum(boxes1[:, None, 3], boxes2[None, :, 3]) - torch.maximum(boxes1[:, None, 1], boxes2[None, :, 1])).clamp_(min=0)
    inter = inter_w.mul_(inter_h)
    union = area1[:, None] + area2[None, :] - inter
    return inter / union.clamp(min=eps)


# ---------------------------------------------------------------------------------------------
# Aligned IoU family: one pass computes every term the GIoU/DIoU/CIoU/EIoU variants need
# ---------------------------------------------------------------------------------------------


class AlignedBoxTerms(NamedTuple):
    """Geometric terms of aligned box pairs ``(..., 4)``, all ``(...)``.

    ``iou``: intersection over union; ``enclose_area``, ``enclose_w``, ``enclose_h``: the smallest
    box enclosing both; ``union``; ``center_dist2``: squared distance of the centres (DIoU's ρ²);
    ``diag2``: squared diagonal of the enclosing box (DIoU's c², at least ``eps``); ``w1, h1, w2, h2``:
    the widths and heights (clamped at 0).
    """

    iou: Tensor
    union: Tensor
    enclose_area: Tensor
    enclose_w: Tensor
    enclose_h: Tensor
    center_dist2: Tensor
    diag2: Tensor
    w1: Tensor
    h1: Tensor
    w2: Tensor
    h2: Tensor


def aligned_box_terms(boxes1: Tensor, boxes2: Tensor, *, eps: float = EPS) -> AlignedBoxTerms:
    """All geometric terms of aligned pairs in one pass (see :class:`AlignedBoxTerms`)."""
    if boxes1.shape != boxes2.shape:
        raise ValueError(f"aligned boxes need equal shapes, got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}")
    b1, b2 = _upcast(boxes1), _upcast(boxes2)
    if b1.dtype != b2.dtype:
        b1, b2 = b1.to(torch.promote_types(b1.dtype, b2.dtype)), b2.to(torch.promote_types(b1.dtype, b2.dtype))
    w1 = (b1[..., 2] - b1[..., 0]).clamp(min=0)
    h1 = (b1[..., 3] - b1[..., 1]).clamp(min=0)
    w2 = (b2[..., 2] - b2[..., 0]).clamp(min=0)
    h2 = (b2[..., 3] - b2[..., 1]).clamp(min=0)
    inter_w = (torch.minimum(b1[..., 2], b2[..., 2]) - torch.maximum(b1[..., 0], b2[..., 0])).clamp(min=0)
    inter_h = (torch.minimum(b1[..., 3], b2[..., 3]) - torch.maximum(b1[..., 1], b2[..., 1])).clamp(min=0)
    inter = inter_w * inter_h
    union = (w1 * h1 + w2 * h2 - inter).clamp(min=eps)
    enclose_w = (torch.maximum(b1[..., 2], b2[..., 2]) - torch.minimum(b1[..., 0], b2[..., 0])).clamp(min=0)
    enclose_h = (torch.maximum(b1[..., 3], b2[..., 3]) - torch.minimum(b1[..., 1], b2[..., 1])).clamp(min=0)
    dx = (b2[..., 0] + b2[..., 2] - b1[..., 0] - b1[..., 2]) / 2
    dy = (b2[..., 1] + b2[..., 3] - b1[..., 1] - b1[..., 3]) / 2
    return AlignedBoxTerms(
        iou=inter / union,
        union=union,
        enclose_area=(enclose_w * enclose_h).clamp(min=eps),
        enclose_w=enclose_w,
        enclose_h=enclose_h,
        center_dist2=dx * dx + dy * dy,
        diag2=(enclose_w * enclose_w + enclose_h * enclose_h).clamp(min=eps),
        w1=w1,
        h1=h1,
        w2=w2,
        h2=h2,
    )


def aligned_iou(boxes1: Tensor, boxes2: Tensor, *, eps: float = EPS) -> Tensor:
    """IoU of aligned pairs ``(..., 4)`` -> ``(...)``."""
    return aligned_box_terms(boxes1, boxes2, eps=eps).iou


def giou_from_terms(t: AlignedBoxTerms) -> Tensor:
    """GIoU = IoU - (|C| - |A ∪ B|) / |C| (Rezatofighi et al., CVPR 2019)."""
    return t.iou - (t.enclose_area - t.union) / t.enclose_area


def diou_penalty_from_terms(t: AlignedBoxTerms) -> Tensor:
    """DIoU's penalty R = ρ² / c² (Zheng et al., AAAI 2020): centre distance over enclosing diagonal."""
    return t.center_dist2 / t.diag2


def ciou_aspect_from_terms(t: AlignedBoxTerms, *, eps: float = EPS) -> Tensor:
    """CIoU's aspect term v = (4/π²) (atan(w2/h2) - atan(w1/h1))² (Zheng et al., AAAI 2020)."""
    delta = torch.atan(t.w2 / (t.h2 + eps)) - torch.atan(t.w1 / (t.h1 + eps))
    return (4 / torch.pi**2) * delta * delta


def eiou_penalty_from_terms(t: AlignedBoxTerms, *, eps: float = EPS) -> Tensor:
    """EIoU's penalty ρ²/c² + (w1-w2)²/Cw² + (h1-h2)²/Ch² (Zhang et al., Neurocomputing 2022)."""
    dw, dh = t.w1 - t.w2, t.h1 - t.h2
    return (
        diou_penalty_from_terms(t)
        + dw * dw / (t.enclose_w * t.enclose_w).clamp(min=eps)
        + dh * dh / (t.enclose_h * t.enclose_h).clamp(min=eps)
    )


def aligned_giou(boxes1: Tensor, boxes2: Tensor, *, eps: float = EPS) -> Tensor:
    """GIoU of aligned pairs, in [-1, 1]."""
    return giou_from_terms(aligned_box_terms(boxes1, boxes2, eps=eps))


def aligned_diou(boxes1: Tensor, boxes2: Tensor, *, eps: float = EPS) -> Tensor:
    """DIoU = IoU - ρ²/c² of aligned pairs, in [-1, 1]."""
    t = aligned_box_terms(boxes1, boxes2, eps=eps)
    return t.iou - diou_penalty_from_terms(t)


def aligned_ciou(boxes1: Tensor, boxes2: Tensor, *, eps: float = EPS) -> Tensor:
    """CIoU = IoU - ρ²/c² - a·v with a = v / (1 - IoU + v) treated as a constant (as the paper does)."""
    t = aligned_box_terms(boxes1, boxes2, eps=eps)
    v = ciou_aspect_from_terms(t, eps=eps)
    with torch.no_grad():
        a = v / (1 - t.iou + v).clamp(min=eps)
    return t.iou - diou_penalty_from_terms(t) - a * v


def aligned_eiou(boxes1: Tensor, boxes2: Tensor, *, eps: float = EPS) -> Tensor:
    """EIoU = IoU - ρ²/c² - (Δw)²/Cw² - (Δh)²/Ch² of aligned pairs."""
    t = aligned_box_terms(boxes1, boxes2, eps=eps)
    return t.iou - eiou_penalty_from_terms(t, eps=eps)
