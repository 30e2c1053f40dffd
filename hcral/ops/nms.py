"""Exact greedy non-maximum suppression in plain PyTorch, vectorised in blocks.

Semantics (torchvision's ``nms``/``batched_nms``): boxes are visited by decreasing score (equal
scores: lower index first, a stable sort); a box is kept unless a kept box of the same class
overlaps it with ``IoU > iou_threshold`` (an IoU equal to the threshold does not suppress). IoU is
:func:`hcral.ops.boxes.box_iou` (float32 at least, so fp16 boxes are compared in float32).

Algorithm. Boxes are sorted by class, and within a class by score (greedy NMS of one class ignores
the others, so classes are independent), then cut into blocks of ``block_size``. A block is first
checked against the boxes of its own classes kept in earlier blocks (IoU in chunks, so memory stays
O(block_size²) for any N; work is O(N·block_size) plus, per class, O(n_c·kept_c) IoUs).

Inside a block, ``S[i, j]`` (i < j) says that box i would suppress box j. The greedy keep vector is
the unique fixed point of ``keep[j] = alive[j] and not any_{i<j} (keep[i] and S[i, j])``: entry j
depends only on entries before it. Iterating that map from ``keep = alive`` fixes at least one more
leading entry per step and stops at the greedy answer; each step is one (B, B) boolean reduction
with one host sync to test convergence. Suppression chains in detection are short, so a few steps
suffice; after ``max_fixed_point_iters`` steps the row-by-row greedy loop (B small tensor ops, no
host sync) finishes the block, so the worst case is still exact and bounded.

Classes are kept apart by masking ``S`` with ``class_i == class_j`` rather than by the usual trick of
offsetting each class's boxes by ``class * (max coordinate + 1)``: in float32 the offset coordinates
lose low bits (80 classes x 1333 px is about 1e5, spacing 0.008 px), which can flip an IoU that sits
at the threshold, and the mask costs nothing extra here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hcral.ops.boxes import box_iou

__all__ = ["batched_nms", "nms"]

# Boxes per block. On CPU the O(N·B) IoU work inside blocks dominates, so blocks are small; on a
# GPU that work is cheap and each block costs a few host syncs, so blocks are larger.
DEFAULT_BLOCK_SIZE_CPU = 256
DEFAULT_BLOCK_SIZE_CUDA = 1024
DEFAULT_MAX_FIXED_POINT_ITERS = 32


def _check_inputs(boxes: Tensor, scores: Tensor, idxs: Tensor | None) -> None:
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"scores must have shape (N,) = ({boxes.shape[0]},), got {tuple(scores.shape)}")
    if idxs is not None and idxs.shape != boxes.shape[:1]:
        raise ValueError(f"idxs must have shape (N,) = ({boxes.shape[0]},), got {tuple(idxs.shape)}")


def _greedy_in_block(suppresses: Tensor, alive: Tensor, max_iters: int) -> Tensor:
    """Greedy keep mask ``(B,)`` of one block; ``suppresses (B, B)`` is strictly upper triangular."""
    keep = alive
    for _ in range(max_iters):
        new_keep = alive & ~(suppresses & keep[:, None]).any(dim=0)
        if torch.equal(new_keep, keep):
            return keep
        keep = new_keep
    # Long suppression chain: exact row-by-row greedy; keep[i] is final when row i is applied.
    keep = alive.clone()
    for i in range(keep.shape[0]):
        keep &= ~(suppresses[i] & keep[i])
    return keep


@torch.no_grad()
def batched_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    iou_threshold: float,
    *,
    block_size: int | None = None,
    max_fixed_point_iters: int = DEFAULT_MAX_FIXED_POINT_ITERS,
) -> Tensor:
    """Class-aware greedy NMS: boxes of different ``idxs`` never suppress each other.

    Args:
        boxes: ``(N, 4)`` xyxy.
        scores: ``(N,)``.
        idxs: ``(N,)`` integer class (or image, or image x class) of each box.
        iou_threshold: a box is suppressed by a kept box with ``IoU > iou_threshold``.
        block_size: boxes per block; memory is a few ``(block_size, block_size)`` tensors. None:
            256 on CPU, 1024 on other devices.
        max_fixed_point_iters: vectorised steps per block before the row-by-row fallback.

    Returns:
        ``(K,)`` int64 indices into ``boxes`` of the kept boxes, by decreasing score.
    """
    _check_inputs(boxes, scores, idxs)
    if block_size is None:
        block_size = DEFAULT_BLOCK_SIZE_CPU if boxes.device.type == "cpu" else DEFAULT_BLOCK_SIZE_CUDA
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    num = boxes.shape[0]
    if num == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    # Visit order: by score (descending, stable: lower index first on ties) ...
    by_score = torch.sort(scores, descending=True, stable=True).indices  # (N,)
    # ... then grouped by class (stable, so each class keeps that order). Greedy NMS of one class
    # never looks at another, so classes can be done one after the other, and a block only needs
    # the kept boxes of its own classes, which now sit just before it.
    order = by_score[torch.sort(idxs[by_score], stable=True).indices]
    boxes_sorted = boxes[order]
    classes = idxs[order]
    starts = list(range(0, num, block_size))
    # Position of the first box of each block's first class (one host transfer for all blocks).
    class_begin = torch.searchsorted(classes, classes[starts]).tolist()
    keep_sorted = torch.zeros(num, dtype=torch.bool, device=boxes.device)

    for start, begin in zip(starts, class_begin):
        end = min(start + block_size, num)
        blk_boxes, blk_classes = boxes_sorted[start:end], classes[start:end]
        alive = torch.ones(end - start, dtype=torch.bool, device=boxes.device)
        # Suppression by boxes of the same classes kept in earlier blocks (all ranked higher).
        kept_before = keep_sorted[begin:start].nonzero().squeeze(1) + begin
        for k in range(0, kept_before.numel(), block_size):
            ref = kept_before[k : k + block_size]
            over = box_iou(blk_boxes, boxes_sorted[ref]) > iou_threshold  # (B, K)
            over &= blk_classes[:, None] == classes[ref][None, :]
            alive &= ~over.any(dim=1)
        # Inside the block: S[i, j] for i < j only.
        suppresses = box_iou(blk_boxes, blk_boxes) > iou_threshold  # (B, B)
        suppresses &= blk_classes[:, None] == blk_classes[None, :]
        suppresses = torch.triu(suppresses, diagonal=1)
        keep_sorted[start:end] = _greedy_in_block(suppresses, alive, max_fixed_point_iters)

    # Back to score order across classes.
    keep_mask = torch.zeros(num, dtype=torch.bool, device=boxes.device)
    keep_mask[order[keep_sorted]] = True
    return by_score[keep_mask[by_score]]


def nms(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float,
    *,
    block_size: int | None = None,
    max_fixed_point_iters: int = DEFAULT_MAX_FIXED_POINT_ITERS,
) -> Tensor:
    """Class-agnostic greedy NMS; ``(K,)`` int64 indices of kept boxes by decreasing score."""
    _check_inputs(boxes, scores, None)
    idxs = torch.zeros(boxes.shape[0], dtype=torch.long, device=boxes.device)
    return batched_nms(
        boxes, scores, idxs, iou_threshold, block_size=block_size, max_fixed_point_iters=max_fixed_point_iters
    )
