"""An optional fused path for HCRA-C (§3) through ``torch.compile``: the same loss, fewer memory passes.

The eager :func:`~hcral.losses.hcra.hcra_cls_loss` makes about twenty passes over ``(N, C)`` tensors
(each a separate kernel). Here the element-wise work is two compiled kernels:

1. ``slots``: ``g = |σ(x) - p*|`` and its GHM slot (``bucketize`` against the bin edges), one pass
   over ``x`` and ``p*`` writing one byte per element; then ``bincount`` and the per-bin β table of
   :func:`~hcral.losses.ghm.ghm_table` (shared with the eager path, momentum and DDP included);
2. ``sum_and_grad``: ``Σ β·ω·w·BCE(x, p*)`` with β looked up in the table, ω and w computed in
   registers, and in the same pass the gradient ``β·ω·w·(σ(x) - p*)`` (the weights are constants),
   which the backward pass only scales.

Results equal the eager loss up to float rounding (the compiled kernels may reorder the sum and
contract multiply-adds). The path is opt-in: the first call compiles (tens of seconds on a CPU, once
per process and set of hyperparameters; shapes are dynamic), it needs a working C++ compiler on CPU
(Triton on GPU), and when compilation fails it warns once and falls back to the eager loss.

    loss = hcra_cls_loss_fused(logits, targets, ious, valid)
"""

from __future__ import annotations

import functools
import shutil
import sys
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from hcral.defaults import HCRA_ALPHA, HCRA_MU, HCRA_THETA
from hcral.losses._reduction import AVG_FACTOR_EPS, upcast
from hcral.losses.ghm import _valid_mask, check_ghm_args, ghm_edges, ghm_table, valid_count
from hcral.losses.hcra import HCRAClassificationLoss, _check_cls_hparams, _check_cls_inputs, _hcra_cls_loss

__all__ = ["FusedHCRAClassificationLoss", "compile_unavailable_reason", "hcra_cls_loss_fused"]

# Slots are stored as one byte when they fit (bins + 2 <= 256): a quarter of the int32 traffic.
_MAX_BYTE_SLOTS = 256

_fallback_warned = False


def compile_unavailable_reason(device: torch.device | str = "cpu") -> str | None:
    """None when ``torch.compile`` can be expected to work for ``device``, else the reason it cannot.

    Checks only what is cheap to check (a compile takes tens of seconds): that torch has
    ``torch.compile`` and dynamo supports this Python, and that a C++ compiler exists for CPU
    (Triton for CUDA).
    """
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        import torch._dynamo as dynamo
    except ImportError as err:  # pragma: no cover - torch builds without dynamo
        return f"torch._dynamo cannot be imported: {err}"
    if not dynamo.is_dynamo_supported():
        return f"torch.compile does not support Python {sys.version.split()[0]} on this build"
    device = torch.device(device)
    if device.type == "cpu":
        if not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
            return "no C++ compiler (g++, c++ or clang++) on PATH for inductor's CPU kernels"
    elif device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton is not installed (inductor's CUDA kernels need it)"
    return None


# ---------------------------------------------------------------------------------------------
# the two element-wise stages, written as plain tensor functions (compiled below)
# ---------------------------------------------------------------------------------------------


def _slots(logits: Tensor, targets: Tensor, valid: Tensor | None, edges: Tensor, slot_dtype: torch.dtype) -> Tensor:
    """§3, β: the GHM slot of every element (``ghm_bins``' convention: bins are 1..B, 0 = invalid)."""
    g = (torch.sigmoid(logits) - targets).abs()
    # bucketize(right=True) counts the edges <= g; counting them one edge at a time (the loop is
    # unrolled when compiled) fuses into this kernel. NaN gets slot 0 instead of B + 1: outside every
    # bin either way.
    slot = torch.zeros_like(g, dtype=torch.int32)
    for b in range(len(edges)):
        slot = slot + (g >= edges[b]).to(torch.int32)
    if valid is not None:
        slot = torch.where(valid, slot, 0)
    return slot.to(slot_dtype)


def _sum_and_grad(
    logits: Tensor,
    targets: Tensor,
    ious: Tensor,
    slot: Tensor,
    table: Tensor,
    alpha: float,
    theta: float,
    mu: float,
    use_rci: bool,
    use_cf: bool,
) -> tuple[Tensor, Tensor]:
    """§3: ``Σ β·ω·w·BCE(x, p*)`` and its gradient ``β·ω·w·(σ(x) - p*)`` (weights held constant), in
    one pass. Same formulas as ``hcra._cls_weights``."""
    p = torch.sigmoid(logits)
    # β = table[slot], as a chain of selects: vectorises, where a gather would not (CPU codegen).
    slot = slot.to(torch.int32)
    weight = torch.zeros_like(logits)
    for b in range(1, len(table) - 1):  # the outer slots 0 and B + 1 keep β = 0
        weight = torch.where(slot == b, table[b], weight)
    if use_cf:
        weight = weight * (1 + (2 * targets - 1) * ious * (ious - mu) ** 2)  # ω
    if use_rci:
        weight = weight * (2 * torch.sigmoid(theta * (1 - 2 * targets) * (p - ious - alpha)))  # w, r of §2
    elementwise = F.binary_cross_entropy_with_logits(logits, targets, weight, reduction="none")
    # The sum accumulates in float64: one fused reduction over N·C elements, whose float32 lanes would
    # otherwise each add millions of terms (1e-5 relative error at COCO shape instead of 1e-7).
    total = elementwise.sum(dtype=torch.float64).to(logits.dtype)
    return total, weight * (p - targets)


class _PrecomputedGradLoss(torch.autograd.Function):
    """``total / T`` whose gradient with respect to the logits was formed in the forward pass.

    The weights of §3 are constants, so ∂L/∂x = β·ω·w·(σ(x) - p*) / T needs nothing but that one
    tensor: the backward is a single scaling, and no weight or probability tensor is kept.
    Only first derivatives are available.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, total: Tensor, grad: Tensor, normaliser: Tensor) -> Tensor:  # noqa: ARG004
        ctx.save_for_backward(grad, normaliser)
        return total / normaliser

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None, None]:
        grad, normaliser = ctx.saved_tensors
        return grad * (grad_output / normaliser), None, None, None


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=True)


def _fused_loss(
    logits: Tensor,
    targets: Tensor,
    ious: Tensor,
    valid: Tensor | None,
    *,
    alpha: float,
    theta: float,
    mu: float,
    bins: int,
    use_rci: bool,
    use_cf: bool,
    momentum: float,
    acc_sum: Tensor | None,
    sync_counts: bool,
    compiled: bool,
    where: str,
) -> Tensor:
    x = upcast(logits)
    t = targets.to(x.dtype)
    u = ious.detach().to(x.dtype)
    mask = _valid_mask(valid, x, where=where)
    slots_fn = _compiled(_slots) if compiled else _slots
    loss_fn = _compiled(_sum_and_grad) if compiled else _sum_and_grad
    slot_dtype = torch.uint8 if bins + 2 <= _MAX_BYTE_SLOTS else torch.int32
    with torch.no_grad():
        edges = ghm_edges(bins, dtype=x.dtype, device=x.device)
        slot = slots_fn(x.detach(), t, mask, edges, slot_dtype)
        counts = torch.bincount(slot.reshape(-1), minlength=bins + 2)  # one pass over bytes
        table, normaliser = ghm_table(
            counts, valid_count(mask, x), bins=bins, momentum=momentum, acc_sum=acc_sum, sync_counts=sync_counts,
            dtype=x.dtype,
        )  # fmt: skip
        total, grad = loss_fn(x.detach(), t, u, slot, table, alpha, theta, mu, use_rci, use_cf)
    return _PrecomputedGradLoss.apply(x, total, grad, normaliser.clamp(min=AVG_FACTOR_EPS))


def hcra_cls_loss_fused(
    logits: Tensor,
    targets: Tensor,
    ious: Tensor,
    valid: Tensor | None = None,
    *,
    alpha: float = HCRA_ALPHA,
    theta: float = HCRA_THETA,
    mu: float = HCRA_MU,
    bins: int = 10,
    use_rci: bool = True,
    use_cf: bool = True,
    momentum: float = 0.0,
    acc_sum: Tensor | None = None,
    sync_counts: bool = False,
    compiled: bool = True,
) -> Tensor:
    """HCRA-C (§3) through ``torch.compile``; arguments and result as :func:`~hcral.losses.hcra_cls_loss`.

    Args:
        momentum, acc_sum, sync_counts: the GHM moving average and DDP synchronisation of
            :class:`~hcral.losses.HCRAClassificationLoss` (``acc_sum (bins,)`` updated in place).
        compiled: False runs the same two stage functions eagerly (for tests and debugging).

    The first call compiles (module docstring). If compilation is unavailable or fails, a warning
    is issued once and the eager :func:`~hcral.losses.hcra_cls_loss` computes the loss instead.
    """
    global _fallback_warned
    where = "hcra_cls_loss_fused"
    _check_cls_inputs(logits, targets, ious, valid, where=where)
    _check_cls_hparams(mu, where=where)
    check_ghm_args(bins, momentum, acc_sum, where=where)
    kwargs = dict(alpha=alpha, theta=theta, mu=mu, bins=bins, use_rci=use_rci, use_cf=use_cf)
    state = dict(momentum=momentum, acc_sum=acc_sum, sync_counts=sync_counts)
    if logits.numel() == 0:  # nothing to fuse; the eager loss returns the graph-connected zero
        return _hcra_cls_loss(logits, targets, ious, valid, **kwargs, **state, where=where)
    reason = compile_unavailable_reason(logits.device) if compiled else None
    if reason is None:
        saved_state = None if acc_sum is None else acc_sum.clone()
        try:
            return _fused_loss(logits, targets, ious, valid, **kwargs, **state, compiled=compiled, where=where)
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back to the eager loss
            if not compiled:
                raise
            if saved_state is not None:  # the failed attempt may have advanced the moving average
                acc_sum.copy_(saved_state)
            first_line = str(err).splitlines()[0] if str(err) else ""
            reason = f"torch.compile failed: {type(err).__name__}: {first_line}"
    if not _fallback_warned:
        warnings.warn(f"{where}: using the eager HCRA-C ({reason})", RuntimeWarning, stacklevel=2)
        _fallback_warned = True
    return _hcra_cls_loss(logits, targets, ious, valid, **kwargs, **state, where=where)


class FusedHCRAClassificationLoss(HCRAClassificationLoss):
    """:class:`~hcral.losses.HCRAClassificationLoss` computed by :func:`hcra_cls_loss_fused`.

    Same hyperparameters, the same ``acc_sum`` state (checkpoints are interchangeable) and the same
    values up to float rounding; ``compiled=False`` runs the fused stages eagerly.
    """

    def __init__(self, *, compiled: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        if self.base != "ghm" or self.normalize:
            raise ValueError(
                f"FusedHCRAClassificationLoss: fuses only HCRA-C on its GHM-C base without §3c, got "
                f"base={self.base!r}, normalize={self.normalize}"
            )
        self.compiled = compiled

    def forward(
        self, logits: Tensor, targets: Tensor, ious: Tensor, valid: Tensor | None = None, *, avg_factor: None = None
    ) -> Tensor:
        """``avg_factor`` is the focal base's (§3b), which the fused path does not compute: None only."""
        if avg_factor is not None:
            raise ValueError("FusedHCRAClassificationLoss: avg_factor belongs to the focal base (§3b)")
        loss = hcra_cls_loss_fused(
            logits, targets, ious, valid, alpha=self.alpha, theta=self.theta, mu=self.mu, bins=self.bins,
            use_rci=self.use_rci, use_cf=self.use_cf, momentum=self.momentum,
            acc_sum=self.acc_sum if self.momentum > 0 else None, sync_counts=self.sync_counts, compiled=self.compiled,
        )  # fmt: skip
        return self.loss_weight * loss

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, compiled={self.compiled}"
