"""HCRA-C and HCRA-R inside torchvision's own ``FCOS`` and ``RetinaNet``: a peer detector as a control.

Everything of torchvision's detector is kept: backbone interface, transform, anchor generator, the
heads' towers and output convolutions, the matcher (FCOS's centre-sampling rule in
``FCOS.compute_loss``; RetinaNet's ``Matcher(0.5, 0.4, allow_low_quality_matches=True)``), the box
coders and the post-processing. Only the head's ``compute_loss`` changes: :class:`HCRALFCOSHead`
and :class:`HCRALRetinaNetHead` subclass torchvision's ``FCOSHead`` and ``RetinaNetHead`` and turn
the matcher's ``matched_idxs`` into the inputs of two pluggable losses:

- ``cls_loss(logits (N, C), targets (N, C), ious (N, C), valid (N,), *, avg_factor) -> scalar``
  over all priors of the batch (N = images x priors): :class:`~hcral.losses.HCRAClassificationLoss`
  (HCRA-C, formulation §3; RCI and CF on focal loss with ``base="focal"``, §3b) or
  :class:`FocalClassificationLoss` (torchvision's focal loss). ``ious`` is u of formulation §1
  (:func:`~hcral.losses.hcra_ious` on the detached decoded boxes of every prior). ``avg_factor``
  is max(1, positives of the batch), or None for HCRA-C on its GHM-C base, which divides by its
  own T. A loss with ``uses_ious = False`` gets ``ious=None`` and the IoUs are not computed.
- ``reg_loss(pred_boxes (P, 4), target_boxes (P, 4), scores (P,), weight (P,) | None) -> scalar``
  over the P positives, with decoded xyxy boxes, ``scores`` σ(x) at each positive's class and
  ``weight`` the head's h (formulation §4): :class:`~hcral.losses.HCRARegressionLoss` (HCRA-R) or
  :class:`GIoURegressionLoss` (torchvision's GIoU loss).

Normalisation, and where it follows torchvision:

- FCOS. torchvision: focal loss summed over all priors, GIoU loss and centerness BCE summed over
  the positives, each divided by max(1, positives of the batch); its GIoU loss is not weighted by
  the centerness target. Kept: focal and GIoU here equal torchvision's values, the centerness term
  is torchvision's. h = 1 by default (torchvision's own weighting); ``centerness_weighted_reg=True``
  sets h = centerness target (Σ h·L / Σ h, MMDetection's FCOS and ATSS) for GIoU and HCRA-R alike.
- RetinaNet. torchvision: focal loss per image over non-ignored priors / max(1, positives of the
  image), then the mean over images; box loss L1 on encoded deltas, normalised the same way.
  Here every classification loss is normalised over the batch (max(1, positives of the batch), as
  MMDetection's RetinaNet), so focal loss and RCI+CF on focal share one normaliser; with one image
  the two agree. ``reg="l1"`` is torchvision's own box loss, unchanged. HCRA-R is built on GIoU
  (§4), so it replaces L1 on deltas by GIoU on decoded boxes; ``reg="giou"`` is that GIoU loss
  without RCI and CF (the control for HCRA-R).
- HCRA-C (GHM-C base): its own normaliser T, the number of valid (prior, class) elements (§3).

Loss terms keep torchvision's names (``classification``, ``bbox_regression``, ``bbox_ctrness``) and
weights (1 each); ``cls_weight`` and ``reg_weight`` of the factories scale the first two.
:class:`TorchvisionDetectorAdapter` lets :mod:`hcral.engine` train and evaluate such a model on
hcral's data pipeline (``experiments/torchvision_fcos_aquarium.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from hcral.config import LossConfig
from hcral.defaults import HCRA_ALPHA, HCRA_EP, HCRA_GAMMA_RETINANET, HCRA_MU, HCRA_THETA
from hcral.losses import HCRA_REG_EPS, HCRAClassificationLoss, HCRARegressionLoss, hcra_ious
from hcral.models.heads.dense_head import centerness_target
from hcral.ops.boxes import box_centers

__all__ = [
    "CLS_LOSSES",
    "FocalClassificationLoss",
    "GIoURegressionLoss",
    "HCRALFCOSHead",
    "HCRALRetinaNetHead",
    "MatchedPriors",
    "TorchvisionDetectorAdapter",
    "build_cls_loss",
    "build_reg_loss",
    "fcos_with_hcral",
    "match_priors",
    "retinanet_with_hcral",
]

ClsChoice = Literal["hcra_c", "focal", "focal_rci_cf"]
CLS_LOSSES: tuple[str, ...] = ("hcra_c", "focal", "focal_rci_cf")
FCOS_REG_LOSSES: tuple[str, ...] = ("hcra_r", "giou")
RETINANET_REG_LOSSES: tuple[str, ...] = ("hcra_r", "giou", "l1")
ClsLossFn = Callable[..., Tensor]
RegLossFn = Callable[..., Tensor]

# Defaults of the loss hyperparameters that are not HCRAL's own (formulation §6): those of hcral's
# detector configs (GHM-C: 30 bins, momentum 0.75; focal loss: α 0.25, γ 2, as torchvision's).
_LOSS_DEFAULTS = LossConfig()
# torchvision's Matcher.BETWEEN_THRESHOLDS: priors between the IoU thresholds, ignored by the loss.
IGNORED = -2


# ---------------------------------------------------------------------------------------------
# Losses in the head's interface
# ---------------------------------------------------------------------------------------------


class FocalClassificationLoss(nn.Module):
    """torchvision's focal loss (``torchvision.ops.sigmoid_focal_loss``) in the ``cls_loss`` interface:
    the sum over valid (prior, class) elements divided by ``avg_factor``, times ``loss_weight``.

    It does not read u (``uses_ious = False``).
    """

    uses_ious = False

    def __init__(
        self,
        *,
        alpha: float = _LOSS_DEFAULTS.focal_alpha,
        gamma: float = _LOSS_DEFAULTS.focal_gamma,
        loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.alpha, self.gamma, self.loss_weight = alpha, gamma, loss_weight

    def forward(
        self, logits: Tensor, targets: Tensor, ious: Tensor | None, valid: Tensor, *, avg_factor: float | Tensor
    ) -> Tensor:
        """``logits, targets (N, C)``, ``valid (N,)`` bool; ``ious`` is unused."""
        loss = sigmoid_focal_loss(logits[valid], targets[valid], alpha=self.alpha, gamma=self.gamma, reduction="sum")
        return self.loss_weight * loss / avg_factor

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, loss_weight={self.loss_weight}"


class GIoURegressionLoss(nn.Module):
    """torchvision's GIoU loss (``torchvision.ops.generalized_box_iou_loss``) in the ``reg_loss``
    interface: ``Σ h·(1 - GIoU) / max(Σ h, eps)`` over the positives, times ``loss_weight``.

    With ``weight=None`` (h = 1) this is torchvision FCOS's ``Σ (1 - GIoU) / max(1, P)``. It is
    HCRA-R with RCI and CF switched off (formulation §4); ``scores`` are unused.
    """

    def __init__(self, *, eps: float = HCRA_REG_EPS, loss_weight: float = 1.0) -> None:
        super().__init__()
        self.eps, self.loss_weight = eps, loss_weight

    def forward(self, pred_boxes: Tensor, target_boxes: Tensor, scores: Tensor, weight: Tensor | None = None) -> Tensor:
        """``pred_boxes, target_boxes (P, 4)`` xyxy; ``weight (P,)`` or None."""
        loss = generalized_box_iou_loss(pred_boxes, target_boxes, reduction="none")
        h = torch.ones_like(loss) if weight is None else weight.detach().to(loss.dtype)
        return self.loss_weight * (h * loss).sum() / h.sum().clamp(min=self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, loss_weight={self.loss_weight}"


def build_cls_loss(
    cls: ClsChoice,
    *,
    loss_weight: float = 1.0,
    alpha: float = HCRA_ALPHA,
    theta: float = HCRA_THETA,
    mu: float = HCRA_MU,
    use_rci: bool = True,
    use_cf: bool = True,
    normalize: bool = False,
    ghm_bins: int = _LOSS_DEFAULTS.ghm_bins,
    ghm_momentum: float = _LOSS_DEFAULTS.ghm_momentum,
    focal_alpha: float = _LOSS_DEFAULTS.focal_alpha,
    focal_gamma: float = _LOSS_DEFAULTS.focal_gamma,
) -> nn.Module:
    """The classification loss named ``cls``:

    - ``"hcra_c"``: HCRA-C (§3) on GHM-C with the momentum state (``ghm_bins``, ``ghm_momentum``);
    - ``"focal"``: torchvision's focal loss (:class:`FocalClassificationLoss`);
    - ``"focal_rci_cf"``: RCI and CF on focal loss (§3b; project extension, never reported as HCRA-C).

    ``normalize`` is the scale-preserving option (§3c) of the two HCRA variants; ``use_rci`` and
    ``use_cf`` switch their modules.
    """
    if cls == "focal":
        return FocalClassificationLoss(alpha=focal_alpha, gamma=focal_gamma, loss_weight=loss_weight)
    if cls not in CLS_LOSSES:
        raise ValueError(f"build_cls_loss: cls must be one of {CLS_LOSSES}, got {cls!r}")
    base = "ghm" if cls == "hcra_c" else "focal"
    return HCRAClassificationLoss(
        alpha=alpha, theta=theta, mu=mu, bins=ghm_bins, momentum=ghm_momentum, use_rci=use_rci, use_cf=use_cf,
        loss_weight=loss_weight, base=base, normalize=normalize, focal_alpha=focal_alpha, focal_gamma=focal_gamma,
    )  # fmt: skip


def build_reg_loss(
    reg: str,
    *,
    loss_weight: float = 1.0,
    alpha: float = HCRA_ALPHA,
    ep: float = HCRA_EP,
    gamma: float = 0.0,
    use_rci: bool = True,
    use_cf: bool = True,
) -> nn.Module | None:
    """The box loss named ``reg``: ``"hcra_r"`` (HCRA-R, §4), ``"giou"`` (:class:`GIoURegressionLoss`),
    or ``"l1"``: None, the head's own (torchvision RetinaNet's L1 on encoded deltas)."""
    if reg == "hcra_r":
        return HCRARegressionLoss(
            alpha=alpha, ep=ep, gamma=gamma, use_rci=use_rci, use_cf=use_cf, loss_weight=loss_weight
        )
    if reg == "giou":
        return GIoURegressionLoss(loss_weight=loss_weight)
    if reg == "l1":
        return None
    raise ValueError(f"build_reg_loss: reg must be one of {RETINANET_REG_LOSSES}, got {reg!r}")


# ---------------------------------------------------------------------------------------------
# From torchvision's matcher output to the losses' inputs
# ---------------------------------------------------------------------------------------------


@dataclass
class MatchedPriors:
    """A batch's assignment, flattened over images: B images, N priors each, C classes, P positives.

    ``cls_targets (B·N, C)``: one-hot p*. ``valid (B·N,)``: not ignored. ``ious (B·N, C)``: u of
    formulation §1, or None when not asked for. ``pos_index (P,)``: positives' rows in B·N;
    ``pos_labels (P,)``, ``pos_gt_boxes (P, 4)``: their assigned class and box. ``num_pos``:
    max(1, P), torchvision's normaliser.
    """

    cls_targets: Tensor
    valid: Tensor
    ious: Tensor | None
    pos_index: Tensor
    pos_labels: Tensor
    pos_gt_boxes: Tensor
    num_pos: float


@torch.no_grad()
def match_priors(
    targets: list[dict[str, Tensor]],
    matched_idxs: list[Tensor],
    num_classes: int,
    *,
    pred_boxes: Tensor | None = None,
) -> MatchedPriors:
    """Targets of the losses from torchvision's ``matched_idxs``.

    Args:
        targets: per image ``boxes (M, 4)`` xyxy and ``labels (M,)``.
        matched_idxs: per image ``(N,)``: the matched ground truth, -1 background, -2 ignored
            (torchvision's ``Matcher`` values; FCOS's matcher gives no -2).
        num_classes: C.
        pred_boxes: ``(B, N, 4)`` decoded boxes; when given, u is computed from them (detached).
    """
    matched = torch.stack(matched_idxs)  # (B, N)
    num_priors = matched.shape[1]
    flat = matched.reshape(-1)
    pos_index = (flat >= 0).nonzero(as_tuple=True)[0]
    # Index of each positive's ground truth among the batch's concatenated ones: its image's
    # offset plus its index in the image.
    counts = torch.tensor([len(t["labels"]) for t in targets], device=flat.device)
    offsets = counts.cumsum(0) - counts
    gt_index = offsets[pos_index // num_priors] + flat[pos_index]
    pos_labels = torch.cat([t["labels"] for t in targets])[gt_index]
    pos_gt_boxes = torch.cat([t["boxes"] for t in targets]).float()[gt_index]
    cls_targets = torch.zeros(flat.shape[0], num_classes, device=flat.device)
    cls_targets[pos_index, pos_labels] = 1.0
    ious = None
    if pred_boxes is not None:
        ious = torch.cat([
            hcra_ious(boxes, t["boxes"], t["labels"], m, num_classes)
            for boxes, t, m in zip(pred_boxes, targets, matched)
        ])  # fmt: skip
    return MatchedPriors(
        cls_targets, flat != IGNORED, ious, pos_index, pos_labels, pos_gt_boxes, float(max(pos_index.numel(), 1))
    )


def _cls_loss(loss: ClsLossFn, logits: Tensor, m: MatchedPriors) -> Tensor:
    # HCRA-C on its GHM-C base divides by its own T (§3) and takes no avg_factor; every other loss
    # is divided by the number of positives.
    own_normaliser = isinstance(loss, HCRAClassificationLoss) and loss.base == "ghm"
    flat = logits.reshape(-1, logits.shape[-1])
    return loss(flat, m.cls_targets, m.ious, m.valid, avg_factor=None if own_normaliser else m.num_pos)


def _reg_loss(loss: RegLossFn, logits: Tensor, pred_boxes: Tensor, m: MatchedPriors, weight: Tensor | None) -> Tensor:
    scores = logits.detach().reshape(-1, logits.shape[-1])[m.pos_index, m.pos_labels].sigmoid()
    return loss(pred_boxes.reshape(-1, 4)[m.pos_index], m.pos_gt_boxes, scores, weight)


def _uses_ious(loss: ClsLossFn) -> bool:
    return getattr(loss, "uses_ious", True)


# ---------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------


class HCRALFCOSHead(FCOSHead):
    """torchvision's ``FCOSHead`` (towers, outputs, box coder) with pluggable losses (module docstring).

    ``cls_loss`` and ``reg_loss`` are submodules when they are modules (HCRA-C's momentum state is
    then in the model's state dict). ``centerness_weighted_reg``: h = centerness target instead of 1.
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        num_convs: int = 4,
        *,
        cls_loss: ClsLossFn,
        reg_loss: RegLossFn,
        centerness_weighted_reg: bool = False,
    ) -> None:
        super().__init__(in_channels, num_anchors, num_classes, num_convs)
        self.cls_loss = cls_loss
        self.reg_loss = reg_loss
        self.centerness_weighted_reg = centerness_weighted_reg

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
    ) -> dict[str, Tensor]:
        # Losses in float32 whatever the autocast dtype of the towers (torchvision decodes in float too).
        cls_logits = head_outputs["cls_logits"].float()  # (B, N, C)
        anchors_t = torch.stack(anchors)  # (B, N, 4)
        pred_boxes = self.box_coder.decode(head_outputs["bbox_regression"].float(), anchors_t)  # (B, N, 4)
        m = match_priors(
            targets, matched_idxs, cls_logits.shape[-1], pred_boxes=pred_boxes if _uses_ious(self.cls_loss) else None
        )
        # torchvision's centerness target, from each positive's anchor centre (its FCOS point).
        ctr_target = centerness_target(box_centers(anchors_t.reshape(-1, 4)[m.pos_index]), m.pos_gt_boxes)
        ctr_logits = head_outputs["bbox_ctrness"].float().reshape(-1)[m.pos_index]
        h = ctr_target if self.centerness_weighted_reg else None
        return {
            "classification": _cls_loss(self.cls_loss, cls_logits, m),
            "bbox_regression": _reg_loss(self.reg_loss, cls_logits, pred_boxes, m, h),
            "bbox_ctrness": F.binary_cross_entropy_with_logits(ctr_logits, ctr_target, reduction="sum") / m.num_pos,
        }


class HCRALRetinaNetHead(RetinaNetHead):
    """torchvision's ``RetinaNetHead`` (towers, outputs, box coder) with pluggable losses (module
    docstring). ``reg_loss=None`` keeps torchvision's own box loss (L1 on encoded deltas); h = 1."""

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        norm_layer: Callable[..., nn.Module] | None = None,
        *,
        cls_loss: ClsLossFn,
        reg_loss: RegLossFn | None,
    ) -> None:
        super().__init__(in_channels, num_anchors, num_classes, norm_layer=norm_layer)
        self.cls_loss = cls_loss
        self.reg_loss = reg_loss

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
    ) -> dict[str, Tensor]:
        cls_logits = head_outputs["cls_logits"].float()  # (B, N, C)
        pred_boxes = None
        if self.reg_loss is not None or _uses_ious(self.cls_loss):
            b, n, _ = cls_logits.shape
            deltas = head_outputs["bbox_regression"].float().reshape(-1, 4)
            coder = self.regression_head.box_coder
            pred_boxes = coder.decode_single(deltas, torch.cat(anchors)).view(b, n, 4)
        m = match_priors(
            targets, matched_idxs, cls_logits.shape[-1], pred_boxes=pred_boxes if _uses_ious(self.cls_loss) else None
        )
        if self.reg_loss is None:
            loss_box = self.regression_head.compute_loss(targets, head_outputs, anchors, matched_idxs)
        else:
            loss_box = _reg_loss(self.reg_loss, cls_logits, pred_boxes, m, None)
        return {"classification": _cls_loss(self.cls_loss, cls_logits, m), "bbox_regression": loss_box}


# ---------------------------------------------------------------------------------------------
# Factories
# ---------------------------------------------------------------------------------------------


def fcos_with_hcral(
    backbone: nn.Module,
    num_classes: int,
    *,
    cls: ClsChoice = "hcra_c",
    reg: Literal["hcra_r", "giou"] = "hcra_r",
    num_convs: int = 4,
    centerness_weighted_reg: bool = False,
    cls_weight: float = 1.0,
    reg_weight: float = 1.0,
    alpha: float = HCRA_ALPHA,
    theta: float = HCRA_THETA,
    mu: float = HCRA_MU,
    ep: float = HCRA_EP,
    gamma: float = 0.0,
    cls_rci: bool = True,
    cls_cf: bool = True,
    reg_rci: bool = True,
    reg_cf: bool = True,
    normalize: bool = False,
    ghm_bins: int = _LOSS_DEFAULTS.ghm_bins,
    ghm_momentum: float = _LOSS_DEFAULTS.ghm_momentum,
    focal_alpha: float = _LOSS_DEFAULTS.focal_alpha,
    focal_gamma: float = _LOSS_DEFAULTS.focal_gamma,
    **fcos_kwargs: Any,
) -> FCOS:
    """torchvision's ``FCOS(backbone, num_classes, **fcos_kwargs)`` with :class:`HCRALFCOSHead`.

    ``cls``/``reg``: :func:`build_cls_loss` and :func:`build_reg_loss`; ``cls="focal", reg="giou"``
    is torchvision's FCOS loss. γ defaults to 0 (formulation §6: t ≡ 1 for FCOS-style heads).
    ``num_convs``: convolutions per tower (torchvision's default 4). ``backbone.out_channels`` must
    be a multiple of 32 (the towers' ``GroupNorm(32)``).
    """
    if reg not in FCOS_REG_LOSSES:
        raise ValueError(f"fcos_with_hcral: reg must be one of {FCOS_REG_LOSSES}, got {reg!r}")
    head = HCRALFCOSHead(
        backbone.out_channels, 1, num_classes, num_convs,  # FCOS: one anchor (point) per location
        cls_loss=build_cls_loss(
            cls, loss_weight=cls_weight, alpha=alpha, theta=theta, mu=mu, use_rci=cls_rci, use_cf=cls_cf,
            normalize=normalize, ghm_bins=ghm_bins, ghm_momentum=ghm_momentum, focal_alpha=focal_alpha,
            focal_gamma=focal_gamma,
        ),
        reg_loss=build_reg_loss(
            reg, loss_weight=reg_weight, alpha=alpha, ep=ep, gamma=gamma, use_rci=reg_rci, use_cf=reg_cf
        ),
        centerness_weighted_reg=centerness_weighted_reg,
    )  # fmt: skip
    return FCOS(backbone, num_classes, head=head, **fcos_kwargs)


def retinanet_with_hcral(
    backbone: nn.Module,
    num_classes: int,
    *,
    cls: ClsChoice = "hcra_c",
    reg: Literal["hcra_r", "giou", "l1"] = "hcra_r",
    norm_layer: Callable[..., nn.Module] | None = None,
    cls_weight: float = 1.0,
    reg_weight: float = 1.0,
    alpha: float = HCRA_ALPHA,
    theta: float = HCRA_THETA,
    mu: float = HCRA_MU,
    ep: float = HCRA_EP,
    gamma: float = HCRA_GAMMA_RETINANET,
    cls_rci: bool = True,
    cls_cf: bool = True,
    reg_rci: bool = True,
    reg_cf: bool = True,
    normalize: bool = False,
    ghm_bins: int = _LOSS_DEFAULTS.ghm_bins,
    ghm_momentum: float = _LOSS_DEFAULTS.ghm_momentum,
    focal_alpha: float = _LOSS_DEFAULTS.focal_alpha,
    focal_gamma: float = _LOSS_DEFAULTS.focal_gamma,
    **retinanet_kwargs: Any,
) -> RetinaNet:
    """torchvision's ``RetinaNet(backbone, num_classes, **retinanet_kwargs)`` with :class:`HCRALRetinaNetHead`.

    ``cls``/``reg``: :func:`build_cls_loss` and :func:`build_reg_loss`; ``cls="focal", reg="l1"`` is
    torchvision's RetinaNet loss up to the batch-wide normaliser (module docstring). γ defaults to
    0.5 (formulation §6, RetinaNet). ``norm_layer``: the towers' norm (None: torchvision's v1 head).
    ``reg_weight`` does not apply to ``reg="l1"``, torchvision's own term.
    """
    if reg not in RETINANET_REG_LOSSES:
        raise ValueError(f"retinanet_with_hcral: reg must be one of {RETINANET_REG_LOSSES}, got {reg!r}")
    model = RetinaNet(backbone, num_classes, **retinanet_kwargs)
    # The head replaces torchvision's default one, built for the same anchor generator.
    model.head = HCRALRetinaNetHead(
        backbone.out_channels, model.anchor_generator.num_anchors_per_location()[0], num_classes, norm_layer,
        cls_loss=build_cls_loss(
            cls, loss_weight=cls_weight, alpha=alpha, theta=theta, mu=mu, use_rci=cls_rci, use_cf=cls_cf,
            normalize=normalize, ghm_bins=ghm_bins, ghm_momentum=ghm_momentum, focal_alpha=focal_alpha,
            focal_gamma=focal_gamma,
        ),
        reg_loss=build_reg_loss(
            reg, loss_weight=reg_weight, alpha=alpha, ep=ep, gamma=gamma, use_rci=reg_rci, use_cf=reg_cf
        ),
    )  # fmt: skip
    return model


# ---------------------------------------------------------------------------------------------
# hcral's engine
# ---------------------------------------------------------------------------------------------


class TorchvisionDetectorAdapter(nn.Module):
    """A torchvision detector with the interface of :class:`hcral.models.detector.Detector`, so that
    :func:`hcral.engine.train_one_epoch` and :func:`hcral.engine.evaluate` run it on hcral's data.

    hcral's loader gives a padded, normalised batch ``(B, 3, Hp, Wp)`` and targets with ``size``
    ``(h, w)`` (the unpadded resized image); each image is cropped to its size and passed on as a
    list with ``boxes`` and ``labels`` (hcral's ``ignore_boxes`` are dropped: torchvision has no
    ignore regions). Detections come back in input pixels, as hcral's engine expects.

    The model's own transform must then neither normalise nor resize again: build it with
    ``image_mean=[0, 0, 0]``, ``image_std=[1, 1, 1]`` (hcral's pipeline has normalised) and
    ``min_size``/``max_size`` equal to the data config's ``short_side``/``max_side``: an image that
    hcral resized has one side at its bound and the other within it, so torchvision's scale is 1
    and its resize is the identity (tests check it).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        images: Tensor,
        targets: list[dict] | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("training mode needs targets; call model.eval() for detections")
            sizes = [tuple(t["size"]) for t in targets]
            crops = [image[:, :h, :w] for image, (h, w) in zip(images, sizes)]
            return self.model(crops, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
        sizes = image_sizes if image_sizes is not None else [tuple(images.shape[-2:])] * images.shape[0]
        return self.model([image[:, :h, :w] for image, (h, w) in zip(images, sizes)])
