"""GHM-C: the gradient harmonising classification loss (Li, Liu & Wang, AAAI 2019, arXiv:1811.05181).

Semantics are those of MMDetection's ``GHMC`` (formulation §3, β), computed in one vectorised pass:

- gradient norm ``g = |p - p*|`` with ``p = σ(x)``, per element ``(N, C)``;
- bin edges ``e_b = b / B`` for ``b = 0..B``, the last raised by ``1e-6`` so that ``g = 1`` falls in
  the last bin; element in bin b iff ``e_b <= g < e_{b+1}``;
- ``T`` = number of valid elements (at least 1); ``n_b`` = valid elements in bin b;
- for every non-empty bin: with momentum ``m > 0``, ``acc_b <- m·acc_b + (1 - m)·n_b`` and
  ``β = T / acc_b``; without, ``β = T / n_b``; invalid elements get ``β = 0``;
- every β is divided by the number of non-empty bins, and the loss is ``Σ β·BCE / T``.

The histogram is one ``bucketize`` + ``scatter_add_`` over all elements: no Python loop over bins and
no host synchronisation (``.item()``), so it runs asynchronously on an accelerator.

Under DDP (``sync_counts=True`` and ``torch.distributed`` initialised) the bin counts ``n_b`` and ``T``
are summed over processes with one ``all_reduce``, so every rank computes β (and the momentum state)
from the statistics of the whole global batch and the moving averages stay identical on all ranks.
The per-rank loss is then normalised by ``T_global / world_size``: the mean of the per-rank losses
-- which is what DDP's gradient averaging optimises -- equals the single-process loss of the
concatenated batch exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from hcral.losses._reduction import AVG_FACTOR_EPS, check_ndim, check_reduction, check_shape, upcast

# MMDetection raises the last edge by this much so that g = 1 (a confidently wrong prediction)
# lands in the last bin instead of outside every bin.
GHM_LAST_EDGE_EXTRA = 1e-6


def ghm_edges(bins: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """Bin edges ``(bins + 1,)``: ``b / bins`` for ``b = 0..bins``, the last raised by 1e-6 (§3, β)."""
    edges = torch.arange(bins + 1, dtype=dtype, device=device) / bins
    edges[-1] += GHM_LAST_EDGE_EXTRA
    return edges


def check_ghm_hparams(bins: int, momentum: float, *, where: str) -> None:
    """Validate B (a positive int) and m (in [0, 1))."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"{where}: bins must be a positive int, got {bins!r}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"{where}: momentum must be in [0, 1), got {momentum!r}")


def check_ghm_args(bins: int, momentum: float, acc_sum: Tensor | None, *, where: str) -> None:
    """Validate the GHM hyperparameters and, when momentum > 0, the moving-average state."""
    check_ghm_hparams(bins, momentum, where=where)
    if momentum > 0:
        if acc_sum is None:
            raise ValueError(
                f"{where}: momentum={momentum} needs the moving-average state acc_sum (a ({bins},) float "
                "tensor, updated in place); use GHMCLoss/HCRAClassificationLoss to keep it for you"
            )
        if tuple(acc_sum.shape) != (bins,) or not acc_sum.is_floating_point():
            raise ValueError(
                f"{where}: acc_sum must be a ({bins},) float tensor, got {tuple(acc_sum.shape)} {acc_sum.dtype}"
            )


def _valid_mask(valid: Tensor | None, g: Tensor, *, where: str) -> Tensor | None:
    """Bool mask broadcastable to ``g`` from ``valid``: None (all valid), ``(N,)`` per prior -> ``(N, 1)``,
    or ``g``'s shape. Non-bool masks count as valid where ``> 0`` (MMDetection's ``label_weight > 0``)."""
    if valid is None:
        return None
    mask = valid if valid.dtype == torch.bool else valid > 0
    if mask.shape == g.shape:
        return mask
    if g.dim() == 2 and mask.dim() == 1 and mask.shape[0] == g.shape[0]:
        return mask[:, None]
    raise ValueError(f"{where}: valid must have shape ({g.shape[0]},) or {tuple(g.shape)}, got {tuple(valid.shape)}")


def _distributed_world() -> int | None:
    """World size when torch.distributed is available and initialised, else None."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return None


class GHMBins(NamedTuple):
    """The GHM histogram of one call: β of every element is ``table[slot]``.

    ``slot``: int32 with ``g``'s shape; ``1..B`` are the bins, ``0`` and ``B + 1`` hold the elements
    outside every bin (invalid, ``g < 0``, ``g`` at or above the raised last edge, NaN).
    ``table``: ``(B + 2,)`` β per slot, 0 in the two outer slots. ``normaliser``: 0-d loss normaliser T.
    """

    slot: Tensor
    table: Tensor
    normaliser: Tensor


@torch.no_grad()
def ghm_bins(
    g: Tensor,
    valid: Tensor | None = None,
    *,
    bins: int = 10,
    momentum: float = 0.0,
    acc_sum: Tensor | None = None,
    sync_counts: bool = False,
    where: str = "ghm_bins",
) -> GHMBins:
    """The GHM-C histogram of gradient norms ``g`` in one pass (§3, β); see :func:`ghm_beta`.

    Cost: one ``bucketize`` (int32 output) and one ``bincount`` over the elements, no host sync;
    the per-bin arithmetic is on ``B + 2`` numbers.
    """
    check_ghm_args(bins, momentum, acc_sum, where=where)
    g = upcast(g.detach())
    mask = _valid_mask(valid, g, where=where)

    # Slot of every element: bucketize(right=True) against e_0..e_B returns b + 1 exactly when
    # e_b <= g < e_{b+1}, so the bins are slots 1..B. Slot 0 (g < 0) and slot B + 1 (g >= the raised
    # last edge, or NaN) lie outside every bin; invalid elements are moved to slot 0.
    edges = ghm_edges(bins, dtype=g.dtype, device=g.device)
    slot = torch.bucketize(g, edges, right=True, out_int32=True)
    if mask is not None:
        slot.masked_fill_(~mask, 0)

    counts = torch.bincount(slot.reshape(-1), minlength=bins + 2)
    table, normaliser = ghm_table(
        counts, valid_count(mask, g), bins=bins, momentum=momentum, acc_sum=acc_sum, sync_counts=sync_counts,
        dtype=g.dtype,
    )  # fmt: skip
    return GHMBins(slot, table, normaliser)


def valid_count(mask: Tensor | None, g: Tensor) -> Tensor:
    """T before clamping: the number of valid elements of ``g`` (a per-prior ``(N, 1)`` mask counts C each)."""
    if mask is None:
        return torch.tensor(g.numel(), dtype=torch.int64, device=g.device)
    return mask.sum() * (g.numel() // max(mask.numel(), 1))


@torch.no_grad()
def ghm_table(
    slot_counts: Tensor,
    valid_total: Tensor,
    *,
    bins: int,
    momentum: float,
    acc_sum: Tensor | None,
    sync_counts: bool,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """β per slot ``(B + 2,)`` and the normaliser T from the slot counts ``(B + 2,)`` (§3, β).

    Updates ``acc_sum`` in place when ``momentum > 0``; under DDP (``sync_counts``) the counts and T
    are summed over processes first.
    """
    # One int64 vector holds the B counts and T, so DDP needs a single all_reduce. int64 keeps counts
    # exact beyond float32's 2^24 (N·C of a batch easily exceeds it).
    stats = torch.cat((slot_counts[1 : bins + 1], valid_total.reshape(1).to(slot_counts.dtype)))
    world = _distributed_world() if sync_counts else None
    if world is not None:
        dist.all_reduce(stats)
    counts = stats[:bins].double()
    total = stats[bins].double().clamp(min=1.0)  # T >= 1, as MMDetection's max(tot, 1)

    nonempty = counts > 0
    if momentum > 0:
        assert acc_sum is not None  # checked by the callers (check_ghm_args)
        updated = momentum * acc_sum.double() + (1.0 - momentum) * counts
        acc_sum.copy_(torch.where(nonempty, updated, acc_sum.double()))
        denom = acc_sum.double()
    else:
        denom = counts
    per_bin = torch.where(nonempty, total / torch.where(nonempty, denom, torch.ones_like(denom)), 0.0)
    per_bin = per_bin / nonempty.sum().clamp(min=1)
    table = torch.cat((per_bin.new_zeros(1), per_bin, per_bin.new_zeros(1))).to(dtype)  # outer slots: β = 0
    normaliser = (total / (world or 1)).to(dtype)
    return table, normaliser


def gather_beta(bins: GHMBins, *, out: Tensor | None = None) -> Tensor:
    """β = ``table[slot]`` with ``slot``'s shape; ``out`` (contiguous, the table's dtype) receives it."""
    flat = bins.slot.reshape(-1)
    if out is None:
        return torch.index_select(bins.table, 0, flat).view(bins.slot.shape)
    return torch.index_select(bins.table, 0, flat, out=out.view(-1)).view(bins.slot.shape)


@torch.no_grad()
def ghm_beta(
    g: Tensor,
    valid: Tensor | None = None,
    *,
    bins: int = 10,
    momentum: float = 0.0,
    acc_sum: Tensor | None = None,
    sync_counts: bool = False,
    where: str = "ghm_beta",
) -> tuple[Tensor, Tensor]:
    """GHM harmonising weights β of gradient norms ``g (N, C)`` in [0, 1] (§3, β).

    Args:
        g: gradient norms ``|p - p*|``, any shape (usually ``(N, C)``); detached here.
        valid: None, ``(N,)`` per-prior or ``g``-shaped mask; invalid elements get β = 0 and are not
            counted in ``T`` or in any bin.
        bins: number of bins B.
        momentum: m of the moving average; 0 uses this call's counts only.
        acc_sum: ``(B,)`` float moving-average state, updated in place (needed iff momentum > 0).
        sync_counts: sum the counts and T over processes when torch.distributed is initialised.

    Returns:
        ``(beta, normaliser)``: β with ``g``'s shape and dtype (float32 at least), and the 0-d loss
        normaliser ``T`` (``T_global / world_size`` when synchronised; module docstring).
    """
    hist = ghm_bins(g, valid, bins=bins, momentum=momentum, acc_sum=acc_sum, sync_counts=sync_counts, where=where)
    return gather_beta(hist), hist.normaliser


def weighted_bce_loss(
    logits: Tensor,
    targets: Tensor,
    weight: Tensor,
    normaliser: Tensor,
    *,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
    where: str = "weighted_bce_loss",
) -> Tensor:
    """``weight · BCE(logits, targets)`` reduced; 'mean' divides the sum by ``avg_factor`` or ``normaliser``.

    The one place where GHM-C and HCRA-C compute their BCE, so that HCRA-C with both modules off is
    GHM-C bit for bit. ``logits`` must already be float32/float64; BCE is the stable log-sum-exp form.
    The weight and the sum go into ``binary_cross_entropy_with_logits`` itself: it scales its own
    buffer in place and its backward applies the weight, so no weighted (N, C) copy is made either way.
    """
    check_reduction(reduction, where=where)
    if reduction == "none":
        return F.binary_cross_entropy_with_logits(logits, targets, weight, reduction="none")
    total = F.binary_cross_entropy_with_logits(logits, targets, weight, reduction="sum")
    if reduction == "sum":
        if avg_factor is not None:
            raise ValueError(f"{where}: avg_factor cannot be used with reduction='sum'")
        return total
    if avg_factor is None:
        avg_factor = normaliser
    if isinstance(avg_factor, Tensor):
        return total / avg_factor.to(total.dtype).clamp(min=AVG_FACTOR_EPS)
    return total / max(float(avg_factor), AVG_FACTOR_EPS)


def ghmc_loss(
    logits: Tensor,
    targets: Tensor,
    valid: Tensor | None = None,
    *,
    bins: int = 10,
    momentum: float = 0.0,
    acc_sum: Tensor | None = None,
    sync_counts: bool = False,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """GHM-C loss (Li et al., AAAI 2019), MMDetection's ``GHMC`` semantics (module docstring).

    Args:
        logits: ``(N, C)`` sigmoid logits (fp16/bf16 are upcast to float32).
        targets: ``(N, C)`` binary targets p* (1 iff prior i is positive with class k).
        valid: ``(N,)`` or ``(N, C)`` mask of non-ignored elements, or None for all.
        bins, momentum: B and m (defaults: MMDetection's ``GHMC``; its GHM config uses 30 and 0.75).
        acc_sum: ``(bins,)`` moving-average state, updated in place; required iff momentum > 0.
        sync_counts: all-reduce the histogram over processes when torch.distributed is initialised.
        reduction: 'mean' (default) is MMDetection's ``Σ β·BCE / T``; 'sum' is ``Σ β·BCE``; 'none' the
            ``(N, C)`` elements ``β·BCE``.
        avg_factor: replaces T in 'mean'.

    Returns:
        A scalar, or ``(N, C)`` for ``reduction='none'``.
    """
    where = "ghmc_loss"
    check_reduction(reduction, where=where)
    check_ndim("logits", logits, 2, where=where, layout="(N, C)")
    check_shape("targets", targets, tuple(logits.shape), where=where)
    x = upcast(logits)
    t = targets.to(x.dtype)
    with torch.no_grad():
        g = torch.sigmoid(x.detach()).sub_(t).abs_()
        hist = ghm_bins(g, valid, bins=bins, momentum=momentum, acc_sum=acc_sum, sync_counts=sync_counts, where=where)
        beta = gather_beta(hist, out=g)  # g is no longer needed: β takes its memory
    return weighted_bce_loss(x, t, beta, hist.normaliser, reduction=reduction, avg_factor=avg_factor, where=where)


class GHMCLoss(nn.Module):
    """Module form of :func:`ghmc_loss` that keeps the momentum state.

    ``acc_sum`` is a registered buffer (saved in checkpoints, moved by ``.to(device)``), registered
    even when ``momentum == 0`` so that checkpoints have the same keys. Like MMDetection's ``GHMC`` it
    is updated on every call with momentum > 0, in training and in eval mode alike: a validation
    pass through the loss advances the moving average (call the loss only in training to avoid it).

    ``sync_counts`` defaults to True (MMDetection's GHMC has no DDP synchronisation) so that GHM-C and
    HCRA-C, which share the histogram, are compared under the same statistics; single-process runs
    are unaffected.
    """

    acc_sum: Tensor

    def __init__(
        self, *, bins: int = 10, momentum: float = 0.0, loss_weight: float = 1.0, sync_counts: bool = True
    ) -> None:
        super().__init__()
        check_ghm_hparams(bins, momentum, where="GHMCLoss")
        self.bins = bins
        self.momentum = momentum
        self.loss_weight = loss_weight
        self.sync_counts = sync_counts
        self.register_buffer("acc_sum", torch.zeros(bins))

    def forward(
        self, logits: Tensor, targets: Tensor, valid: Tensor | None = None, *, avg_factor: float | Tensor | None = None
    ) -> Tensor:
        loss = ghmc_loss(
            logits,
            targets,
            valid,
            bins=self.bins,
            momentum=self.momentum,
            acc_sum=self.acc_sum if self.momentum > 0 else None,
            sync_counts=self.sync_counts,
            avg_factor=avg_factor,
        )
        return self.loss_weight * loss

    def extra_repr(self) -> str:
        return (
            f"bins={self.bins}, momentum={self.momentum}, loss_weight={self.loss_weight}, "
            f"sync_counts={self.sync_counts}"
        )
