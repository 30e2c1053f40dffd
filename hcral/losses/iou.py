"""IoU-family box regression losses HCRA-R is compared with.

Every function takes aligned boxes ``pred (P, 4)`` and ``target (P, 4)`` (xyxy pixels; any leading
shape ``(..., 4)`` works), computes in float32 at least through :mod:`hcral.ops.boxes` (one pass of
:func:`~hcral.ops.boxes.aligned_box_terms`), and reduces like MMDetection: ``weight`` has the loss's
shape ``(P,)``, 'mean' divides the sum by ``avg_factor`` when given, else averages over boxes.

- IoU   (Yu et al., "UnitBox", ACM MM 2016): ``1 - IoU`` ('linear', default), ``1 - IoU²``
  ('square') or ``-ln IoU`` ('log', MMDetection's ``IoULoss`` default);
- GIoU  (Rezatofighi et al., CVPR 2019): ``1 - IoU + (|C| - |A ∪ B|) / |C|``;
- DIoU  (Zheng et al., AAAI 2020): ``1 - IoU + ρ²/c²``;
- CIoU  (Zheng et al., AAAI 2020): ``1 - IoU + ρ²/c² + a·v`` with ``a = v / (1 - IoU + v)`` constant;
- EIoU  (Zhang et al., "Focal and Efficient IOU Loss", Neurocomputing 2022):
  ``1 - IoU + ρ²/c² + (w - w_gt)²/C_w² + (h - h_gt)²/C_h²``;
- Focal-EIoU (same paper): ``IoU^γ · L_EIoU`` with γ = 0.5, the weight ``IoU^γ`` detached.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from hcral.losses._reduction import check_reduction, weight_reduce_loss
from hcral.ops.boxes import (
    EPS,
    aligned_box_terms,
    aligned_ciou,
    diou_penalty_from_terms,
    eiou_penalty_from_terms,
    giou_from_terms,
)

IOU_LOSS_MODES = ("linear", "square", "log")

# MMDetection's IoULoss guards IoU (and the union) with 1e-6; the other IoU losses use 1e-7 (ops.EPS).
IOU_LOSS_EPS = 1e-6


def _check_box_pair(pred: Tensor, target: Tensor, *, where: str) -> None:
    if pred.shape[-1:] != (4,) or pred.shape != target.shape:
        raise ValueError(
            f"{where}: pred and target must be aligned (..., 4) xyxy boxes of one shape, "
            f"got {tuple(pred.shape)} and {tuple(target.shape)}"
        )


def iou_loss(
    pred: Tensor,
    target: Tensor,
    *,
    mode: str = "linear",
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
    eps: float = IOU_LOSS_EPS,
) -> Tensor:
    """IoU loss of aligned boxes: 'linear' ``1 - IoU``, 'square' ``1 - IoU²``, 'log' ``-ln max(IoU, eps)``.

    Returns a scalar, or ``(P,)`` for ``reduction='none'``.
    """
    where = "iou_loss"
    check_reduction(reduction, where=where)
    if mode not in IOU_LOSS_MODES:
        raise ValueError(f"{where}: mode must be one of {IOU_LOSS_MODES}, got {mode!r}")
    _check_box_pair(pred, target, where=where)
    iou = aligned_box_terms(pred, target, eps=eps).iou
    if mode == "linear":
        loss = 1 - iou
    elif mode == "square":
        loss = 1 - iou * iou
    else:
        loss = -iou.clamp(min=eps).log()
    return weight_reduce_loss(loss, weight, reduction=reduction, avg_factor=avg_factor, where=where)


def giou_loss(
    pred: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
    eps: float = EPS,
) -> Tensor:
    """GIoU loss ``1 - GIoU`` in [0, 2] (Rezatofighi et al., CVPR 2019)."""
    where = "giou_loss"
    check_reduction(reduction, where=where)
    _check_box_pair(pred, target, where=where)
    loss = 1 - giou_from_terms(aligned_box_terms(pred, target, eps=eps))
    return weight_reduce_loss(loss, weight, reduction=reduction, avg_factor=avg_factor, where=where)


def diou_loss(
    pred: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
    eps: float = EPS,
) -> Tensor:
    """DIoU loss ``1 - IoU + ρ²/c²`` (Zheng et al., AAAI 2020)."""
    where = "diou_loss"
    check_reduction(reduction, where=where)
    _check_box_pair(pred, target, where=where)
    terms = aligned_box_terms(pred, target, eps=eps)
    loss = 1 - terms.iou + diou_penalty_from_terms(terms)
    return weight_reduce_loss(loss, weight, reduction=reduction, avg_factor=avg_factor, where=where)


def ciou_loss(
    pred: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
    eps: float = EPS,
) -> Tensor:
    """CIoU loss ``1 - IoU + ρ²/c² + a·v`` (Zheng et al., AAAI 2020).

    ``v = (4/π²)(atan(w_gt/h_gt) - atan(w/h))²`` and its trade-off ``a = v / (1 - IoU + v)`` is held
    constant in the gradient, as the paper prescribes (and MMDetection does).
    """
    where = "ciou_loss"
    check_reduction(reduction, where=where)
    _check_box_pair(pred, target, where=where)
    loss = 1 - aligned_ciou(pred, target, eps=eps)
    return weight_reduce_loss(loss, weight, reduction=reduction, avg_factor=avg_factor, where=where)


def eiou_loss(
    pred: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
    eps: float = EPS,
) -> Tensor:
    """EIoU loss ``1 - IoU + ρ²/c² + (w - w_gt)²/C_w² + (h - h_gt)²/C_h²`` (Zhang et al., 2022).

    ``C_w, C_h``: width and height of the smallest enclosing box. (This is Zhang et al.'s EIoU, not
    the smooth "Extended-IoU" of MMDetection 3's ``EIoULoss``.)
    """
    where = "eiou_loss"
    check_reduction(reduction, where=where)
    _check_box_pair(pred, target, where=where)
    terms = aligned_box_terms(pred, target, eps=eps)
    loss = 1 - terms.iou + eiou_penalty_from_terms(terms, eps=eps)
    return weight_reduce_loss(loss, weight, reduction=reduction, avg_factor=avg_factor, where=where)


def focal_eiou_loss(
    pred: Tensor,
    target: Tensor,
    *,
    gamma: float = 0.5,
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
    eps: float = EPS,
) -> Tensor:
    """Focal-EIoU loss ``IoU^γ · L_EIoU`` (Zhang et al., Neurocomputing 2022; γ = 0.5 as in the paper).

    ``IoU^γ`` re-weights boxes toward high-IoU (high-quality) ones and is detached, as in the public
    implementations: its own gradient would push IoU down (larger IoU, larger weight), and at IoU = 0
    with γ < 1 it is infinite. ``gamma = 0`` gives :func:`eiou_loss`.
    """
    where = "focal_eiou_loss"
    check_reduction(reduction, where=where)
    if gamma < 0:
        raise ValueError(f"{where}: gamma must be >= 0, got {gamma!r}")
    _check_box_pair(pred, target, where=where)
    terms = aligned_box_terms(pred, target, eps=eps)
    loss = (1 - terms.iou + eiou_penalty_from_terms(terms, eps=eps)) * terms.iou.detach().pow(gamma)
    return weight_reduce_loss(loss, weight, reduction=reduction, avg_factor=avg_factor, where=where)


class _BoxLoss(nn.Module):
    """Shared module wrapper: keeps reduction, eps and loss_weight, forwards to a box loss."""

    def __init__(self, *, reduction: str = "mean", eps: float = EPS, loss_weight: float = 1.0) -> None:
        super().__init__()
        check_reduction(reduction, where=type(self).__name__)
        self.reduction, self.eps, self.loss_weight = reduction, eps, loss_weight

    # The functional loss the module wraps (a staticmethod in each subclass).
    loss_fn: Callable[..., Tensor]

    def _loss(self, pred: Tensor, target: Tensor, **kwargs) -> Tensor:
        return self.loss_fn(pred, target, **kwargs)

    def forward(
        self, pred: Tensor, target: Tensor, weight: Tensor | None = None, *, avg_factor: float | Tensor | None = None
    ) -> Tensor:
        loss = self._loss(pred, target, weight=weight, reduction=self.reduction, avg_factor=avg_factor, eps=self.eps)
        return self.loss_weight * loss


class IoULoss(_BoxLoss):
    """Module form of :func:`iou_loss`."""

    def __init__(
        self, *, mode: str = "linear", reduction: str = "mean", eps: float = IOU_LOSS_EPS, loss_weight: float = 1.0
    ) -> None:
        super().__init__(reduction=reduction, eps=eps, loss_weight=loss_weight)
        if mode not in IOU_LOSS_MODES:
            raise ValueError(f"IoULoss: mode must be one of {IOU_LOSS_MODES}, got {mode!r}")
        self.mode = mode

    def _loss(self, pred: Tensor, target: Tensor, **kwargs) -> Tensor:
        return iou_loss(pred, target, mode=self.mode, **kwargs)


class GIoULoss(_BoxLoss):
    """Module form of :func:`giou_loss`."""

    loss_fn = staticmethod(giou_loss)


class DIoULoss(_BoxLoss):
    """Module form of :func:`diou_loss`."""

    loss_fn = staticmethod(diou_loss)


class CIoULoss(_BoxLoss):
    """Module form of :func:`ciou_loss`."""

    loss_fn = staticmethod(ciou_loss)


class EIoULoss(_BoxLoss):
    """Module form of :func:`eiou_loss`."""

    loss_fn = staticmethod(eiou_loss)


class FocalEIoULoss(_BoxLoss):
    """Module form of :func:`focal_eiou_loss`."""

    def __init__(
        self, *, gamma: float = 0.5, reduction: str = "mean", eps: float = EPS, loss_weight: float = 1.0
    ) -> None:
        super().__init__(reduction=reduction, eps=eps, loss_weight=loss_weight)
        if gamma < 0:
            raise ValueError(f"FocalEIoULoss: gamma must be >= 0, got {gamma!r}")
        self.gamma = gamma

    def _loss(self, pred: Tensor, target: Tensor, **kwargs) -> Tensor:
        return focal_eiou_loss(pred, target, gamma=self.gamma, **kwargs)
