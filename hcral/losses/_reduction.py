"""Shared conventions of every loss in :mod:`hcral.losses`: reduction, ``avg_factor``, validation.

The conventions follow MMDetection's ``weight_reduce_loss`` so that numbers are comparable:

- ``reduction='none'`` returns the element-wise loss (``avg_factor`` is ignored, as in MMDetection);
- ``reduction='sum'`` returns its sum (``avg_factor`` is an error: a sum has nothing to average);
- ``reduction='mean'`` returns ``sum / avg_factor`` when ``avg_factor`` is given (the detector passes
  e.g. the number of positives), else the plain mean over elements.

Empty input gives ``loss.sum() * 0`` -- a zero that is still connected to the autograd graph, so a
batch without positives can call ``backward()`` like any other.
"""

from __future__ import annotations

import torch
from torch import Tensor

REDUCTIONS = ("none", "mean", "sum")

# ``avg_factor`` is clamped at float32's machine epsilon: MMDetection adds the same constant to avoid
# 0/0; clamping instead of adding keeps ``sum / avg_factor`` exact for every ordinary avg_factor (>= 1).
AVG_FACTOR_EPS = torch.finfo(torch.float32).eps


def upcast(t: Tensor) -> Tensor:
    """fp16/bf16 (and integer) tensors go to float32; float32/float64 are kept.

    Losses compute in float32 at least: BCE of large logits and the powers of small probabilities
    underflow in half precision, and bf16 keeps only 8 bits of mantissa.
    """
    if t.dtype in (torch.float32, torch.float64):
        return t
    return t.float()


def check_reduction(reduction: str, *, where: str) -> None:
    """Raise a ``ValueError`` naming ``where`` unless ``reduction`` is one of 'none', 'mean', 'sum'."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"{where}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_shape(name: str, t: Tensor, shape: tuple[int, ...], *, where: str) -> None:
    """Raise a ``ValueError`` unless ``t.shape == shape`` (shape given as a tuple of ints)."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{where}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_ndim(name: str, t: Tensor, ndim: int, *, where: str, layout: str) -> None:
    """Raise a ``ValueError`` unless ``t`` has ``ndim`` dimensions; ``layout`` names them, e.g. "(N, C)"."""
    if t.dim() != ndim:
        raise ValueError(f"{where}: {name} must be {layout}, got shape {tuple(t.shape)}")


def check_boxes(name: str, t: Tensor, *, where: str) -> None:
    """Raise a ``ValueError`` unless ``t`` is ``(P, 4)`` boxes."""
    if t.dim() != 2 or t.shape[-1] != 4:
        raise ValueError(f"{where}: {name} must be (P, 4) xyxy boxes, got shape {tuple(t.shape)}")


def broadcast_weight(weight: Tensor | None, loss: Tensor, *, where: str) -> Tensor | None:
    """Bring an element weight to the loss's shape.

    ``weight`` has the loss's shape, or, for an ``(N, C)`` loss, ``(N,)`` (one weight per prior,
    repeated over classes, as MMDetection's focal loss does). Anything else is an error.
    """
    if weight is None:
        return None
    if weight.shape == loss.shape:
        return weight
    if loss.dim() == 2 and weight.dim() == 1 and weight.shape[0] == loss.shape[0]:
        return weight[:, None]
    raise ValueError(
        f"{where}: weight must have shape {tuple(loss.shape)}"
        + (f" or ({loss.shape[0]},)" if loss.dim() == 2 else "")
        + f", got {tuple(weight.shape)}"
    )


def weight_reduce_loss(
    loss: Tensor,
    weight: Tensor | None = None,
    *,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
    where: str = "loss",
) -> Tensor:
    """Multiply the element-wise ``loss`` by ``weight`` and reduce it (module docstring).

    ``avg_factor`` may be a Python number or a 0-d tensor (e.g. a DDP-averaged count); it only
    applies to ``reduction='mean'``.
    """
    check_reduction(reduction, where=where)
    weight = broadcast_weight(weight, loss, where=where)
    if weight is not None:
        loss = loss * weight.to(loss.dtype)
    if reduction == "none":
        return loss
    if reduction == "sum":
        if avg_factor is not None:
            raise ValueError(f"{where}: avg_factor cannot be used with reduction='sum'")
        return loss.sum()
    # reduction == "mean"
    if avg_factor is None:
        # mean() of an empty tensor is nan; sum() * 0 is a zero that keeps the graph.
        return loss.sum() * 0 if loss.numel() == 0 else loss.mean()
    if isinstance(avg_factor, Tensor):
        return loss.sum() / avg_factor.to(loss.dtype).clamp(min=AVG_FACTOR_EPS)
    return loss.sum() / max(float(avg_factor), AVG_FACTOR_EPS)
