"""Building blocks shared by the assigners: validation, flattened GTs, chunked pairwise geometry,
exact k-nearest selection and conflict resolution.

Every function here that makes a "GTs x priors" tensor is named, so the memory bound of the
assigners can be checked from outside (tests wrap them and record the sizes they produce).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from hcral.ops.boxes import EPS, box_area

# Largest number of (GT, prior) pairs held at once in any pairwise tensor (``max_pairs=None``
# picks by device). The assigners keep roughly 8-10 bytes per pair alive (see their docstrings).
# On CPU, blocks of ~1M pairs stay cache-friendly and avoid fresh page faults: measured 1.7x faster
# than 16M-pair blocks for ATSS at N = 20k, M = 500. GPUs want large blocks to amortise launches;
# 16M pairs bound the transient memory to a few hundred MB whatever the number of GTs.
DEFAULT_MAX_PAIRS_CPU = 1 << 20
DEFAULT_MAX_PAIRS = 1 << 24

# §5: a prior's centre must lie inside its GT with every side distance above this many pixels.
CENTER_MARGIN = 0.01


# ---------------------------------------------------------------------------------------------
# dtypes and validation
# ---------------------------------------------------------------------------------------------


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp16/bf16 coordinates are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def accumulate_dtype(device: torch.device) -> torch.dtype:
    """dtype of ATSS's mean/std: float64, where the sum of float32 IoUs is exact and so does not
    depend on the reduction order (device or batch layout); MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def check_priors(fn: str, priors: Tensor, num_level_priors: Sequence[int] | None = None) -> list[int]:
    """Validate ``priors (N, 4)`` and ``num_level_priors`` (non-negative ints summing to N)."""
    if priors.dim() != 2 or priors.shape[-1] != 4:
        raise ValueError(f"{fn}: priors must have shape (N, 4), got {tuple(priors.shape)}")
    if not priors.is_floating_point():
        raise ValueError(f"{fn}: priors must be floating point, got {priors.dtype}")
    if num_level_priors is None:
        return [priors.shape[0]]
    levels = [int(n) for n in num_level_priors]
    if any(n < 0 for n in levels) or sum(levels) != priors.shape[0]:
        raise ValueError(
            f"{fn}: num_level_priors={levels} must be non-negative and sum to the number of priors "
            f"N={priors.shape[0]} (sum is {sum(levels)})"
        )
    return levels


def check_batched_gts(
    fn: str, gt_boxes: Tensor, gt_labels: Tensor, gt_mask: Tensor | None, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate padded GTs ``(B, M, 4)``, ``(B, M)``, mask ``(B, M)`` bool (None: all valid);
    return them on ``device``, labels as int64."""
    if gt_boxes.dim() != 3 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"{fn}: gt_boxes must have shape (B, M, 4), got {tuple(gt_boxes.shape)}")
    b, m = gt_boxes.shape[:2]
    if tuple(gt_labels.shape) != (b, m):
        raise ValueError(f"{fn}: gt_labels must have shape {(b, m)} to match gt_boxes, got {tuple(gt_labels.shape)}")
    if gt_labels.is_floating_point() or gt_labels.dtype == torch.bool:
        raise ValueError(f"{fn}: gt_labels must be an integer tensor, got {gt_labels.dtype}")
    if gt_mask is None:
        gt_mask = torch.ones((b, m), dtype=torch.bool, device=device)
    elif tuple(gt_mask.shape) != (b, m) or gt_mask.dtype != torch.bool:
        raise ValueError(
            f"{fn}: gt_mask must be a bool tensor of shape {(b, m)}, got {gt_mask.dtype} {tuple(gt_mask.shape)}"
        )
    gt_boxes, gt_mask = gt_boxes.to(device), gt_mask.to(device)
    # Padding may hold anything; real GTs must be finite (NaN would poison the distance ranking).
    if not bool((torch.isfinite(gt_boxes).all(dim=-1) | ~gt_mask).all()):
        raise ValueError(f"{fn}: gt_boxes must be finite where gt_mask is True, got NaN or inf")
    return gt_boxes, gt_labels.to(device=device, dtype=torch.long), gt_mask


def check_single_gts(fn: str, gt_boxes: Tensor, gt_labels: Tensor) -> None:
    if gt_boxes.dim() != 2 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"{fn}: gt_boxes must have shape (M, 4), got {tuple(gt_boxes.shape)}")
    if gt_labels.dim() != 1 or gt_labels.shape[0] != gt_boxes.shape[0]:
        raise ValueError(
            f"{fn}: gt_labels must have shape ({gt_boxes.shape[0]},) to match gt_boxes, got {tuple(gt_labels.shape)}"
        )


class FlatGts(NamedTuple):
    """The valid GTs of a batch, flattened to G = number of valid GTs.

    ``boxes (G, 4)`` in the compute dtype, ``labels (G,)``, ``image (G,)`` the image each belongs to,
    ``local (G,)`` its index in that image's row of the padded input (what ``gt_index`` reports).
    """

    boxes: Tensor
    labels: Tensor
    image: Tensor
    local: Tensor


def flatten_gts(gt_boxes: Tensor, gt_labels: Tensor, gt_mask: Tensor, dtype: torch.dtype) -> FlatGts:
    """Padded ``(B, M, ·)`` GTs -> :class:`FlatGts` of the valid ones, in (image, index) order."""
    b, m = gt_mask.shape
    device = gt_mask.device
    image = torch.arange(b, device=device).repeat_interleave(m)
    local = torch.arange(m, device=device).repeat(b)
    keep = gt_mask.reshape(-1)
    return FlatGts(
        boxes=gt_boxes.reshape(-1, 4)[keep].to(dtype),
        labels=gt_labels.reshape(-1)[keep],
        image=image[keep],
        local=local[keep],
    )


def resolve_max_pairs(max_pairs: int | None, device: torch.device) -> int:
    """``max_pairs``, or the device's default when None."""
    if max_pairs is None:
        return DEFAULT_MAX_PAIRS_CPU if device.type == "cpu" else DEFAULT_MAX_PAIRS
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
    return int(max_pairs)


def gt_chunks(num_gts: int, pairs_per_gt: int, max_pairs: int) -> list[slice]:
    """Slices of GTs such that each chunk holds at most ``max_pairs`` pairs (at least one GT)."""
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
    size = max(1, max_pairs // max(pairs_per_gt, 1))
    return [slice(s, min(s + size, num_gts)) for s in range(0, num_gts, size)]


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------


def box_center_xy(boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Centre x and y of xyxy boxes ``(..., 4)``, each ``(...)``."""
    return (boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2


def sq_center_dist(
    ax: Tensor, ay: Tensor, bx: Tensor, by: Tensor, out: Tensor | None = None, scratch: Tensor | None = None
) -> Tensor:
    """Squared centre distance ``(ax-bx)² + (ay-by)²``, broadcasting (pairwise or aligned).

    §5 ranks and bounds by the L2 distance d; comparing d² is the same order in real arithmetic and
    avoids the ties a rounded square root would create. Pairwise and aligned calls run the same
    operations, so a pair gets bit-identical values either way (EATSS relies on it).

    ``out`` and ``scratch`` (the broadcast shape) receive the result and the y term when given:
    the assigners reuse two buffers for all their pairwise blocks (see :func:`pair_workspace`).
    """
    dx = ax - bx if out is None else torch.sub(ax, bx, out=out)
    dy = ay - by if scratch is None else torch.sub(ay, by, out=scratch)
    return dx.mul_(dx).add_(dy.mul_(dy))


def pair_workspace(chunks: list[slice], num_priors: int, like: Tensor) -> Tensor:
    """Two flat buffers ``(2, S)`` big enough for a ``(c, num_priors)`` block of any of the
    :func:`gt_chunks` ``chunks``, to pass to :func:`sq_center_dist` as ``out`` and ``scratch``.

    On CPU a fresh multi-MB tensor costs more in page faults than the arithmetic done on it, so
    every pairwise block of one assigner call reuses these (their pages are touched once). They hold
    one chunk's pairs, so the memory bound of the module docstrings is unchanged.
    """
    rows = max((chunk.stop - chunk.start for chunk in chunks), default=0)
    return like.new_empty((2, rows * num_priors))


def block_views(work: Tensor, rows: int, cols: int) -> tuple[Tensor, Tensor]:
    """``(rows, cols)`` views of the two buffers of :func:`pair_workspace`."""
    return work[0, : rows * cols].view(rows, cols), work[1, : rows * cols].view(rows, cols)


def centers_inside(cx: Tensor, cy: Tensor, boxes: Tensor, margin: float) -> Tensor:
    """§5: centre strictly inside the box by more than ``margin`` on all four sides (broadcasting)."""
    return (
        ((cx - boxes[..., 0]) > margin)
        & ((cy - boxes[..., 1]) > margin)
        & ((boxes[..., 2] - cx) > margin)
        & ((boxes[..., 3] - cy) > margin)
    )


def gt_prior_iou(gt_boxes: Tensor, priors: Tensor, *, eps: float = EPS) -> Tensor:
    """IoU of GTs ``(B, c, 4)`` with priors ``(N, 4)`` -> ``(B, c, N)``.

    The same operations as :func:`hcral.ops.boxes.box_iou` (values are bit-identical to
    ``box_iou(priors, gt).T``), laid out per x and y to keep only (B, c, N) temporaries.
    """
    area_g = box_area(gt_boxes)[..., None]  # (B, c, 1)
    area_p = box_area(priors)  # (N,)
    g = gt_boxes[..., None, :]  # (B, c, 1, 4)
    iw = (torch.minimum(priors[:, 2], g[..., 2]) - torch.maximum(priors[:, 0], g[..., 0])).clamp_(min=0)
    ih = (torch.minimum(priors[:, 3], g[..., 3]) - torch.maximum(priors[:, 1], g[..., 1])).clamp_(min=0)
    inter = iw.mul_(ih)
    union = (area_p + area_g).sub_(inter).clamp_(min=eps)
    return inter.div_(union)


def prior_iof(boxes: Tensor, priors: Tensor, *, eps: float = EPS) -> Tensor:
    """Intersection over the *prior's* area of boxes ``(B, c, 4)`` with priors ``(N, 4)`` -> ``(B, c, N)``."""
    area_p = box_area(priors)  # (N,)
    g = boxes[..., None, :]
    iw = (torch.minimum(priors[:, 2], g[..., 2]) - torch.maximum(priors[:, 0], g[..., 0])).clamp_(min=0)
    ih = (torch.minimum(priors[:, 3], g[..., 3]) - torch.maximum(priors[:, 1], g[..., 1])).clamp_(min=0)
    return iw.mul_(ih).div_(area_p.clamp(min=eps))


# ---------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------


def k_nearest(dist: Tensor, k: int) -> Tensor:
    """Indices ``(c, k)`` of the k smallest entries of each row of ``dist (c, n)``, k <= n.

    Exact and implementation-independent (§5, step 3): equal values go to the lower index. The
    returned set is unique; indices come sorted ascending within each row. ``topk`` alone is not
    stable, so one more entry is asked of it: where the k-th smallest value is below the (k+1)-th,
    the k smallest entries are unique and topk's first k are exactly them. Only rows where the two
    are equal (a tie across the cut) are recomputed exactly (one host sync on GPU).
    """
    c, n = dist.shape
    if k >= n:  # every entry is taken
        return torch.arange(n, device=dist.device).expand(c, n)
    vals, idx = dist.topk(k + 1, dim=1, largest=False, sorted=True)
    kth = vals[:, k - 1 : k]  # (c, 1) the k-th smallest value
    idx = idx[:, :k]
    ambiguous = kth.squeeze(1) == vals[:, k]
    if bool(ambiguous.any()):
        rows = ambiguous.nonzero().squeeze(1)
        d, t = dist[rows], kth[rows]
        below = d < t
        tied = d == t
        need = k - below.sum(dim=1, keepdim=True)
        take = below | (tied & (tied.cumsum(dim=1) <= need))  # exactly k per row
        idx[rows] = take.nonzero()[:, 1].view(-1, k)
    return idx.sort(dim=1).values


def resolve_conflicts(slot: Tensor, gt: Tensor, score: Tensor) -> Tensor:
    """Give each slot (prior) to one of its competing GTs: highest score, equal scores -> lower GT.

    ``slot, gt, score (P,)``: candidate pairs, each (slot, gt) at most once. Returns the indices of
    the winning pairs, one per distinct slot. Stable sorts from the least significant key to the most
    (GT ascending, score descending, slot ascending) give the exact lexicographic order on any device;
    the first pair of each slot wins. Works on the P pairs only: no (B·N,) tensor is made.
    """
    order = torch.sort(gt, stable=True).indices
    order = order[torch.sort(score[order], descending=True, stable=True).indices]
    order = order[torch.sort(slot[order], stable=True).indices]
    sorted_slot = slot[order]
    first = torch.ones_like(sorted_slot, dtype=torch.bool)
    first[1:] = sorted_slot[1:] != sorted_slot[:-1]
    return order[first]
