"""ATSS: adaptive training sample selection (Zhang et al., "Bridging the Gap Between Anchor-based
and Anchor-free Detection via Adaptive Training Sample Selection", CVPR 2020), with MMDetection's
``ATSSAssigner`` semantics and the exact tie rules of the formulation (§5).

For each GT j:

1. on every level, the ``min(k, N_level)`` priors whose centres are closest to the GT centre are
   candidates (equal distances -> lower prior index);
2. ``thr_j = mean + std`` of the candidates' IoU with g_j (unbiased std, 0 for one candidate);
3. a candidate is positive if ``IoU >= thr_j`` and its centre lies inside g_j by more than 0.01 px;
4. a prior positive for several GTs goes to the highest IoU (equal IoU -> lower GT index).

Memory: the only GT x prior tensors are the squared distances of one level for a chunk of GTs,
``(c, N_level)`` with ``c·N <= max_pairs``; about 10 bytes per pair are alive at once (float32
distances plus boolean tie masks), so the transient peak is ~10·max_pairs bytes (~170 MB at the
GPU default of 2^24 pairs, ~10 MB at the CPU default of 2^20) plus O(B·N + G·k·L) for the
results, independent of the number of GTs. Measured on CPU for N = 200k priors and M = 1000 GTs
(``benchmarks/assign_timing.py --memory-only``): +16 MB (CPU default), +140 MB (2^24 pairs).
The IoF pass of ``ignore_boxes`` keeps ~12 bytes per (ignore box, prior) pair, same budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from hcral.assign.types import BACKGROUND, IGNORED, Assignment
from hcral.assign.utils import (
    CENTER_MARGIN,
    FlatGts,
    accumulate_dtype,
    box_center_xy,
    centers_inside,
    check_batched_gts,
    check_priors,
    check_single_gts,
    compute_dtype,
    flatten_gts,
    gt_chunks,
    k_nearest,
    prior_iof,
    resolve_max_pairs,
    resolve_conflicts,
    sq_center_dist,
)
from hcral.ops.boxes import aligned_iou

__all__ = ["atss_assign", "atss_assign_batched"]

# MMDetection's threshold for ignore regions when they are enabled (its default -1 disables them).
DEFAULT_IGNORE_IOF_THR = 0.5


class AtssState(NamedTuple):
    """What ATSS leaves for EATSS. Slots are ``image * N + prior`` over the batch (B·N).

    ``winner (B·N,)``: index into the flat GTs, or G where the prior is not positive;
    ``iou (B·N,)``: the winner's IoU (``-inf`` where none); ``thr (G,)``: ``thr_j`` (accumulate dtype).
    """

    winner: Tensor
    iou: Tensor
    thr: Tensor


def atss_core(
    priors: Tensor,
    level_sizes: list[int],
    gts: FlatGts,
    num_images: int,
    *,
    topk: int,
    center_margin: float,
    max_pairs: int,
) -> AtssState:
    """ATSS on flattened GTs (§5 steps 1-6). ``priors (N, 4)`` in the compute dtype, shared by all images."""
    device = priors.device
    n, g = priors.shape[0], gts.boxes.shape[0]
    px, py = box_center_xy(priors)  # (N,)
    gx, gy = box_center_xy(gts.boxes)  # (G,)

    # §5 step 3: k nearest priors per level, one level of one GT chunk at a time.
    starts = [sum(level_sizes[:i]) for i in range(len(level_sizes))]
    per_level_k = [min(topk, size) for size in level_sizes]
    num_cand = sum(per_level_k)
    cand = torch.empty((g, num_cand), dtype=torch.long, device=device)  # (G, K) prior indices
    for chunk in gt_chunks(g, n, max_pairs):
        col = 0
        for start, size, k in zip(starts, level_sizes, per_level_k):
            if k == 0:
                continue
            dist = sq_center_dist(
                px[None, start : start + size], py[None, start : start + size], gx[chunk, None], gy[chunk, None]
            )  # (c, N_level)
            cand[chunk, col : col + k] = k_nearest(dist, k) + start
            col += k

    # §5 step 4: thr_j = mean + unbiased std of the candidates' IoU (std 0 for one candidate).
    iou = aligned_iou(priors[cand], gts.boxes[:, None, :].expand(g, num_cand, 4))  # (G, K)
    iou_acc = iou.to(accumulate_dtype(device))
    thr = iou_acc.mean(dim=1)
    if num_cand > 1:
        thr = thr + iou_acc.std(dim=1)

    # §5 step 5: IoU >= thr (not >) and centre inside g_j by more than the margin.
    is_pos = (iou_acc >= thr[:, None]) & centers_inside(px[cand], py[cand], gts.boxes[:, None, :], center_margin)

    # §5 step 6: highest IoU wins; equal IoU -> lower GT index (flat order is (image, index)).
    gt_id = torch.arange(g, device=device)[:, None].expand(g, num_cand)
    winner, best = resolve_conflicts(
        slot=(gts.image[:, None] * n + cand).reshape(-1),
        gt=torch.where(is_pos, gt_id, g).reshape(-1),
        score=torch.where(is_pos, iou, float("-inf")).reshape(-1),
        num_slots=num_images * n,
        none=g,
    )
    return AtssState(winner=winner, iou=best, thr=thr)


def build_assignment(
    winner: Tensor, iou: Tensor, gts: FlatGts, num_images: int, num_priors: int, expanded: Tensor | None = None
) -> Assignment:
    """Flat winners (B·N,) -> a (B, N) :class:`Assignment`."""
    g = gts.boxes.shape[0]
    pos = winner < g
    w = winner.clamp(max=max(g - 1, 0))
    shape = (num_images, num_priors)
    if g == 0:
        return Assignment.background(shape, device=winner.device, dtype=iou.dtype)
    return Assignment(
        gt_index=torch.where(pos, gts.local[w], BACKGROUND).view(shape),
        labels=torch.where(pos, gts.labels[w], -1).view(shape),
        max_iou=torch.where(pos, iou, 0).view(shape),
        expanded=(torch.zeros_like(pos) if expanded is None else expanded).view(shape),
    )


def _mark_ignored(
    assignment: Assignment,
    priors: Tensor,
    ignore_boxes: Tensor,
    ignore_mask: Tensor,
    has_gt: Tensor,
    *,
    ignore_iof_thr: float,
    max_pairs: int,
) -> None:
    """Non-positive priors covered by an ignore box (IoF over the prior's area > thr) become IGNORED,
    in images that have at least one GT (§5 step 2: an image without GT is all background)."""
    b, n = assignment.gt_index.shape
    covered = torch.zeros((b, n), dtype=torch.bool, device=priors.device)
    ignore_boxes = ignore_boxes.to(priors)
    for chunk in gt_chunks(ignore_boxes.shape[1], b * n, max_pairs):
        iof = prior_iof(ignore_boxes[:, chunk], priors)  # (B, c, N)
        covered |= ((iof > ignore_iof_thr) & ignore_mask[:, chunk, None]).any(dim=1)
    hit = covered & ~assignment.pos_mask & has_gt[:, None]
    assignment.gt_index.masked_fill_(hit, IGNORED)


@torch.no_grad()
def atss_assign_batched(
    priors: Tensor,
    num_level_priors: Sequence[int],
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_mask: Tensor | None = None,
    *,
    topk: int = 9,
    ignore_boxes: Tensor | None = None,
    ignore_mask: Tensor | None = None,
    ignore_iof_thr: float = DEFAULT_IGNORE_IOF_THR,
    center_margin: float = CENTER_MARGIN,
    max_pairs: int | None = None,
) -> Assignment:
    """ATSS for a batch of images sharing one prior layout (formulation §5).

    Args:
        priors: ``(N, 4)`` xyxy prior boxes, level-major (the same for every image of the batch).
        num_level_priors: priors per level, in level order, summing to N.
        gt_boxes: ``(B, M, 4)`` xyxy GT boxes, padded to the batch's largest M.
        gt_labels: ``(B, M)`` int64 classes.
        gt_mask: ``(B, M)`` bool, True for real GTs (padding and ignored GTs False); None: all real.
        topk: candidates per level per GT (k of §5).
        ignore_boxes, ignore_mask: optional ``(B, K, 4)`` ignore regions and their ``(B, K)`` validity.
            A non-positive prior whose box has intersection-over-its-own-area > ``ignore_iof_thr``
            with an ignore region becomes IGNORED (-2) (a post-step; the positives are unchanged).
            ``ignore_iof_thr <= 0`` disables it, as in MMDetection. Images without GT stay all background.
        center_margin: the 0.01 px margin of §5 step 5.
        max_pairs: most (GT, prior) pairs held at once (memory bound, see the module docstring);
            None: 2^20 on CPU (cache-friendly), 2^24 elsewhere.

    Returns:
        A batched :class:`Assignment` with ``(B, N)`` fields; ``gt_index`` indexes each image's row
        of ``gt_boxes``. Equal to running :func:`atss_assign` on every image.
    """
    fn = "atss_assign"
    levels = check_priors(fn, priors, num_level_priors)
    if topk < 1:
        raise ValueError(f"{fn}: topk must be >= 1, got {topk}")
    gt_boxes, gt_labels, gt_mask = check_batched_gts(fn, gt_boxes, gt_labels, gt_mask, priors.device)
    max_pairs = resolve_max_pairs(max_pairs, priors.device)
    dtype = compute_dtype(priors, gt_boxes)
    b, n = gt_boxes.shape[0], priors.shape[0]
    gts = flatten_gts(gt_boxes, gt_labels, gt_mask, dtype)
    if n == 0 or gts.boxes.shape[0] == 0:  # §5 step 2
        return Assignment.background((b, n), device=priors.device, dtype=dtype)
    priors_c = priors.to(dtype)
    state = atss_core(priors_c, levels, gts, b, topk=topk, center_margin=center_margin, max_pairs=max_pairs)
    result = build_assignment(state.winner, state.iou, gts, b, n)
    if ignore_boxes is not None and ignore_boxes.numel() > 0 and ignore_iof_thr > 0:
        if ignore_boxes.dim() != 3 or ignore_boxes.shape[0] != b or ignore_boxes.shape[-1] != 4:
            raise ValueError(f"{fn}: ignore_boxes must have shape ({b}, K, 4), got {tuple(ignore_boxes.shape)}")
        if ignore_mask is None:
            ignore_mask = torch.ones(ignore_boxes.shape[:2], dtype=torch.bool, device=priors.device)
        _mark_ignored(
            result, priors_c, ignore_boxes, ignore_mask.to(priors.device), gt_mask.any(dim=1),
            ignore_iof_thr=ignore_iof_thr, max_pairs=max_pairs,
        )
    return result


@torch.no_grad()
def atss_assign(
    priors: Tensor,
    num_level_priors: Sequence[int],
    gt_boxes: Tensor,
    gt_labels: Tensor,
    *,
    topk: int = 9,
    ignore_boxes: Tensor | None = None,
    ignore_iof_thr: float = DEFAULT_IGNORE_IOF_THR,
    center_margin: float = CENTER_MARGIN,
    max_pairs: int | None = None,
) -> Assignment:
    """ATSS for one image (formulation §5; MMDetection's ``ATSSAssigner(topk=9)`` positives).

    ``priors (N, 4)`` xyxy, level-major; ``num_level_priors`` per level summing to N;
    ``gt_boxes (M, 4)``; ``gt_labels (M,)`` int64; ``ignore_boxes (K, 4)`` optional ignore regions
    (see :func:`atss_assign_batched`). Returns an :class:`Assignment` with ``(N,)`` fields.
    """
    check_priors("atss_assign", priors, num_level_priors)
    check_single_gts("atss_assign", gt_boxes, gt_labels)
    if ignore_boxes is not None and (ignore_boxes.dim() != 2 or ignore_boxes.shape[-1] != 4):
        raise ValueError(f"atss_assign: ignore_boxes must have shape (K, 4), got {tuple(ignore_boxes.shape)}")
    batched = atss_assign_batched(
        priors, num_level_priors, gt_boxes[None], gt_labels[None],
        topk=topk, ignore_boxes=None if ignore_boxes is None else ignore_boxes[None],
        ignore_iof_thr=ignore_iof_thr, center_margin=center_margin, max_pairs=max_pairs,
    )
    return batched.unbind()[0]
