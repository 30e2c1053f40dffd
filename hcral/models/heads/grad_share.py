"""Gradient share: how the classification gradient splits over sample groups (a training diagnostic).

With ``train.log_grad_share=true`` the head registers a tensor hook on its classification logits
x (B, N, C) (``DenseHead.loss``). The hook receives ``G = ∂L/∂x`` for the total loss L. Only the
weighted classification term depends on x: the assigner, u, every loss weight and HCRA-R's score
use detached scores. So G is the gradient of ``loss.cls_weight · L_cls``, whatever the loss
(focal, QFL, VFL, GHM-C, HCRA-C and its focal base, scale-preserving or not).

Every valid element (i, k) (prior not ignored) falls into one of four groups:

- positive (p* = 1) or negative (p* = 0);
- region 1 (r > 0) or region 2 (r <= 0), with ``r = p - u - α`` (formulation §2), ``p = σ(x)``,
  u of §1 (for a positive at its class, the IoU with its own GT) and α = ``loss.hcra_alpha``.

The **mass** of a group is ``Σ |G|`` over its elements. The meter sums the masses and the element
counts on the device over the iterations since the last read, so a training step makes no host
synchronisation. :meth:`GradShareMeter.pop` reads them once per logged record (``train.log_interval``),
sums them over processes under DDP, and returns the record's keys:

- ``grad_pos``, ``grad_neg``, ``grad_pos_r1``, ``grad_pos_r2``, ``grad_neg_r1``, ``grad_neg_r2``:
  masses, summed over the iterations since the previous record;
- ``grad_n_pos``, ... ``grad_n_neg_r2``: the element counts of the same groups over the same
  iterations (``grad_pos / grad_n_pos`` is the mean |G| of a positive element);
- ``grad_iters``: the number of iterations summed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hcral.distributed import reduce_sum
from hcral.losses import rci

__all__ = ["GROUPS", "GradShareMeter", "grad_share_groups", "grad_share_sums"]

# The four disjoint groups of valid elements, in the order of the group codes 0..3.
GROUPS = ("pos_r1", "pos_r2", "neg_r1", "neg_r2")
# The code of an element of an ignored prior: in no group.
IGNORED = len(GROUPS)


@torch.no_grad()
def grad_share_groups(targets: Tensor, valid: Tensor, scores: Tensor, ious: Tensor, *, alpha: float) -> Tensor:
    """The group code of every element: ``2·[p* = 0] + [r <= 0]`` (see :data:`GROUPS`), 4 if ignored.

    Args:
        targets: ``(..., C)`` p* in {0, 1}.
        valid: ``(...)`` per prior, False for an ignored prior.
        scores: ``(..., C)`` p = σ(x).
        ious: ``(..., C)`` u of formulation §1.
        alpha: α of §2.

    Returns:
        ``(..., C)`` uint8.
    """
    region2 = rci(scores, ious, alpha=alpha) <= 0
    code = (targets == 0).to(torch.uint8).mul_(2).add_(region2.to(torch.uint8))
    return code.masked_fill_(~valid[..., None], IGNORED)


@torch.no_grad()
def grad_share_sums(grad: Tensor, groups: Tensor) -> Tensor:
    """``(2, 4)`` float64: row 0 the mass ``Σ |grad|`` and row 1 the element count of each group.

    ``grad`` and ``groups`` have the same shape; columns in :data:`GROUPS` order.
    """
    magnitude = grad.abs()
    rows = []
    for code in range(len(GROUPS)):  # a masked sum per group: deterministic, no scatter
        member = groups == code
        rows.append(torch.stack((torch.where(member, magnitude, 0).sum().double(), member.sum().double())))
    return torch.stack(rows, dim=1)


class GradShareMeter:
    """Sums the classification gradient's masses per group over iterations (module docstring)."""

    def __init__(self, *, alpha: float) -> None:
        self.alpha = alpha
        self.stats: Tensor | None = None  # (2, 4) float64 on the logits' device, None before any step
        self.iters = 0

    def watch(self, logits: Tensor, targets: Tensor, valid: Tensor, scores: Tensor, ious: Tensor) -> None:
        """Register the hook on ``logits`` (B, N, C); the other arguments as :func:`grad_share_groups`."""
        groups = grad_share_groups(targets, valid, scores, ious, alpha=self.alpha)

        def hook(grad: Tensor) -> None:
            sums = grad_share_sums(grad, groups)
            self.stats = sums if self.stats is None else self.stats.add_(sums)
            self.iters += 1

        logits.register_hook(hook)

    def pop(self) -> dict[str, float | int]:
        """The record's keys (module docstring) for the iterations since the last call, then reset.

        Every process must call it at the same iterations (it all-reduces under DDP); ``{}`` before
        any backward pass.
        """
        if self.stats is None:
            return {}
        masses, counts = reduce_sum(self.stats).tolist()
        pos_r1, pos_r2, neg_r1, neg_r2 = masses
        n_pos_r1, n_pos_r2, n_neg_r1, n_neg_r2 = (round(n) for n in counts)  # exact: float64 holds them
        record: dict[str, float | int] = {
            "grad_pos": pos_r1 + pos_r2, "grad_neg": neg_r1 + neg_r2,
            "grad_pos_r1": pos_r1, "grad_pos_r2": pos_r2, "grad_neg_r1": neg_r1, "grad_neg_r2": neg_r2,
            "grad_n_pos": n_pos_r1 + n_pos_r2, "grad_n_neg": n_neg_r1 + n_neg_r2,
            "grad_n_pos_r1": n_pos_r1, "grad_n_pos_r2": n_pos_r2, "grad_n_neg_r1": n_neg_r1, "grad_n_neg_r2": n_neg_r2,
            "grad_iters": self.iters,
        }  # fmt: skip
        self.stats, self.iters = None, 0
        return record
