"""From per-level dense predictions of one image to its final detections.

Follows MMDetection's ``BaseDenseHead._predict_by_feat_single`` + ``_bbox_post_process`` (v2.18+
and v3), with the test settings of RetinaNet, ATSS and FCOS:

1. per level, keep (prior, class) pairs with ``score > score_thr`` and of those the ``nms_pre``
   highest (``filter_scores_and_topk``): the threshold and the top-k see the classification score
   alone;
2. multiply the kept scores by the prior's score factor (centerness, already through its sigmoid)
   when given: after the top-k, before NMS;
3. class-aware NMS over all levels together with those products as scores;
4. keep the ``max_per_img`` highest.

Every step is under ``torch.no_grad``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hcral.ops.nms import batched_nms

__all__ = ["select_detections"]


@torch.no_grad()
def select_detections(
    cls_scores: Sequence[Tensor],
    boxes: Sequence[Tensor],
    *,
    nms_pre: int | None = 1000,
    score_thr: float = 0.05,
    iou_threshold: float = 0.6,
    max_per_img: int = 100,
    score_factors: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Detections of one image from per-level scores and decoded boxes.

    Args:
        cls_scores: per level ``(P_l, C)`` class probabilities (sigmoid already applied), one row
            per prior (``P_l = H_l * W_l * A``).
        boxes: per level ``(P_l, 4)`` decoded xyxy boxes, one per prior.
        nms_pre: most (prior, class) pairs kept per level before NMS; None keeps all.
        score_thr: pairs with ``score <= score_thr`` are dropped.
        iou_threshold: class-aware NMS threshold (suppress when ``IoU > iou_threshold``).
        max_per_img: most detections returned.
        score_factors: per level ``(P_l,)`` factors in [0, 1] (e.g. sigmoid of centerness)
            multiplied into the scores after the per-level top-k.

    Returns:
        ``boxes (K, 4)``, ``scores (K,)``, ``labels (K,)`` int64, by decreasing score, ``K <= max_per_img``.
    """
    if len(cls_scores) == 0:
        raise ValueError("select_detections needs at least one level, got none")
    if len(boxes) != len(cls_scores):
        raise ValueError(f"{len(cls_scores)} levels of scores but {len(boxes)} of boxes")
    if score_factors is not None and len(score_factors) != len(cls_scores):
        raise ValueError(f"{len(cls_scores)} levels of scores but {len(score_factors)} of score_factors")
    if nms_pre is not None and nms_pre < 1:
        raise ValueError(f"nms_pre must be >= 1 or None, got {nms_pre}")
    if max_per_img < 1:
        raise ValueError(f"max_per_img must be >= 1, got {max_per_img}")

    mlvl_boxes: list[Tensor] = []
    mlvl_scores: list[Tensor] = []
    mlvl_labels: list[Tensor] = []
    for level, (scores, level_boxes) in enumerate(zip(cls_scores, boxes)):
        if scores.dim() != 2 or level_boxes.shape != (scores.shape[0], 4):
            raise ValueError(
                f"level {level}: scores must be (P, C) and boxes (P, 4), got {tuple(scores.shape)} "
                f"and {tuple(level_boxes.shape)}"
            )
        num_classes = scores.shape[1]
        flat = scores.reshape(-1)  # (P * C,), index = prior * C + class
        candidates = (flat > score_thr).nonzero().squeeze(1)
        cand_scores = flat[candidates]
        if nms_pre is not None and cand_scores.numel() > nms_pre:
            # Narrow down with topk (linear) before sorting: a busy level has P * C candidates,
            # and sorting all of them took most of the inference time. Every candidate tied
            # with the nms_pre-th score stays, so the stable sort below picks the same pairs.
            kth = cand_scores.topk(nms_pre, sorted=False).values.min()
            narrowed = (cand_scores >= kth).nonzero().squeeze(1)
            candidates, cand_scores = candidates[narrowed], cand_scores[narrowed]
        # Top nms_pre by score; a stable sort breaks ties by lower (prior, class) index.
        order = torch.sort(cand_scores, descending=True, stable=True).indices
        if nms_pre is not None:
            order = order[:nms_pre]
        chosen = candidates[order]
        priors = torch.div(chosen, num_classes, rounding_mode="floor")
        level_scores = cand_scores[order]
        if score_factors is not None:
            factors = score_factors[level]
            if factors.shape != (scores.shape[0],):
                raise ValueError(
                    f"level {level}: score_factors must be ({scores.shape[0]},), got {tuple(factors.shape)}"
                )
            level_scores = level_scores * factors[priors]
        mlvl_boxes.append(level_boxes[priors])
        mlvl_scores.append(level_scores)
        mlvl_labels.append(chosen % num_classes)

    all_boxes = torch.cat(mlvl_boxes)
    all_scores = torch.cat(mlvl_scores)
    all_labels = torch.cat(mlvl_labels)
    keep = batched_nms(all_boxes, all_scores, all_labels, iou_threshold)[:max_per_img]
    return all_boxes[keep], all_scores[keep], all_labels[keep]
