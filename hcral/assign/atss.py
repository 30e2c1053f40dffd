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
``(c, N_level)`` with ``c·N <= max_pairs``, computed into one workspace of two float32 buffers that
every chunk and level reuses (8 bytes per pair; rows whose k-th distance is tied add boolean masks
for those rows only), so the transient peak is ~8·max_pairs bytes (~130 MB at the GPU default of
2^24 pairs, ~8 MB at the CPU default of 2^20) plus O(B·N + G·k·L) for the results, independent of
the number of GTs. Positives are kept as a sparse list until the (B, N) result is written once.
Measured on CPU for N = 200k priors and M = 1000 GTs (``python -m benchmarks.bench_assign``, fresh
process, peak resident memory over the inputs): +13 MB (CPU default). The IoF pass of
``ignore_boxes`` keeps ~12 bytes per (ignore box, prior) pair, same budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from hcral.assign.types import IGNORED, Assignment
from hcral.assign.utils import (
    CENTER_MARGIN,
    FlatGts,
    accumulate_dtype,
    block_views,
    box_center_xy,
    centers_inside,
    check_batched_gts,
    check_priors,
    check_single_gts,
    compute_dtype,
    flatten_gts,
    gt_chunks,
    k_nearest,
    pair_workspace,
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
    """What ATSS leaves for EATSS: its positives as a sparse list, one entry per positive prior.

    ``slot (P,)``: ``image * N + prior`` over the batch (B·N), each at most once; ``gt (P,)``: index
    into the flat GTs; ``iou (P,)``: the prior box's IoU with it; ``thr (G,)``: ``thr_j`` (accumulate
    dtype). Dense ``(B, N)`` results are only built once, at the end (:func:`build_assignment`).
    """

    slot: Tensor
    gt: Tensor
    iou: Tensor
    thr: Tensor


def atss_core(
    priors: Tensor,
    level_sizes: list[int],
    gts: FlatGts,
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
    chunks = gt_chunks(g, n, max_pairs)
    work = pair_workspace(chunks, max(level_sizes), priors)  # reused by every (c, N_level) block
    for chunk in chunks:
        col = 0
        for start, size, k in zip(starts, level_sizes, per_level_k):
            if k == 0:
                continue
            out, scratch = block_views(work, chunk.stop - chunk.start, size)
            dist = sq_center_dist(
                px[None, start : start + size], py[None, start : start + size], gx[chunk, None], gy[chunk, None],
                out, scratch,
            )  # (c, N_level), in the workspace  # fmt: skip
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
    gt_id, col = is_pos.nonzero(as_tuple=True)  # the positive (GT, candidate) pairs
    slot = gts.image[gt_id] * n + cand[gt_id, col]
    score = iou[gt_id, col]
    win = resolve_conflicts(slot, gt_id, score)
    return AtssState(slot=slot[win], gt=gt_id[win], iou=score[win], thr=thr)


def build_assignment(
    state: AtssState, gts: FlatGts, num_images: int, num_priors: int, expanded: Tensor | None = None
) -> Assignment:
    """The positives of ``state`` (and ``expanded (P,)``, True for EATSS's extras) -> a (B, N) :class:`Assignment`."""
    result = Assignment.background((num_images, num_priors), device=state.iou.device, dtype=state.iou.dtype)
    if state.slot.numel() == 0:
        return result
    result.gt_index.view(-1)[state.slot] = gts.local[state.gt]
    result.labels.view(-1)[state.slot] = gts.labels[state.gt]
    result.max_iou.view(-1)[state.slot] = state.iou
    if expanded is not None:
        result.expanded.view(-1)[state.slot] = expanded
    return result


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
    state = atss_core(priors_c, levels, gts, topk=topk, center_margin=center_margin, max_pairs=max_pairs)
    result = build_assignment(state, gts, b, n)
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
