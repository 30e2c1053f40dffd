"""EATSS: expanded ATSS (formulation §5, "Expansion"; Huang et al., arXiv:2408.17182).

ATSS first (see :mod:`hcral.assign.atss`); then, with detached predictions ``b_i`` (boxes) and
``p_i`` (class probabilities) and ``l = max_extra > 0``, for each GT j with ATSS positives P_j:

1. ``Dis_f(j) = max_{i in P_j} d_ij`` (P_j: the priors ATSS finally assigned to j);
2. ``E_j``: priors that are background after ATSS, with ``d_ij <= Dis_f(j)`` and centre inside
   g_j by more than the 0.01 margin;
3. keep those with ``q_ij = IoU(b_i, g_j) >= thr_j`` (ATSS's threshold of j);
4. rank by ``Q_ij = p_{i,c_j} · q_ij`` (descending), ties by smaller ``d_ij``, then lower prior
   index; take at most l per GT;
5. a prior chosen by several GTs goes to the highest ``q_ij`` (equal: lower GT index); the losing
   GT is not refilled. Extras never replace ATSS positives; ``expanded`` marks them.

Memory: step 2 looks at every prior for every GT with positives, in chunks of GTs with
``c·N <= max_pairs``; the distances go to a reused two-buffer float32 workspace and a boolean mask
is made per chunk (9 bytes per pair), i.e. ~9·max_pairs bytes (~150 MB at the GPU default of 2^24
pairs, ~9 MB at the CPU default), plus the pairs within Dis_f (a few thousand per GT) and ATSS's own
bound (:mod:`hcral.assign.atss`). Measured on CPU for N = 200k, M = 1000 (``python -m
benchmarks.bench_assign``): tens of MB over the inputs, see ``docs/performance.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hcral.assign.atss import AtssState, atss_assign_batched, atss_core, build_assignment
from hcral.assign.types import Assignment
from hcral.assign.utils import (
    CENTER_MARGIN,
    block_views,
    box_center_xy,
    centers_inside,
    check_batched_gts,
    check_priors,
    check_single_gts,
    compute_dtype,
    flatten_gts,
    gt_chunks,
    pair_workspace,
    resolve_conflicts,
    resolve_max_pairs,
    sq_center_dist,
)
from hcral.defaults import EATSS_MAX_EXTRA
from hcral.ops.boxes import aligned_iou

__all__ = ["eatss_assign", "eatss_assign_batched"]


def _rank_within_gt(gt: Tensor, score: Tensor, dist: Tensor, num_gts: int) -> Tensor:
    """Rank (0 = best) of each pair among its GT's pairs by (score desc, dist asc, input order).

    Pairs must come in (GT, prior index) order; stable sorts from the least significant key
    (dist, then -score, then GT) give the exact lexicographic order on any device.
    """
    order = torch.sort(dist, stable=True).indices
    order = order[torch.sort(-score[order], stable=True).indices]
    order = order[torch.sort(gt[order], stable=True).indices]
    gt_sorted = gt[order]
    counts = torch.bincount(gt_sorted, minlength=num_gts)
    first = torch.cumsum(counts, 0) - counts  # position of each GT's first pair
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=gt.device) - first[gt_sorted]
    return rank


@torch.no_grad()
def eatss_assign_batched(
    priors: Tensor,
    num_level_priors: Sequence[int],
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_mask: Tensor | None = None,
    *,
    pred_boxes: Tensor | None = None,
    pred_scores: Tensor | None = None,
    topk: int = 9,
    max_extra: int = EATSS_MAX_EXTRA,
    center_margin: float = CENTER_MARGIN,
    max_pairs: int | None = None,
) -> Assignment:
    """EATSS for a batch sharing one prior layout (formulation §5).

    Args:
        priors, num_level_priors, gt_boxes, gt_labels, gt_mask, topk, center_margin, max_pairs:
            as :func:`~hcral.assign.atss.atss_assign_batched` (``gt_boxes (B, M, 4)`` padded).
        pred_boxes: ``(B, N, 4)`` detached decoded boxes b_i (xyxy, pixels).
        pred_scores: ``(B, N, C)`` detached probabilities p_i (after the sigmoid).
        max_extra: l, the most extra positives per GT. ``0``, or no predictions, gives ATSS exactly.

    Returns:
        A batched :class:`Assignment` ``(B, N)``; ``expanded`` is True for the positives EATSS added.
    """
    fn = "eatss_assign"
    if (pred_boxes is None) != (pred_scores is None):
        raise ValueError(f"{fn}: give both pred_boxes and pred_scores, or neither (got only one)")
    if max_extra < 0:
        raise ValueError(f"{fn}: max_extra must be >= 0, got {max_extra}")
    if pred_boxes is None or pred_scores is None or max_extra == 0:
        return atss_assign_batched(
            priors, num_level_priors, gt_boxes, gt_labels, gt_mask,
            topk=topk, center_margin=center_margin, max_pairs=max_pairs,
        )
    levels = check_priors(fn, priors, num_level_priors)
    if topk < 1:
        raise ValueError(f"{fn}: topk must be >= 1, got {topk}")
    gt_boxes, gt_labels, gt_mask = check_batched_gts(fn, gt_boxes, gt_labels, gt_mask, priors.device)
    max_pairs = resolve_max_pairs(max_pairs, priors.device)
    b, n = gt_boxes.shape[0], priors.shape[0]
    if pred_boxes.shape != (b, n, 4):
        raise ValueError(f"{fn}: pred_boxes must have shape {(b, n, 4)}, got {tuple(pred_boxes.shape)}")
    if pred_scores.dim() != 3 or pred_scores.shape[:2] != (b, n):
        raise ValueError(f"{fn}: pred_scores must have shape ({b}, {n}, C), got {tuple(pred_scores.shape)}")
    pred_boxes, pred_scores = pred_boxes.to(priors.device), pred_scores.to(priors.device)
    dtype = compute_dtype(priors, gt_boxes)
    gts = flatten_gts(gt_boxes, gt_labels, gt_mask, dtype)
    g = gts.boxes.shape[0]
    if n == 0 or g == 0:  # §5 step 2
        return Assignment.background((b, n), device=priors.device, dtype=dtype)
    num_classes = pred_scores.shape[-1]
    bad = (gts.labels < 0) | (gts.labels >= num_classes)
    if bool(bad.any()):
        raise ValueError(
            f"{fn}: gt_labels must lie in [0, {num_classes}) (pred_scores has C={num_classes}), "
            f"got {gts.labels[bad][:5].tolist()}"
        )
    priors_c = priors.to(dtype)
    state = atss_core(priors_c, levels, gts, topk=topk, center_margin=center_margin, max_pairs=max_pairs)

    px, py = box_center_xy(priors_c)
    gx, gy = box_center_xy(gts.boxes)

    # Step 1: Dis_f(j)² over the priors ATSS assigned to j (-1 where j has none).
    pos_prior = state.slot % n
    pos_dist = sq_center_dist(px[pos_prior], py[pos_prior], gx[state.gt], gy[state.gt])
    dis_f = pos_dist.new_full((g,), -1.0).scatter_reduce_(0, state.gt, pos_dist, reduce="amax")

    # Step 2: E_j over all priors, for the GTs with positives, in chunks of GTs. The distance test
    # is the selective one: the centre and background tests run on the few pairs it keeps.
    active = (dis_f >= 0).nonzero().squeeze(1)
    background = torch.ones(b * n, dtype=torch.bool, device=priors.device)  # (B·N,)
    background[state.slot] = False
    pair_gt, pair_prior, pair_dist = [active[:0]], [active[:0]], [px[:0]]
    chunks = gt_chunks(active.numel(), n, max_pairs)
    work = pair_workspace(chunks, n, px)  # reused by every (c, N) block
    for chunk in chunks:
        a = active[chunk]
        out, scratch = block_views(work, a.numel(), n)
        dist = sq_center_dist(px[None, :], py[None, :], gx[a, None], gy[a, None], out, scratch)  # (c, N)
        rows, cols = (dist <= dis_f[a, None]).nonzero(as_tuple=True)  # row-major: (GT, prior) order
        cand_gt = a[rows]
        ok = centers_inside(px[cols], py[cols], gts.boxes[cand_gt], center_margin)
        ok &= background[gts.image[cand_gt] * n + cols]
        pair_gt.append(cand_gt[ok])
        pair_prior.append(cols[ok])
        pair_dist.append(dist[rows, cols][ok])
    pg, pi, pd = torch.cat(pair_gt), torch.cat(pair_prior), torch.cat(pair_dist)
    slot = gts.image[pg] * n + pi

    # Step 3: the predicted box must reach the IoU ATSS required of a prior for this GT.
    q = aligned_iou(pred_boxes.reshape(-1, 4)[slot].to(dtype), gts.boxes[pg])
    keep = q.to(state.thr.dtype) >= state.thr[pg]
    pg, pd, slot, q = pg[keep], pd[keep], slot[keep], q[keep]

    # Step 4: at most l per GT by Q = p_{i,c_j}·q_ij, then smaller d, then lower prior index.
    score = pred_scores.reshape(b * n, num_classes)[slot, gts.labels[pg]].to(q.dtype) * q
    chosen = _rank_within_gt(pg, score, pd, g) < max_extra
    pg, slot, q = pg[chosen], slot[chosen], q[chosen]

    # Step 5: a prior chosen by several GTs goes to the highest q (equal: lower GT); no refill.
    # Only background slots compete, so the extras never replace an ATSS positive.
    win = resolve_conflicts(slot, pg, q)
    extra_slot, extra_gt = slot[win], pg[win]
    # max_iou reports the prior box's IoU with its GT for every positive, extras included.
    extra_iou = aligned_iou(priors_c[extra_slot % n], gts.boxes[extra_gt]).to(state.iou.dtype)
    merged = AtssState(
        slot=torch.cat((state.slot, extra_slot)),
        gt=torch.cat((state.gt, extra_gt)),
        iou=torch.cat((state.iou, extra_iou)),
        thr=state.thr,
    )
    expanded = torch.arange(merged.slot.numel(), device=priors.device) >= state.slot.numel()  # the extras
    return build_assignment(merged, gts, b, n, expanded=expanded)


@torch.no_grad()
def eatss_assign(
    priors: Tensor,
    num_level_priors: Sequence[int],
    gt_boxes: Tensor,
    gt_labels: Tensor,
    *,
    pred_boxes: Tensor | None = None,
    pred_scores: Tensor | None = None,
    topk: int = 9,
    max_extra: int = EATSS_MAX_EXTRA,
    center_margin: float = CENTER_MARGIN,
    max_pairs: int | None = None,
) -> Assignment:
    """EATSS for one image (formulation §5): ATSS, plus at most ``max_extra`` positives per GT.

    ``priors (N, 4)``; ``num_level_priors`` summing to N; ``gt_boxes (M, 4)``; ``gt_labels (M,)``;
    ``pred_boxes (N, 4)`` and ``pred_scores (N, C)`` detached predictions (probabilities). See
    :func:`eatss_assign_batched` and the module docstring for the rules. Returns ``(N,)`` fields.
    """
    fn = "eatss_assign"
    check_priors(fn, priors, num_level_priors)
    check_single_gts(fn, gt_boxes, gt_labels)
    if pred_boxes is not None and (pred_boxes.dim() != 2 or pred_boxes.shape[-1] != 4):
        raise ValueError(f"{fn}: pred_boxes must have shape (N, 4), got {tuple(pred_boxes.shape)}")
    if pred_scores is not None and pred_scores.dim() != 2:
        raise ValueError(f"{fn}: pred_scores must have shape (N, C), got {tuple(pred_scores.shape)}")
    batched = eatss_assign_batched(
        priors, num_level_priors, gt_boxes[None], gt_labels[None],
        pred_boxes=None if pred_boxes is None else pred_boxes[None],
        pred_scores=None if pred_scores is None else pred_scores[None],
        topk=topk, max_extra=max_extra, center_margin=center_margin, max_pairs=max_pairs,
    )
    return batched.unbind()[0]
