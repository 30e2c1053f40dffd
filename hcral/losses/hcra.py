"""HCRA-C and HCRA-R: the two halves of HCRAL (Huang et al., arXiv:2408.17182).

Implements ``docs/method.md`` §2-§4 (the shared formulation page). Notation (§1):

- ``p = σ(x)`` the score, ``p*`` the binary target, ``u`` the IoU each (prior, class) is held to
  (computed from detached boxes, e.g. by :func:`hcra_ious`), all ``(N, C)`` for HCRA-C;
- for HCRA-R: aligned predicted / target boxes ``(P, 4)``, ``s`` the score of each positive at its
  class ``(P,)``, ``q = IoU(b, g)`` and ``h`` the head's own regression weight ``(P,)``.

Every weight (β, ω, w, ρ, t, and h) is detached: gradients flow only through ``BCE`` and ``L_GIoU``.
Weights are computed in float32 at least.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from hcral.defaults import HCRA_ALPHA, HCRA_EP, HCRA_MU, HCRA_THETA
from hcral.distributed import reduce_mean
from hcral.losses._reduction import check_boxes, check_ndim, check_shape, upcast
from hcral.losses.focal import sigmoid_focal_loss
from hcral.losses.ghm import check_ghm_hparams, gather_beta, ghm_bins, weighted_bce_loss
from hcral.ops.boxes import (
    EPS,
    AlignedBoxTerms,
    aligned_box_terms,
    aligned_iou,
    box_iou,
    diou_penalty_from_terms,
    giou_from_terms,
)

# §4: guards the denominator max(Σ ρ·t·h, ε) against 0/0 only (no positives, or all h = 0). Any
# positive sum above it is used as is, so the weights keep their role of redistributing emphasis
# among positives; the same guard as MMDetection's FCOS centerness denominator.
HCRA_REG_EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# §1, u: the IoU each (prior, class) is held to
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def hcra_ious(
    pred_boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor, matched_gt: Tensor, num_classes: int
) -> Tensor:
    """u of formulation §1 for one image: the IoU each (prior, class) is held to by HCRA-C and HCRA-R.

    For a positive prior at its class, ``IoU(b_i, g_a(i))`` with its assigned ground truth; for
    every other (i, k), ``max_{j: c_j = k} IoU(b_i, g_j)``, or 0 when the image has no ground truth
    of class k. Ignored and background priors get the class-wise maximum; the loss masks ignored
    ones through ``valid``.

    Args:
        pred_boxes: ``(N, 4)`` predicted boxes b (decoded, xyxy, pixels); detached here.
        gt_boxes: ``(M, 4)`` ground-truth boxes g (xyxy, pixels); M may be 0.
        gt_labels: ``(M,)`` int64 classes in ``0..num_classes-1``.
        matched_gt: ``(N,)`` int64 assignment: the ground-truth index of a positive prior, a
            negative value otherwise (torchvision's ``Matcher``: -1 background, -2 ignored).
        num_classes: C.

    Returns:
        ``(N, C)`` float32 in [0, 1], without gradient.
    """
    where = "hcra_ious"
    check_boxes("pred_boxes", pred_boxes, where=where)
    check_boxes("gt_boxes", gt_boxes, where=where)
    check_shape("gt_labels", gt_labels, (gt_boxes.shape[0],), where=where)
    check_shape("matched_gt", matched_gt, (pred_boxes.shape[0],), where=where)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{where}: num_classes must be a positive int, got {num_classes!r}")
    pred = pred_boxes.detach().float()
    u = pred.new_zeros(pred.shape[0], num_classes)
    if gt_boxes.numel() == 0 or pred.numel() == 0:
        return u
    gt = gt_boxes.detach().to(pred)
    iou = box_iou(pred, gt)  # (N, M)
    u.scatter_reduce_(1, gt_labels.view(1, -1).expand_as(iou), iou, reduce="amax", include_self=True)
    # The positive's own IoU, as an aligned pair (what HCRA-R's q is), not its class-wise maximum.
    # Computed for every prior against its (clamped) GT and kept only at positives: no nonzero(),
    # so no host synchronisation in the training step.
    assigned = matched_gt.clamp(min=0)
    own = aligned_iou(pred, gt[assigned]).clamp(min=0)  # (N,)
    cols = gt_labels[assigned].view(-1, 1)  # (N, 1): each prior's assigned class
    kept = torch.where(matched_gt >= 0, own, u.gather(1, cols).squeeze(1))
    return u.scatter_(1, cols, kept.view(-1, 1))


# ---------------------------------------------------------------------------------------------
# §2, RCI
# ---------------------------------------------------------------------------------------------


def rci(scores: Tensor, ious: Tensor, *, alpha: float = HCRA_ALPHA) -> Tensor:
    """§2, residual of classification and IoU: ``r = p - u - α`` (detached, float32 at least).

    Region 1 is ``r > 0`` (score ahead of localisation), region 2 is ``r <= 0``; the boundary is the
    line ``score = IoU + α``.
    """
    return upcast(scores.detach()) - upcast(ious.detach()) - alpha


# ---------------------------------------------------------------------------------------------
# §3, HCRA-C
# ---------------------------------------------------------------------------------------------


HCRA_BASES = ("ghm", "focal")


def _check_cls_hparams(mu: float, *, where: str, base: str = "ghm") -> None:
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"{where}: mu must be in [0, 1] (keeps ω in [0, 2]), got {mu!r}")
    if base not in HCRA_BASES:
        raise ValueError(f"{where}: base must be one of {HCRA_BASES} (§3, §3b), got {base!r}")


def _check_cls_inputs(logits: Tensor, targets: Tensor, ious: Tensor, valid: Tensor | None, *, where: str) -> None:
    check_ndim("logits", logits, 2, where=where, layout="(N, C)")
    check_shape("targets", targets, tuple(logits.shape), where=where)
    check_shape("ious", ious, tuple(logits.shape), where=where)
    if valid is not None:
        check_shape("valid", valid, (logits.shape[0],), where=where)


@torch.no_grad()
def _check_cls_values(logits: Tensor, ious: Tensor, *, where: str) -> None:
    """Finite logits and u in [0, 1] (§1): outside it ω and the loss can turn negative, and an inf
    logit makes the BCE NaN. Two reductions and one host sync, so only the functions check values;
    the modules, fed by the detector's own IoUs in training, leave the sync out of the hot path
    (the training loop checks that the loss is finite)."""
    if logits.numel() == 0:
        return
    # min and max propagate NaN, so both are finite exactly when every element is; aminmax reads
    # each input once without allocating (measured: ~1% of the loss's forward + backward).
    x_min, x_max = torch.aminmax(logits.detach())
    u_min, u_max = torch.aminmax(ious.detach())
    x_low, x_high, u_low, u_high = torch.stack([x_min.double(), x_max.double(), u_min.double(), u_max.double()]).tolist()
    if not (math.isfinite(x_low) and math.isfinite(x_high)):
        raise ValueError(f"{where}: logits must be finite, got values in [{x_low:g}, {x_high:g}]")
    if not (u_low >= 0 and u_high <= 1):  # also catches NaN
        raise ValueError(f"{where}: ious must be in [0, 1] (§1), got values in [{u_low:g}, {u_high:g}]")


@torch.no_grad()
def _cf_cls_weight(targets: Tensor, ious: Tensor, *, mu: float) -> Tensor:
    """§3, ω (CF_cls) = 1 + (2p* - 1)·u·(u - μ)², as a new ``(N, C)`` tensor built in place."""
    omega = (ious - mu).square_().mul_(ious)  # u·(u - μ)²
    # c + (-2)·c·p* is (1 - 2p*)·c, exactly for p* in {0, 1}; negated, the (2p* - 1)·c of §3.
    omega.addcmul_(omega, targets, value=-2).neg_()
    return omega.add_(1)


@torch.no_grad()
def _rci_cls_weight_(scores: Tensor, targets: Tensor, ious: Tensor, *, alpha: float, theta: float) -> Tensor:
    """§3, w (RCI_cls) = 2σ(θ·s·r), s = 1 - 2p*, r = p - u - α (§2); computed in place in ``scores``."""
    r = scores.sub_(ious).sub_(alpha)  # §2, r = p - u - α, as rci()
    r.addcmul_(r, targets, value=-2)  # s·r with s = 1 - 2p* (+1 negatives, -1 positives)
    return r.mul_(theta).sigmoid_().mul_(2)  # torch.sigmoid is stable


@torch.no_grad()
def _scale_preserving_(weight: Tensor, targets: Tensor, valid: Tensor | None) -> Tensor:
    """§3c, ŵ = ω·w / mean over the valid elements of its group (p* = 1 or p* = 0); in place.

    Means are over the batch this process sees (under DDP, per process). A group that is empty, or
    whose weights are all 0, keeps its weights as they are (dividing by 1).
    """
    mask = targets if valid is None else targets * valid[:, None]  # valid positives
    pos_sum, pos_count = (weight * mask).sum(), mask.sum()
    mask = 1 - targets if valid is None else (1 - targets) * valid[:, None]  # valid negatives
    neg_sum, neg_count = (weight * mask).sum(), mask.sum()
    pos_mean = torch.where(pos_sum > 0, pos_sum / pos_count.clamp(min=1), 1.0)
    neg_mean = torch.where(neg_sum > 0, neg_sum / neg_count.clamp(min=1), 1.0)
    return weight.div_(torch.where(targets > 0, pos_mean, neg_mean))


@torch.no_grad()
def _module_weights(
    probs: Tensor,
    targets: Tensor,
    ious: Tensor,
    valid: Tensor | None,
    *,
    alpha: float,
    theta: float,
    mu: float,
    use_rci: bool,
    use_cf: bool,
    normalize: bool,
) -> Tensor | None:
    """ω·w of §3 (ŵ of §3c with ``normalize``), detached; None when both modules are off (then ŵ
    would be 1 too). ``probs`` = σ(x) is overwritten."""
    omega = _cf_cls_weight(targets, ious, mu=mu) if use_cf else None
    w = _rci_cls_weight_(probs, targets, ious, alpha=alpha, theta=theta) if use_rci else None
    weight = w if omega is None else omega if w is None else omega.mul_(w)
    if weight is not None and normalize:
        weight = _scale_preserving_(weight, targets, valid)
    return weight


@torch.no_grad()
def _cls_weights(
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
    normalize: bool,
    momentum: float,
    acc_sum: Tensor | None,
    sync_counts: bool,
    where: str,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """(β, ω·w or ŵ, normaliser T) of §3 / §3c, detached, in float32 at least; the module weight is
    None when both modules are off.

    Memory: at COCO shape an (N, C) float32 tensor is ~100 MB and each new one costs page faults, so
    the weights are built in place in as few buffers as possible: β in the buffer of g, w in the
    buffer of p = σ(x), ω in one more.
    """
    x = upcast(logits.detach())
    t = targets.to(x.dtype)
    u = ious.detach().to(x.dtype)
    p = torch.sigmoid(x)
    # §3, β: GHM-C harmonising weight from g = |p - p*|; T = number of valid elements.
    g = torch.sub(p, t).abs_()
    hist = ghm_bins(g, valid, bins=bins, momentum=momentum, acc_sum=acc_sum, sync_counts=sync_counts, where=where)
    beta = gather_beta(hist, out=g)  # g is no longer needed: β takes its memory
    weight = _module_weights(
        p, t, u, valid, alpha=alpha, theta=theta, mu=mu, use_rci=use_rci, use_cf=use_cf, normalize=normalize
    )
    return beta, weight, hist.normaliser


def cls_weights(
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
) -> tuple[Tensor, Tensor, Tensor]:
    """The HCRA-C weights ``(β, ω, w)``, each ``(N, C)`` and detached (§3), for analysis and plots.

    β is computed without momentum (``β = T / n_b`` divided by the number of non-empty bins); ω is 1
    when ``use_cf=False`` and w is 1 when ``use_rci=False``. Invalid priors get β = 0.
    """
    where = "cls_weights"
    _check_cls_inputs(logits, targets, ious, valid, where=where)
    _check_cls_hparams(mu, where=where)
    _check_cls_values(logits, ious, where=where)
    beta, _, _ = _cls_weights(
        logits, targets, ious, valid, alpha=alpha, theta=theta, mu=mu, bins=bins, use_rci=False,
        use_cf=False, normalize=False, momentum=0.0, acc_sum=None, sync_counts=False, where=where,
    )  # fmt: skip
    x = upcast(logits.detach())
    t, u = targets.to(x.dtype), ious.detach().to(x.dtype)
    omega = _cf_cls_weight(t, u, mu=mu) if use_cf else torch.ones_like(beta)
    w = _rci_cls_weight_(torch.sigmoid(x), t, u, alpha=alpha, theta=theta) if use_rci else torch.ones_like(beta)
    return beta, omega, w


def _hcra_cls_loss(
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
    where: str,
    base: str = "ghm",
    normalize: bool = False,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    avg_factor: float | Tensor | None = None,
    check_values: bool = False,
) -> Tensor:
    """§3 ``(1/T) Σ β·ω·w·BCE`` or §3b ``(1/num_pos) Σ a·(1 - p_t)^γ·ω·w·BCE`` (ŵ for ω·w with §3c);
    shared by the function and the module."""
    _check_cls_inputs(logits, targets, ious, valid, where=where)
    _check_cls_hparams(mu, where=where, base=base)
    if check_values:
        _check_cls_values(logits, ious, where=where)
    x = upcast(logits)
    t = targets.to(x.dtype)
    if base == "focal":
        return _focal_base_loss(
            x, t, ious, valid, alpha=alpha, theta=theta, mu=mu, use_rci=use_rci, use_cf=use_cf,
            normalize=normalize, focal_alpha=focal_alpha, focal_gamma=focal_gamma, avg_factor=avg_factor, where=where,
        )  # fmt: skip
    if avg_factor is not None:
        raise ValueError(f"{where}: avg_factor belongs to the focal base (§3b); the GHM-C base divides by its own T")
    weight, modules, normaliser = _cls_weights(
        x, t, ious, valid, alpha=alpha, theta=theta, mu=mu, bins=bins, use_rci=use_rci, use_cf=use_cf,
        normalize=normalize, momentum=momentum, acc_sum=acc_sum, sync_counts=sync_counts, where=where,
    )  # fmt: skip
    # β·(ω·w) in β's buffer. With both modules off the weight is β bit for bit, so the loss is
    # ghmc_loss exactly (§3, reductions).
    if modules is not None:
        weight.mul_(modules)
    del modules  # free before the BCE allocates its own buffers
    return weighted_bce_loss(x, t, weight, normaliser, where=where)


def _focal_base_loss(
    x: Tensor,
    t: Tensor,
    ious: Tensor,
    valid: Tensor | None,
    *,
    alpha: float,
    theta: float,
    mu: float,
    use_rci: bool,
    use_cf: bool,
    normalize: bool,
    focal_alpha: float,
    focal_gamma: float,
    avg_factor: float | Tensor | None,
    where: str,
) -> Tensor:
    """§3b: focal loss with the detached element weight ω·w (ŵ with §3c), over num_pos."""
    with torch.no_grad():
        modules = _module_weights(
            torch.sigmoid(x.detach()), t, ious.detach().to(x.dtype), valid, alpha=alpha, theta=theta, mu=mu,
            use_rci=use_rci, use_cf=use_cf, normalize=normalize,
        )  # fmt: skip
        # Invalid priors weigh 0. With both modules off the weight is the head's own per-prior
        # mask, so the loss is the head's focal loss bit for bit (§3b, reductions).
        mask = None if valid is None else valid.to(x.dtype)
        weight = mask if modules is None else modules if mask is None else modules.mul_(mask[:, None])
        if avg_factor is None:  # num_pos, as a focal-loss head passes it: the valid positive elements
            avg_factor = (t if mask is None else t * mask[:, None]).sum().clamp(min=1)
    return sigmoid_focal_loss(
        x, t, alpha=focal_alpha, gamma=focal_gamma, weight=weight, reduction="mean", avg_factor=avg_factor
    )


def hcra_cls_loss(
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
    base: Literal["ghm", "focal"] = "ghm",
    normalize: bool = False,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """HCRA-C, the classification loss of HCRAL (§3), and RCI and CF on a focal base (§3b)::

        base="ghm" (HCRA-C):   L_cls = (1/T) Σ_{valid i, k} β·ω·w·BCE(x, p*)
        base="focal" (§3b):    L_cls = (1/num_pos) Σ_{valid i, k} a·(1 - p_t)^γ_f·ω·w·BCE(x, p*)
        β: GHM-C weight (no momentum here: T / n_b over the non-empty bins)
        a = α_f for p* = 1 and 1 - α_f otherwise; p_t = p for p* = 1 and 1 - p otherwise
        ω = 1 + (2p* - 1)·u·(u - μ)²                    (CF_cls, use_cf)
        w = 2σ(θ·s·r), s = 1 - 2p*, r = p - u - α       (RCI_cls, use_rci)
        normalize (§3c): ω·w -> ŵ = ω·w / mean of ω·w over the valid positives (p* = 1) or negatives

    The focal base is the project's extension, not the paper's: report it as "RCI+CF on focal loss",
    never as HCRA-C; ``normalize`` as "scale-preserving".

    Args:
        logits: ``(N, C)`` sigmoid logits x (fp16/bf16 are upcast; BCE in float32 at least).
        targets: ``(N, C)`` p* in {0, 1}.
        ious: ``(N, C)`` u in [0, 1] (§1; detached here). Values outside it, and non-finite
            logits, are a ``ValueError`` (one host sync; the module form skips this check).
        valid: ``(N,)`` bool mask of non-ignored priors, or None for all.
        alpha, theta, mu, bins: §6 hyperparameters (``bins``: GHM-C base only).
        use_rci, use_cf: switch w and ω (both off: exactly :func:`~hcral.losses.ghm.ghmc_loss`, or
            with ``base="focal"`` exactly :func:`~hcral.losses.focal.sigmoid_focal_loss`).
        base: ``"ghm"`` (HCRA-C, §3) or ``"focal"`` (§3b).
        normalize: the scale-preserving weights of §3c.
        focal_alpha, focal_gamma: α_f and γ_f of the focal base.
        avg_factor: the focal base's normaliser num_pos (default: the number of valid positive
            elements, at least 1). Not accepted with the GHM-C base, which divides by its own T.

    Returns:
        A scalar. Empty input or a mask that excludes everything gives a zero that stays in the
        autograd graph.
    """
    return _hcra_cls_loss(
        logits, targets, ious, valid, alpha=alpha, theta=theta, mu=mu, bins=bins, use_rci=use_rci,
        use_cf=use_cf, momentum=0.0, acc_sum=None, sync_counts=False, where="hcra_cls_loss", base=base,
        normalize=normalize, focal_alpha=focal_alpha, focal_gamma=focal_gamma, avg_factor=avg_factor,
        check_values=True,
    )  # fmt: skip


class HCRAClassificationLoss(nn.Module):
    """HCRA-C (§3) with the GHM moving average of the bin counts.

    ``acc_sum (bins,)`` is a registered buffer: saved in checkpoints, moved by ``.to(device)``,
    registered even when ``momentum == 0`` so that checkpoints have the same keys. As MMDetection's
    ``GHMC``, it is updated on every call with momentum > 0, in training and eval mode alike; call the
    loss only in training if a validation pass must not advance it.

    ``sync_counts=True``: when torch.distributed is initialised the bin counts and T are summed over
    processes (one ``all_reduce`` per call), so β and the moving average are the global batch's on
    every rank, and each rank's loss is normalised by ``T_global / world_size`` (the mean over ranks
    equals the single-process loss of the whole batch). Without an initialised process group it is a
    no-op. All ranks must call the loss the same number of times (as for any collective).
    """

    acc_sum: Tensor

    def __init__(
        self,
        *,
        alpha: float = HCRA_ALPHA,
        theta: float = HCRA_THETA,
        mu: float = HCRA_MU,
        bins: int = 10,
        momentum: float = 0.75,
        use_rci: bool = True,
        use_cf: bool = True,
        base: Literal["ghm", "focal"] = "ghm",
        normalize: bool = False,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        loss_weight: float = 1.0,
        sync_counts: bool = True,
    ) -> None:
        super().__init__()
        where = "HCRAClassificationLoss"
        check_ghm_hparams(bins, momentum, where=where)
        _check_cls_hparams(mu, where=where, base=base)
        self.alpha, self.theta, self.mu, self.bins, self.momentum = alpha, theta, mu, bins, momentum
        self.use_rci, self.use_cf, self.loss_weight, self.sync_counts = use_rci, use_cf, loss_weight, sync_counts
        self.base, self.normalize, self.focal_alpha, self.focal_gamma = base, normalize, focal_alpha, focal_gamma
        # The GHM-C base's moving average; kept (unused) with the focal base so checkpoints have the same keys.
        self.register_buffer("acc_sum", torch.zeros(bins))

    @property
    def name(self) -> str:
        """How results of this loss are reported: HCRA-C only on its own GHM-C base (§3b, §3c)."""
        name = "HCRA-C" if self.base == "ghm" else "RCI+CF on focal loss"
        return f"{name}, scale-preserving" if self.normalize else name

    def forward(
        self,
        logits: Tensor,
        targets: Tensor,
        ious: Tensor,
        valid: Tensor | None = None,
        *,
        avg_factor: float | Tensor | None = None,
    ) -> Tensor:
        """``avg_factor``: the focal base's num_pos (§3b); not accepted with the GHM-C base."""
        loss = _hcra_cls_loss(
            logits, targets, ious, valid, alpha=self.alpha, theta=self.theta, mu=self.mu, bins=self.bins,
            use_rci=self.use_rci, use_cf=self.use_cf, momentum=self.momentum,
            acc_sum=self.acc_sum if self.momentum > 0 else None, sync_counts=self.sync_counts,
            where="HCRAClassificationLoss", base=self.base, normalize=self.normalize,
            focal_alpha=self.focal_alpha, focal_gamma=self.focal_gamma, avg_factor=avg_factor,
        )  # fmt: skip
        return self.loss_weight * loss

    def extra_repr(self) -> str:
        return (
            f"base={self.base!r}, normalize={self.normalize}, alpha={self.alpha}, theta={self.theta}, mu={self.mu}, "
            f"bins={self.bins}, momentum={self.momentum}, use_rci={self.use_rci}, use_cf={self.use_cf}, "
            f"focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}, loss_weight={self.loss_weight}, "
            f"sync_counts={self.sync_counts}"
        )


# ---------------------------------------------------------------------------------------------
# §4, HCRA-R
# ---------------------------------------------------------------------------------------------


def _check_reg_hparams(alpha: float, ep: float, gamma: float, *, where: str) -> None:
    if not ep > 0:
        raise ValueError(f"{where}: ep must be > 0 (it bounds ρ = (s - α + ep)/(q + ep)), got {ep!r}")
    if not alpha < ep:
        # ρ's lower bound (-α + ep)/(1 + ep) must stay positive, or weights could be <= 0.
        raise ValueError(f"{where}: alpha must be < ep so that ρ > 0, got alpha={alpha!r}, ep={ep!r}")
    if not gamma >= 0:
        raise ValueError(f"{where}: gamma must be >= 0, got {gamma!r}")


def _check_reg_inputs(
    pred_boxes: Tensor, target_boxes: Tensor, scores: Tensor, weight: Tensor | None, *, where: str
) -> None:
    check_boxes("pred_boxes", pred_boxes, where=where)
    check_shape("target_boxes", target_boxes, tuple(pred_boxes.shape), where=where)
    check_shape("scores", scores, (pred_boxes.shape[0],), where=where)
    if weight is not None:
        check_shape("weight", weight, (pred_boxes.shape[0],), where=where)


@torch.no_grad()
def _reg_weights_from_terms(
    terms: AlignedBoxTerms,
    scores: Tensor,
    *,
    alpha: float,
    ep: float,
    gamma: float,
    use_rci: bool,
    use_cf: bool,
) -> tuple[Tensor, Tensor]:
    """(ρ, t) of §4 from the box terms of (pred, target), detached."""
    q = terms.iou.detach()
    s = scores.detach().to(q.dtype)
    # §4, ρ (RCI_reg) = (s - α + ep) / (q + ep): > 1 in region 1, < 1 in region 2.
    rho = (s - alpha + ep) / (q + ep) if use_rci else torch.ones_like(q)
    if use_cf and gamma != 0:
        # §4, t (CF_reg) = (1 - q + R)^γ, R = δ²/c² (DIoU penalty). The base is >= 0 in exact
        # arithmetic; the clamp keeps a rounding of q above 1 from giving NaN for fractional γ.
        difficulty = (1 - q + diou_penalty_from_terms(terms).detach()).clamp(min=0)
        t = difficulty.pow(gamma)
    else:  # switched off, or γ = 0 (the ATSS setting): x^0 = 1 exactly, no need to compute R
        t = torch.ones_like(q)
    return rho, t


def reg_weights(
    pred_boxes: Tensor,
    target_boxes: Tensor,
    scores: Tensor,
    *,
    alpha: float = HCRA_ALPHA,
    ep: float = HCRA_EP,
    gamma: float = 0.0,
    use_rci: bool = True,
    use_cf: bool = True,
    box_eps: float = EPS,
) -> tuple[Tensor, Tensor]:
    """The HCRA-R weights ``(ρ, t)``, each ``(P,)`` and detached (§4), for analysis and plots.

    ``ρ = (s - α + ep)/(q + ep)`` (1 when ``use_rci=False``), ``t = (1 - q + ρ²/c²)^γ`` (1 when
    ``use_cf=False``), with ``q = IoU(pred, target)`` and ``s`` the positive's score.
    """
    where = "reg_weights"
    _check_reg_inputs(pred_boxes, target_boxes, scores, None, where=where)
    _check_reg_hparams(alpha, ep, gamma, where=where)
    terms = aligned_box_terms(pred_boxes.detach(), target_boxes.detach(), eps=box_eps)
    return _reg_weights_from_terms(terms, scores, alpha=alpha, ep=ep, gamma=gamma, use_rci=use_rci, use_cf=use_cf)


def hcra_reg_loss(
    pred_boxes: Tensor,
    target_boxes: Tensor,
    scores: Tensor,
    weight: Tensor | None = None,
    *,
    alpha: float = HCRA_ALPHA,
    ep: float = HCRA_EP,
    gamma: float = 0.0,
    use_rci: bool = True,
    use_cf: bool = True,
    eps: float = HCRA_REG_EPS,
    avg_factor: float | Tensor | None = None,
    sync_denominator: bool = False,
    box_eps: float = EPS,
) -> Tensor:
    """HCRA-R, the regression loss of HCRAL over positives (§4)::

        L_reg = Σ ρ·t·h·L_GIoU(b, g) / max(Σ ρ·t·h, eps)
        ρ = (s - α + ep) / (q + ep)      (RCI_reg, use_rci)
        t = (1 - q + δ²/c²)^γ            (CF_reg, use_cf)

    Args:
        pred_boxes: ``(P, 4)`` decoded xyxy boxes b of the positives (the gradient flows through them).
        target_boxes: ``(P, 4)`` their assigned ground truths g.
        scores: ``(P,)`` probability of each positive's class (detached here).
        weight: ``(P,)`` the head's own weight h (centerness target for ATSS/FCOS, ones for
            RetinaNet), or None for ones; detached here.
        alpha, ep, gamma: §6 hyperparameters (γ = 0 makes t ≡ 1, the ATSS setting; §6 suggests 0.5
            for RetinaNet).
        eps: ε of the denominator; it only guards 0/0 (no positives, or all h = 0).
        avg_factor: replaces ``Σ ρ·t·h`` in the denominator, e.g. its mean over DDP processes
            (§4: "the sum in the denominator is averaged over processes under DDP"); still clamped
            at ``eps``.
        sync_denominator: average ``Σ ρ·t·h`` over processes when torch.distributed is
            initialised (§4, DDP), so every rank divides by the same number; ignored with
            ``avg_factor``.
        box_eps: ε of the box geometry (:func:`~hcral.ops.boxes.aligned_box_terms`).

    Returns:
        A scalar (float32 at least). With no positives, a zero that stays in the autograd graph.
    """
    where = "hcra_reg_loss"
    _check_reg_inputs(pred_boxes, target_boxes, scores, weight, where=where)
    _check_reg_hparams(alpha, ep, gamma, where=where)
    if not eps > 0:
        raise ValueError(f"{where}: eps must be > 0, got {eps!r}")
    # One pass of box geometry: L_GIoU keeps the graph, ρ and t read the detached terms.
    terms = aligned_box_terms(pred_boxes, target_boxes, eps=box_eps)
    loss = 1 - giou_from_terms(terms)  # (P,), §4 L_GIoU
    rho, t = _reg_weights_from_terms(terms, scores, alpha=alpha, ep=ep, gamma=gamma, use_rci=use_rci, use_cf=use_cf)
    h = torch.ones_like(loss) if weight is None else weight.detach().to(loss.dtype)
    sample_weight = rho * t * h  # (P,), detached
    if avg_factor is None:
        denom = sample_weight.sum()
        if sync_denominator:
            denom = reduce_mean(denom)
    elif isinstance(avg_factor, Tensor):
        denom = avg_factor.detach().to(loss.dtype)
    else:
        denom = torch.tensor(float(avg_factor), dtype=loss.dtype, device=loss.device)
    return (sample_weight * loss).sum() / denom.clamp(min=eps)


class HCRARegressionLoss(nn.Module):
    """Module form of :func:`hcra_reg_loss` (§4); the result is multiplied by ``loss_weight``.

    It keeps no state; ``sync_denominator=True`` averages ``Σ ρ·t·h`` over DDP processes (§4).
    """

    def __init__(
        self,
        *,
        alpha: float = HCRA_ALPHA,
        ep: float = HCRA_EP,
        gamma: float = 0.0,
        use_rci: bool = True,
        use_cf: bool = True,
        eps: float = HCRA_REG_EPS,
        loss_weight: float = 1.0,
        sync_denominator: bool = False,
        box_eps: float = EPS,
    ) -> None:
        super().__init__()
        _check_reg_hparams(alpha, ep, gamma, where="HCRARegressionLoss")
        self.alpha, self.ep, self.gamma, self.use_rci, self.use_cf = alpha, ep, gamma, use_rci, use_cf
        self.eps, self.loss_weight, self.box_eps = eps, loss_weight, box_eps
        self.sync_denominator = sync_denominator

    def forward(
        self,
        pred_boxes: Tensor,
        target_boxes: Tensor,
        scores: Tensor,
        weight: Tensor | None = None,
        *,
        avg_factor: float | Tensor | None = None,
    ) -> Tensor:
        loss = hcra_reg_loss(
            pred_boxes, target_boxes, scores, weight, alpha=self.alpha, ep=self.ep, gamma=self.gamma,
            use_rci=self.use_rci, use_cf=self.use_cf, eps=self.eps, avg_factor=avg_factor,
            sync_denominator=self.sync_denominator, box_eps=self.box_eps,
        )  # fmt: skip
        return self.loss_weight * loss

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, ep={self.ep}, gamma={self.gamma}, use_rci={self.use_rci}, "
            f"use_cf={self.use_cf}, eps={self.eps}, loss_weight={self.loss_weight}"
        )
