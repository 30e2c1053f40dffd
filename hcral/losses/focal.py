"""Focal-type classification losses HCRA-C is compared with: Focal, Quality Focal, Varifocal.

All take sigmoid logits ``(N, C)`` (no background channel) and dense per-class targets ``(N, C)``;
they compute in float32 at least (fp16/bf16 logits are upcast) with the stable
``binary_cross_entropy_with_logits``. Reductions follow :mod:`hcral.losses._reduction` (MMDetection's
``weight_reduce_loss``): ``weight`` is element-wise or ``(N,)`` per prior, ``avg_factor`` divides the
sum for 'mean'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hcral.losses._reduction import check_ndim, check_reduction, check_shape, upcast, weight_reduce_loss


def _check_cls_inputs(logits: Tensor, targets: Tensor, *, where: str, target_name: str = "targets") -> None:
    check_ndim("logits", logits, 2, where=where, layout="(N, C)")
    check_shape(target_name, targets, tuple(logits.shape), where=where)


def sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "mean",
    weight: Tensor | None = None,
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """Focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017).

    ``FL = α_t · (1 - p_t)^γ · BCE(x, p*)`` with ``p = σ(x)``, ``p_t = p·p* + (1 - p)(1 - p*)`` and
    ``α_t = α·p* + (1 - α)(1 - p*)``. ``alpha < 0`` (e.g. -1, as torchvision) disables α-balancing;
    ``alpha=-1, gamma=0`` is plain BCE, gradients included.

    Args:
        logits: ``(N, C)`` logits.
        targets: ``(N, C)`` targets in {0, 1} (dense one-hot; MMDetection also accepts labels ``(N,)``).
        alpha, gamma: the paper's defaults 0.25 and 2.
        reduction: 'none' -> ``(N, C)``; 'mean' / 'sum' -> scalar.
        weight: ``(N, C)`` or ``(N,)`` per prior.
        avg_factor: divides the sum for 'mean' (RetinaNet passes the number of positives).
    """
    where = "sigmoid_focal_loss"
    check_reduction(reduction, where=where)
    _check_cls_inputs(logits, targets, where=where)
    x = upcast(logits)
    t = targets.to(x.dtype)
    p = torch.sigmoid(x)
    loss = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    if gamma != 0:  # (1 - p_t)^0 = 1; skipping it keeps the γ = 0 gradient exactly BCE's
        p_t = p * t + (1 - p) * (1 - t)
        loss = loss * (1 - p_t).pow(gamma)
    if alpha >= 0:
        loss = loss * (alpha * t + (1 - alpha) * (1 - t))
    return weight_reduce_loss(loss, weight, reduction=reduction, avg_factor=avg_factor, where=where)


def quality_focal_loss(
    logits: Tensor,
    targets_score: Tensor,
    *,
    beta: float = 2.0,
    reduction: str = "mean",
    weight: Tensor | None = None,
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """Quality Focal Loss (Li et al., "Generalized Focal Loss", NeurIPS 2020; arXiv:2006.04388).

    ``QFL = |y - σ(x)|^β · BCE(x, y)`` per element, summed over classes, with the soft target ``y``:
    the IoU of the positive's box at its class, 0 everywhere else.

    MMDetection takes ``(labels (N,), scores (N,))`` and writes the positive's term at its label;
    this function takes the equivalent dense ``targets_score (N, C)`` in [0, 1] (``y = 0`` gives the
    negative term ``σ(x)^β · BCE(x, 0)``, identical to MMDetection's). As in MMDetection the loss is
    summed over the C classes first, so the element-wise loss is per prior ``(N,)`` and 'mean'
    without ``avg_factor`` averages over priors (GFL passes the number of positives). ``weight`` is
    ``(N,)`` per prior (MMDetection's) or ``(N, C)`` per element, applied before the class sum.

    Returns:
        A scalar, or ``(N,)`` for ``reduction='none'``.
    """
    where = "quality_focal_loss"
    check_reduction(reduction, where=where)
    _check_cls_inputs(logits, targets_score, where=where, target_name="targets_score")
    x = upcast(logits)
    y = targets_score.to(x.dtype)
    scale = (y - torch.sigmoid(x)).abs().pow(beta)
    loss = F.binary_cross_entropy_with_logits(x, y, reduction="none") * scale  # (N, C)
    if weight is not None and weight.shape == loss.shape:
        # An element weight (e.g. a valid mask expanded over classes) applies before the class sum.
        loss, weight = loss * weight.to(loss.dtype), None
    return weight_reduce_loss(loss.sum(dim=1), weight, reduction=reduction, avg_factor=avg_factor, where=where)


def varifocal_loss(
    logits: Tensor,
    targets_score: Tensor,
    *,
    alpha: float = 0.75,
    gamma: float = 2.0,
    iou_weighted: bool = True,
    reduction: str = "mean",
    weight: Tensor | None = None,
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """Varifocal loss (Zhang et al., "VarifocalNet", CVPR 2021; arXiv:2008.13367).

    ``VFL = q · BCE(x, q)`` for ``q > 0`` (``BCE(x, q)`` when ``iou_weighted=False``) and
    ``α · σ(x)^γ · BCE(x, 0)`` for ``q = 0``, with ``q`` the IoU-aware target ``(N, C)``: the IoU of the
    positive's box at its class, 0 elsewhere. Defaults are the paper's (α = 0.75, γ = 2). As in
    MMDetection, the weight is not detached.

    Returns:
        A scalar, or ``(N, C)`` for ``reduction='none'``.
    """
    where = "varifocal_loss"
    check_reduction(reduction, where=where)
    _check_cls_inputs(logits, targets_score, where=where, target_name="targets_score")
    x = upcast(logits)
    q = targets_score.to(x.dtype)
    positive = q > 0
    negative_weight = alpha * (torch.sigmoid(x) - q).abs().pow(gamma)
    positive_weight = q if iou_weighted else torch.ones_like(q)
    focal_weight = torch.where(positive, positive_weight, negative_weight)
    loss = F.binary_cross_entropy_with_logits(x, q, reduction="none") * focal_weight
    return weight_reduce_loss(loss, weight, reduction=reduction, avg_factor=avg_factor, where=where)


class SigmoidFocalLoss(nn.Module):
    """Module form of :func:`sigmoid_focal_loss`; the result is multiplied by ``loss_weight``."""

    def __init__(
        self, *, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "mean", loss_weight: float = 1.0
    ) -> None:
        super().__init__()
        check_reduction(reduction, where="SigmoidFocalLoss")
        self.alpha, self.gamma, self.reduction, self.loss_weight = alpha, gamma, reduction, loss_weight

    def forward(
        self,
        logits: Tensor,
        targets: Tensor,
        weight: Tensor | None = None,
        *,
        avg_factor: float | Tensor | None = None,
    ) -> Tensor:
        loss = sigmoid_focal_loss(
            logits,
            targets,
            alpha=self.alpha,
            gamma=self.gamma,
            reduction=self.reduction,
            weight=weight,
            avg_factor=avg_factor,
        )
        return self.loss_weight * loss


class QualityFocalLoss(nn.Module):
    """Module form of :func:`quality_focal_loss`; the result is multiplied by ``loss_weight``."""

    def __init__(self, *, beta: float = 2.0, reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__()
        check_reduction(reduction, where="QualityFocalLoss")
        self.beta, self.reduction, self.loss_weight = beta, reduction, loss_weight

    def forward(
        self,
        logits: Tensor,
        targets_score: Tensor,
        weight: Tensor | None = None,
        *,
        avg_factor: float | Tensor | None = None,
    ) -> Tensor:
        loss = quality_focal_loss(
            logits, targets_score, beta=self.beta, reduction=self.reduction, weight=weight, avg_factor=avg_factor
        )
        return self.loss_weight * loss


class VarifocalLoss(nn.Module):
    """Module form of :func:`varifocal_loss`; the result is multiplied by ``loss_weight``."""

    def __init__(
        self,
        *,
        alpha: float = 0.75,
        gamma: float = 2.0,
        iou_weighted: bool = True,
        reduction: str = "mean",
        loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        check_reduction(reduction, where="VarifocalLoss")
        if alpha < 0:
            raise ValueError(f"VarifocalLoss: alpha must be >= 0, got {alpha!r}")
        self.alpha, self.gamma, self.iou_weighted = alpha, gamma, iou_weighted
        self.reduction, self.loss_weight = reduction, loss_weight

    def forward(
        self,
        logits: Tensor,
        targets_score: Tensor,
        weight: Tensor | None = None,
        *,
        avg_factor: float | Tensor | None = None,
    ) -> Tensor:
        loss = varifocal_loss(
            logits,
            targets_score,
            alpha=self.alpha,
            gamma=self.gamma,
            iou_weighted=self.iou_weighted,
            reduction=self.reduction,
            weight=weight,
            avg_factor=avg_factor,
        )
        return self.loss_weight * loss
