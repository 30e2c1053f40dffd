"""Max-IoU assignment for RetinaNet (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017),
with the semantics of MMDetection's ``MaxIoUAssigner`` (``pos_iou_thr=0.5, neg_iou_thr=0.4,
min_pos_iou=0, match_low_quality=True, gt_max_assign_all=True``), in this order:

1. every prior starts IGNORED (-2);
2. BACKGROUND (-1) if its largest IoU over the GTs is in ``[0, neg_iou)``;
3. positive for its best GT (equal IoU: lower GT index) if that IoU is ``>= pos_iou``;
4. low-quality matches (if enabled): for each GT j in increasing order whose best IoU over all
   priors ``gt_max_j >= min_pos_iou``, every prior with ``IoU = gt_max_j`` (or only the first such
   prior if ``gt_max_assign_all=False``) becomes positive for j, overwriting steps 2-3, so a prior
   that is the best of several GTs ends with the highest GT index (MMDetection's loop order).

As in MMDetection, with ``min_pos_iou=0`` a GT that overlaps no prior at all (IoU 0 everywhere,
e.g. a zero-area box) makes every prior it does not overlap positive for it: filter degenerate
GTs upstream. An image without GT is all background.

Memory: one ``(B, c, N)`` IoU block at a time with ``B·c·N <= max_pairs``; about 20 bytes per pair
are alive (IoU, its temporaries and the low-quality masks): ~20·max_pairs bytes (~340 MB at the
GPU default of 2^24 pairs, ~20 MB at the CPU default of 2^20), independent of the number of GTs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hcral.assign.types import BACKGROUND, IGNORED, Assignment
from hcral.assign.utils import (
    check_batched_gts,
    check_priors,
    check_single_gts,
    compute_dtype,
    gt_chunks,
    gt_prior_iou,
    resolve_max_pairs,
)

__all__ = ["max_iou_assign", "max_iou_assign_batched"]


@torch.no_grad()
def max_iou_assign_batched(
    priors: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_mask: Tensor | None = None,
    *,
    pos_iou: float = 0.5,
    neg_iou: float = 0.4,
    min_pos_iou: float = 0.0,
    low_quality_matches: bool = True,
    gt_max_assign_all: bool = True,
    max_pairs: int | None = None,
) -> Assignment:
    """Max-IoU assignment for a batch sharing one prior layout (see the module docstring).

    ``priors (N, 4)`` xyxy; ``gt_boxes (B, M, 4)`` padded; ``gt_labels (B, M)``; ``gt_mask (B, M)``
    bool (None: all real). Returns a batched :class:`Assignment` ``(B, N)``; ``max_iou`` is the IoU
    with the assigned GT for positives and the largest IoU over the image's GTs elsewhere.
    """
    fn = "max_iou_assign"
    check_priors(fn, priors)
    gt_boxes, gt_labels, gt_mask = check_batched_gts(fn, gt_boxes, gt_labels, gt_mask, priors.device)
    max_pairs = resolve_max_pairs(max_pairs, priors.device)
    dtype = compute_dtype(priors, gt_boxes)
    b, m = gt_mask.shape
    n = priors.shape[0]
    device = priors.device
    if n == 0 or m == 0:
        return Assignment.background((b, n), device=device, dtype=dtype)
    priors_c, gt_c = priors.to(dtype), gt_boxes.to(dtype)

    best_iou = torch.full((b, n), -1.0, dtype=dtype, device=device)  # max over GTs so far
    best_gt = torch.zeros((b, n), dtype=torch.long, device=device)
    lq_gt = torch.full((b, n), -1, dtype=torch.long, device=device)  # low-quality match, -1 none
    lq_iou = torch.zeros((b, n), dtype=dtype, device=device)
    for chunk in gt_chunks(m, b * n, max_pairs):
        iou = gt_prior_iou(gt_c[:, chunk], priors_c)  # (B, c, N)
        valid = gt_mask[:, chunk]  # (B, c)
        iou.masked_fill_(~valid[..., None], -1.0)  # padding never wins a max
        chunk_iou, chunk_gt = iou.max(dim=1)  # first max: the lower GT index on ties
        better = chunk_iou > best_iou  # strict: earlier chunks (lower GT indices) keep ties
        best_iou = torch.where(better, chunk_iou, best_iou)
        best_gt = torch.where(better, chunk_gt + chunk.start, best_gt)
        if not low_quality_matches:
            continue
        gt_max, gt_argmax = iou.max(dim=2)  # (B, c): each GT's best IoU and its first prior
        qualifies = valid & (gt_max >= min_pos_iou)
        if gt_max_assign_all:
            hit = (iou == gt_max[..., None]) & qualifies[..., None]  # (B, c, N)
        else:
            hit = torch.zeros_like(iou, dtype=torch.bool).scatter_(2, gt_argmax[..., None], qualifies[..., None])
        # Later GTs overwrite earlier ones (MMDetection's loop): keep the highest hit index.
        local = torch.arange(hit.shape[1], device=device, dtype=torch.int32)[None, :, None]
        last = torch.where(hit, local, -1).amax(dim=1).long()  # (B, N)
        got = last >= 0
        lq_gt = torch.where(got, last + chunk.start, lq_gt)
        lq_iou = torch.where(got, gt_max.gather(1, last.clamp(min=0)), lq_iou)

    gt_index = torch.full((b, n), IGNORED, dtype=torch.long, device=device)
    gt_index = torch.where((best_iou >= 0) & (best_iou < neg_iou), BACKGROUND, gt_index)
    gt_index = torch.where(best_iou >= pos_iou, best_gt, gt_index)
    max_iou = best_iou.clamp(min=0)
    lq = lq_gt >= 0
    gt_index = torch.where(lq, lq_gt, gt_index)
    max_iou = torch.where(lq, lq_iou, max_iou)
    has_gt = gt_mask.any(dim=1, keepdim=True)  # (B, 1)
    gt_index = torch.where(has_gt, gt_index, BACKGROUND)
    max_iou = torch.where(has_gt, max_iou, 0)
    pos = gt_index >= 0
    labels = torch.where(pos, gt_labels.gather(1, gt_index.clamp(min=0)), -1)
    return Assignment(gt_index=gt_index, labels=labels, max_iou=max_iou, expanded=torch.zeros_like(pos))


@torch.no_grad()
def max_iou_assign(
    priors: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    *,
    pos_iou: float = 0.5,
    neg_iou: float = 0.4,
    min_pos_iou: float = 0.0,
    low_quality_matches: bool = True,
    gt_max_assign_all: bool = True,
    max_pairs: int | None = None,
) -> Assignment:
    """Max-IoU assignment (RetinaNet, MMDetection's ``MaxIoUAssigner``) for one image.

    ``priors (N, 4)``, ``gt_boxes (M, 4)``, ``gt_labels (M,)``; returns ``(N,)`` fields. Rules in the
    module docstring.
    """
    check_priors("max_iou_assign", priors)
    check_single_gts("max_iou_assign", gt_boxes, gt_labels)
    batched = max_iou_assign_batched(
        priors, gt_boxes[None], gt_labels[None],
        pos_iou=pos_iou, neg_iou=neg_iou, min_pos_iou=min_pos_iou, low_quality_matches=low_quality_matches,
        gt_max_assign_all=gt_max_assign_all, max_pairs=max_pairs,
    )
    return batched.unbind()[0]
