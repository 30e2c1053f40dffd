"""Straightforward per-image ATSS and EATSS in the style of MMDetection's ``ATSSAssigner`` (the
benchmark's references for issue 6; written here from the published algorithm, not copied).

What makes it "MMDetection style", and what the benchmark compares against:

- dense ``(N, M)`` IoU of every prior with every GT, computed with ``(N, M, 2)`` corner temporaries;
- dense ``(N, M)`` centre distances (with an ``(N, M, 2)`` difference temporary and a square root);
- a Python loop over pyramid levels, ``topk`` along the prior axis of each level's ``(N_l, M)`` block;
- candidates' IoU, ``mean + std`` threshold, centre-inside test on expanded ``(M·N,)`` centre copies;
- an ``(M·N,)`` ``-inf`` matrix filled at the positive candidates, and ``max`` over GTs per prior.

Its peak memory grows as N·M (tens of bytes per pair); time as N·M too. Positives agree with
:func:`hcral.assign.atss_assign` except where distances tie at the k-th candidate (``topk``'s tie
order is unspecified; hcral resolves ties to the lower prior index, formulation §5).

EATSS has no MMDetection implementation; :func:`mmdet_style_eatss` is the same dense style applied
to the expansion of formulation §5 (dense ``(N, M)`` predicted-box IoU, masks and scores, ``topk``
per GT, ``max`` over GTs per prior). It agrees with :func:`hcral.assign.eatss_assign` up to the same
tie order and up to rounding at the ``d <= Dis_f`` boundary (it compares square-rooted distances).
"""

from __future__ import annotations

import torch
from torch import Tensor

INF = 100_000_000.0


def pairwise_iou(boxes: Tensor, gts: Tensor, eps: float = 1e-6) -> Tensor:
    """(N, 4) x (M, 4) -> (N, M), through (N, M, 2) corner tensors."""
    area1 = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area2 = (gts[:, 2] - gts[:, 0]) * (gts[:, 3] - gts[:, 1])
    lt = torch.max(boxes[:, None, :2], gts[None, :, :2])  # (N, M, 2)
    rb = torch.min(boxes[:, None, 2:], gts[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = (area1[:, None] + area2[None, :] - overlap).clamp(min=eps)
    return overlap / union


@torch.no_grad()
def mmdet_style_atss(priors: Tensor, num_level_priors: list[int], gt_boxes: Tensor, topk: int = 9) -> Tensor:
    """ATSS for one image; returns ``gt_index (N,)`` (-1 background), like ``atss_assign(...).gt_index``."""
    return _atss(priors, num_level_priors, gt_boxes, topk)[0]


def _atss(priors: Tensor, num_level_priors: list[int], gt_boxes: Tensor, topk: int) -> tuple[Tensor, ...]:
    """``(gt_index, distances, thr)``; the dense intermediates EATSS reuses (None when trivially empty)."""
    num_gt, num_priors = gt_boxes.shape[0], priors.shape[0]
    assigned = priors.new_full((num_priors,), -1, dtype=torch.long)
    if num_gt == 0 or num_priors == 0:
        return assigned, None, None
    overlaps = pairwise_iou(priors, gt_boxes)  # (N, M)

    gt_points = torch.stack(((gt_boxes[:, 0] + gt_boxes[:, 2]) / 2, (gt_boxes[:, 1] + gt_boxes[:, 3]) / 2), dim=1)
    prior_cx = (priors[:, 0] + priors[:, 2]) / 2
    prior_cy = (priors[:, 1] + priors[:, 3]) / 2
    prior_points = torch.stack((prior_cx, prior_cy), dim=1)
    distances = (prior_points[:, None, :] - gt_points[None, :, :]).pow(2).sum(-1).sqrt()  # (N, M)

    # k nearest per level, along the prior axis of each level's block.
    candidate_idxs = []
    start = 0
    for level_size in num_level_priors:
        end = start + level_size
        k = min(topk, level_size)
        _, idx = distances[start:end, :].topk(k, dim=0, largest=False)
        candidate_idxs.append(idx + start)
        start = end
    candidate_idxs = torch.cat(candidate_idxs, dim=0)  # (K, M)

    candidate_overlaps = overlaps[candidate_idxs, torch.arange(num_gt)]  # (K, M)
    thr = candidate_overlaps.mean(0) + candidate_overlaps.std(0)
    is_pos = candidate_overlaps >= thr[None, :]

    # Centre inside the GT, on centre coordinates expanded to (M·N,).
    candidate_idxs = candidate_idxs + torch.arange(num_gt)[None, :] * num_priors
    ep_cx = prior_cx.view(1, -1).expand(num_gt, num_priors).contiguous().view(-1)
    ep_cy = prior_cy.view(1, -1).expand(num_gt, num_priors).contiguous().view(-1)
    flat_idx = candidate_idxs.view(-1)
    cand_cx = ep_cx[flat_idx].view(-1, num_gt)
    cand_cy = ep_cy[flat_idx].view(-1, num_gt)
    left = cand_cx - gt_boxes[:, 0]
    top = cand_cy - gt_boxes[:, 1]
    right = gt_boxes[:, 2] - cand_cx
    bottom = gt_boxes[:, 3] - cand_cy
    is_in_gts = torch.stack((left, top, right, bottom), dim=1).min(dim=1)[0] > 0.01
    is_pos = is_pos & is_in_gts

    # -inf everywhere but the positive candidates; each prior goes to the GT of highest IoU.
    overlaps_inf = torch.full_like(overlaps, -INF).t().contiguous().view(-1)  # (M·N,)
    index = flat_idx[is_pos.view(-1)]
    overlaps_inf[index] = overlaps.t().contiguous().view(-1)[index]
    overlaps_inf = overlaps_inf.view(num_gt, -1).t()  # (N, M)
    max_overlaps, argmax = overlaps_inf.max(dim=1)
    positive = max_overlaps != -INF
    assigned[positive] = argmax[positive]
    return assigned, distances, thr


@torch.no_grad()
def mmdet_style_eatss(
    priors: Tensor,
    num_level_priors: list[int],
    gt_boxes: Tensor,
    gt_labels: Tensor,
    pred_boxes: Tensor,
    pred_scores: Tensor,
    topk: int = 9,
    max_extra: int = 4,
) -> Tensor:
    """EATSS for one image in the dense style; returns ``gt_index (N,)`` like ``eatss_assign``."""
    assigned, distances, thr = _atss(priors, num_level_priors, gt_boxes, topk)
    if distances is None or max_extra == 0:
        return assigned
    num_gt = gt_boxes.shape[0]
    gt_ids = torch.arange(num_gt)
    # Dis_f per GT: the largest distance of its ATSS positives (-INF without any).
    own = assigned[:, None] == gt_ids[None, :]  # (N, M)
    dis_f = torch.where(own, distances, torch.full_like(distances, -INF)).max(dim=0).values
    # Eligible: background, within Dis_f, centre inside, predicted IoU >= thr -- all dense (N, M).
    cx = (priors[:, 0] + priors[:, 2]) / 2
    cy = (priors[:, 1] + priors[:, 3]) / 2
    sides = torch.stack(
        (cx[:, None] - gt_boxes[:, 0], cy[:, None] - gt_boxes[:, 1], gt_boxes[:, 2] - cx[:, None],
         gt_boxes[:, 3] - cy[:, None]), dim=-1,
    )  # (N, M, 4)  # fmt: skip
    inside = sides.min(dim=-1).values > 0.01
    q = pairwise_iou(pred_boxes, gt_boxes)  # (N, M)
    eligible = (assigned < 0)[:, None] & (distances <= dis_f[None, :]) & inside & (q >= thr[None, :])
    score = torch.where(eligible, pred_scores[:, gt_labels] * q, torch.full_like(q, -INF))
    # At most l per GT by score, then each prior to the GT of highest q.
    top_score, top_prior = score.topk(min(max_extra, score.shape[0]), dim=0)  # (l, M)
    chosen = top_score > -INF
    chosen_q = torch.full_like(q, -INF)
    cols = gt_ids[None, :].expand_as(top_prior)
    chosen_q[top_prior[chosen], cols[chosen]] = q[top_prior[chosen], cols[chosen]]
    best_q, best_gt = chosen_q.max(dim=1)
    extra = best_q > -INF
    assigned[extra] = best_gt[extra]
    return assigned
