"""What RetinaNet, ATSS and FCOS+ATSS heads share: the conv towers and one loss pipeline.

A head subclass says only what differs between detectors:

- ``prior_layout``: the priors used to decode predictions and the boxes the assigner sees;
- ``decode``: raw regression output -> boxes (xyxy, pixels of the padded input);
- ``assign``: one image's :class:`~hcral.assign.Assignment`;
- ``regression_weight``: the head's own per-positive weight h (formulation §4): the centerness
  target for ATSS and FCOS+ATSS, ones for RetinaNet.

Shapes: B images, N priors over all levels (level-major, then (y, x, anchor) as MMDetection),
C classes (sigmoid, no background channel), P positives in the batch.

Normalisers (as MMDetection's heads do, averaged over processes under DDP):

- focal, QFL, VFL: sum over (valid prior, class) / number of positives (at least 1);
- GHM-C and HCRA-C: their own, T = number of valid (prior, class) elements (formulation §3);
- GIoU family: Σ h·L / Σ h (the centerness-weighted mean of ATSS/FCOS; h = 1 gives the mean over
  positives of RetinaNet); HCRA-R: Σ ρ t h L / Σ ρ t h (formulation §4);
- centerness: BCE mean over positives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hcral import losses as L
from hcral.assign import Assignment
from hcral.config import EvalConfig, LossConfig
from hcral.distributed import reduce_mean
from hcral.models.heads.grad_share import GradShareMeter
from hcral.models.postprocess import select_detections
from hcral.ops.boxes import aligned_iou, box_centers, clip_boxes
from hcral.precision import float32


@dataclass
class PriorLayout:
    """Priors of one input size. ``decode_priors`` (N, 4 or 2) feed ``decode``; ``assign_boxes``
    (N, 4) are what the assigner sees (anchors, or 8·stride squares around points);
    ``strides`` (N,) the stride of each prior's level; ``num_level_priors`` per level."""

    decode_priors: Tensor
    assign_boxes: Tensor
    strides: Tensor
    num_level_priors: list[int]


class Scale(nn.Module):
    """A learnable scalar per level on the regression output (FCOS, ATSS)."""

    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _tower(in_channels: int, channels: int, num_convs: int, group_norm: bool, gn_groups: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(num_convs):
        layers.append(nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1, bias=not group_norm))
        if group_norm:
            layers.append(nn.GroupNorm(gn_groups, channels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def centerness_target(centers: Tensor, gt_boxes: Tensor) -> Tensor:
    """FCOS centerness sqrt(min(l,r)/max(l,r) · min(t,b)/max(t,b)) of centres (P, 2) in boxes (P, 4)."""
    left = centers[:, 0] - gt_boxes[:, 0]
    top = centers[:, 1] - gt_boxes[:, 1]
    right = gt_boxes[:, 2] - centers[:, 0]
    bottom = gt_boxes[:, 3] - centers[:, 1]
    lr = torch.stack((left, right), -1).clamp(min=0)
    tb = torch.stack((top, bottom), -1).clamp(min=0)
    ratio = lr.min(-1).values / lr.max(-1).values.clamp(min=1e-6) * tb.min(-1).values / tb.max(-1).values.clamp(min=1e-6)
    return ratio.sqrt()


class DenseHead(nn.Module):
    """Towers, output convolutions and the loss pipeline; subclasses fill in the detector specifics."""

    # Set by subclasses.
    group_norm: bool = True
    with_centerness: bool = True  # on the regression tower, as ATSS and FCOS (centerness_on_reg)
    use_scales: bool = True
    default_hcra_gamma: float = 0.0
    # NMS IoU when eval.nms_iou is None: the detector's reference config (ATSS's 0.6 by default).
    default_nms_iou: float = 0.6
    # Initial bias of the regression output (0: the first boxes are the priors' own, as MMDetection's
    # anchor heads with delta coding).
    reg_bias_init: float = 0.0

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        *,
        strides: tuple[int, ...] = (8, 16, 32, 64, 128),
        feat_channels: int = 256,
        num_convs: int = 4,
        num_base_priors: int = 1,
        prior_prob: float = 0.01,
        gn_groups: int = 32,
        loss: LossConfig | None = None,
        test: EvalConfig | None = None,
        log_grad_share: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.strides = tuple(strides)
        self.num_base_priors = num_base_priors
        self.loss_cfg = loss or LossConfig()
        self.test_cfg = test or EvalConfig()
        # At least 8 channels a group, as the reference's GN(32) over 256 channels: one channel a
        # group would make GN undefined on the 1x1 P7 map of a small input.
        gn_groups = math.gcd(min(gn_groups, max(feat_channels // 8, 1)), feat_channels)
        self.cls_tower = _tower(in_channels, feat_channels, num_convs, self.group_norm, gn_groups)
        self.reg_tower = _tower(in_channels, feat_channels, num_convs, self.group_norm, gn_groups)
        self.cls_out = nn.Conv2d(feat_channels, num_base_priors * num_classes, 3, padding=1)
        self.reg_out = nn.Conv2d(feat_channels, num_base_priors * 4, 3, padding=1)
        self.ctr_out = nn.Conv2d(feat_channels, num_base_priors, 3, padding=1) if self.with_centerness else None
        self.scales = nn.ModuleList(Scale() for _ in self.strides) if self.use_scales else None
        self._init_weights(prior_prob)
        self.cls_loss_module = self._build_cls_loss()
        # train.log_grad_share: the classification gradient's mass per group (grad_share.py).
        self.grad_share = GradShareMeter(alpha=self.loss_cfg.hcra_alpha) if log_grad_share else None

    def _init_weights(self, prior_prob: float) -> None:
        # Normal(0, 0.01) convs and the focal-loss prior bias (Lin et al. 2017, §4.1): every prior
        # starts at foreground probability prior_prob so the many negatives do not swamp the start.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_out.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.constant_(self.reg_out.bias, self.reg_bias_init)

    def _build_cls_loss(self) -> nn.Module | None:
        """GHM-C and HCRA-C keep a moving-average histogram (state in checkpoints); others are functions."""
        c = self.loss_cfg
        if c.cls == "ghmc":
            return L.GHMCLoss(bins=c.ghm_bins, momentum=c.ghm_momentum)
        if c.cls == "hcra_c":
            kwargs = dict(
                alpha=c.hcra_alpha, theta=c.hcra_theta, mu=c.hcra_mu, bins=c.ghm_bins,
                momentum=c.ghm_momentum, use_rci=c.hcra_cls_rci, use_cf=c.hcra_cls_cf,
                base=c.hcra_cls_base, normalize=c.hcra_cls_normalize,
                focal_alpha=c.focal_alpha, focal_gamma=c.focal_gamma,
            )
            return L.FusedHCRAClassificationLoss(**kwargs) if c.hcra_fused else L.HCRAClassificationLoss(**kwargs)
        return None

    @property
    def hcra_gamma(self) -> float:
        g = self.loss_cfg.hcra_gamma
        return self.default_hcra_gamma if g is None else g

    # ---- subclass hooks ------------------------------------------------------------------------

    def prior_layout(self, feat_sizes: list[tuple[int, int]], device: torch.device) -> PriorLayout:
        raise NotImplementedError

    def decode(self, layout: PriorLayout, reg: Tensor) -> Tensor:
        """reg (B, N, 4) raw outputs -> boxes (B, N, 4)."""
        raise NotImplementedError

    def assign(self, layout: PriorLayout, target: dict, pred_boxes: Tensor, pred_scores: Tensor) -> Assignment:
        raise NotImplementedError

    def regression_weight(self, layout: PriorLayout, pos_prior_index: Tensor, pos_gt_boxes: Tensor) -> Tensor:
        """h of formulation §4 for each positive (P,): centerness target by default."""
        centers = box_centers(layout.assign_boxes[pos_prior_index])
        return centerness_target(centers, pos_gt_boxes)

    # ---- forward -------------------------------------------------------------------------------

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, Tensor, Tensor | None, list[tuple[int, int]]]:
        """FPN levels -> cls logits (B, N, C), raw regression (B, N, 4), centerness logits (B, N) or None,
        all float32 (under autocast too), and the levels' (H, W)."""
        cls_all, reg_all, ctr_all, sizes = [], [], [], []
        for level, x in enumerate(feats):
            b, _, h, w = x.shape
            sizes.append((h, w))
            cls_feat = self.cls_tower(x)
            reg_feat = self.reg_tower(x)
            # The bf16 autocast region ends with the towers: the prediction layers, and everything
            # that reads their outputs, run in float32 (hcral/precision.py says why).
            with float32(x.device.type):
                cls_feat, reg_feat = cls_feat.float(), reg_feat.float()
                cls = self.cls_out(cls_feat)
                reg = self.reg_out(reg_feat)
                if self.scales is not None:
                    reg = self.scales[level](reg)
                ctr = self.ctr_out(reg_feat) if self.ctr_out is not None else None
            # (B, A*K, H, W) -> (B, H*W*A, K): priors ordered (y, x, anchor) within a level.
            cls_all.append(cls.permute(0, 2, 3, 1).reshape(b, -1, self.num_classes))
            reg_all.append(reg.permute(0, 2, 3, 1).reshape(b, -1, 4))
            if ctr is not None:
                ctr_all.append(ctr.permute(0, 2, 3, 1).reshape(b, -1))
        ctr_out = torch.cat(ctr_all, 1) if ctr_all else None
        return torch.cat(cls_all, 1), torch.cat(reg_all, 1), ctr_out, sizes

    # ---- training ------------------------------------------------------------------------------

    def loss(self, feats: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        """Named loss terms, each already multiplied by its weight from the config."""
        outputs = self(feats)
        with float32(feats[0].device.type):  # assignment, IoU u and the losses: float32 inputs, float32 ops
            return self._loss(*outputs, targets)

    def _loss(
        self, cls_logits: Tensor, reg: Tensor, ctr_logits: Tensor | None, sizes: list[tuple[int, int]], targets: list[dict]
    ) -> dict[str, Tensor]:
        layout = self.prior_layout(sizes, cls_logits.device)
        pred_boxes = self.decode(layout, reg)  # (B, N, 4)
        b, n, c = cls_logits.shape

        with torch.no_grad():
            scores = cls_logits.sigmoid()
            detached_boxes = pred_boxes.detach()
            gt_index = torch.full((b, n), -1, dtype=torch.long, device=cls_logits.device)
            labels = torch.full((b, n), -1, dtype=torch.long, device=cls_logits.device)
            target_boxes = torch.zeros(b, n, 4, device=cls_logits.device)
            need_u = self.loss_cfg.cls == "hcra_c" or self.grad_share is not None
            ious_u = torch.zeros(b, n, c, device=cls_logits.device) if need_u else None
            for i, t in enumerate(targets):
                a = self.assign(layout, t, detached_boxes[i], scores[i])
                gt_index[i], labels[i] = a.gt_index, a.labels
                if t["boxes"].numel():
                    target_boxes[i] = t["boxes"].to(target_boxes)[a.gt_index.clamp(min=0)]
                if ious_u is not None:  # u of §1, a positive held to the IoU with its own GT
                    ious_u[i] = L.hcra_ious(detached_boxes[i], t["boxes"], t["labels"], a.gt_index, c)

        pos = gt_index >= 0  # (B, N)
        valid = gt_index != -2
        pos_b, pos_i = pos.nonzero(as_tuple=True)
        pos_labels = labels[pos_b, pos_i]  # (P,)
        pos_pred = pred_boxes[pos_b, pos_i]  # (P, 4)
        pos_target = target_boxes[pos_b, pos_i]
        with torch.no_grad():
            pos_iou = aligned_iou(pos_pred.detach(), pos_target).clamp(min=0)  # IoU(b_i, g_a(i))
            pos_score = scores[pos_b, pos_i, pos_labels]
            h = self.regression_weight(layout, pos_i, pos_target) if self.with_centerness else torch.ones_like(pos_iou)
            num_pos = reduce_mean(pos_labels.new_tensor(float(pos_labels.numel()), dtype=torch.float32)).clamp(min=1.0)

        onehot = torch.zeros_like(cls_logits)
        onehot[pos_b, pos_i, pos_labels] = 1.0
        soft = None
        if self.loss_cfg.cls in ("qfl", "vfl"):  # their IoU-valued targets; a (B, N, C) tensor, so only when used
            soft = torch.zeros_like(cls_logits)
            soft[pos_b, pos_i, pos_labels] = pos_iou
        if self.grad_share is not None and cls_logits.requires_grad:
            self.grad_share.watch(cls_logits, onehot, valid, scores, ious_u)

        terms = {
            "loss_cls": self._cls_loss(cls_logits, onehot, soft, ious_u, valid, num_pos),
            "loss_reg": self._reg_loss(pos_pred, pos_target, pos_score, h),
        }
        if ctr_logits is not None:
            ctr = ctr_logits[pos_b, pos_i]
            terms["loss_centerness"] = (
                F.binary_cross_entropy_with_logits(ctr, h, reduction="sum") / num_pos
                if ctr.numel() else ctr_logits.sum() * 0.0
            )
        # The one place where terms are weighted.
        weights = {
            "loss_cls": self.loss_cfg.cls_weight,
            "loss_reg": self.loss_cfg.reg_weight,
            "loss_centerness": self.loss_cfg.centerness_weight,
        }
        return {k: v * weights[k] for k, v in terms.items()}

    def _cls_loss(
        self, logits: Tensor, onehot: Tensor, soft: Tensor | None, ious_u: Tensor | None, valid: Tensor, num_pos: Tensor
    ) -> Tensor:
        c = self.loss_cfg
        flat = logits.reshape(-1, self.num_classes)
        valid_flat = valid.reshape(-1)
        if c.cls == "hcra_c":
            # §3b divides by num_pos as focal loss does; HCRA-C by its own T.
            avg_factor = num_pos if c.hcra_cls_base == "focal" else None
            return self.cls_loss_module(
                flat, onehot.reshape(flat.shape), ious_u.reshape(flat.shape), valid_flat, avg_factor=avg_factor
            )
        if c.cls == "ghmc":
            return self.cls_loss_module(flat, onehot.reshape(flat.shape), valid_flat)
        weight = valid_flat.float()  # (B*N,): one weight per prior, broadcast over classes by the losses
        if c.cls == "focal":
            return L.sigmoid_focal_loss(
                flat, onehot.reshape(flat.shape), alpha=c.focal_alpha, gamma=c.focal_gamma,
                weight=weight, reduction="mean", avg_factor=num_pos,
            )
        if c.cls == "qfl":
            return L.quality_focal_loss(
                flat, soft.reshape(flat.shape), beta=c.qfl_beta, weight=weight, reduction="mean", avg_factor=num_pos
            )
        if c.cls == "vfl":
            return L.varifocal_loss(
                flat, soft.reshape(flat.shape), alpha=c.vfl_alpha, gamma=c.vfl_gamma,
                weight=weight, reduction="mean", avg_factor=num_pos,
            )
        raise ValueError(f"unknown classification loss {c.cls!r}")

    def _reg_loss(self, pred: Tensor, target: Tensor, score: Tensor, h: Tensor) -> Tensor:
        c = self.loss_cfg
        if c.reg == "hcra_r":
            # §4: under DDP the denominator Σ ρ t h is averaged over processes (a no-op in one process).
            return L.hcra_reg_loss(
                pred, target, score, h, alpha=c.hcra_alpha, ep=c.hcra_ep, gamma=self.hcra_gamma,
                use_rci=c.hcra_reg_rci, use_cf=c.hcra_reg_cf, sync_denominator=True,
            )
        # Σ h·L / Σ h, the denominator averaged over processes (as MMDetection's ATSS/FCOS heads).
        avg_factor = reduce_mean(h.sum()).clamp(min=1e-6)
        if c.reg == "giou":
            return L.giou_loss(pred, target, weight=h, avg_factor=avg_factor)
        if c.reg == "diou":
            return L.diou_loss(pred, target, weight=h, avg_factor=avg_factor)
        if c.reg == "ciou":
            return L.ciou_loss(pred, target, weight=h, avg_factor=avg_factor)
        if c.reg == "eiou":
            return L.eiou_loss(pred, target, weight=h, avg_factor=avg_factor)
        if c.reg == "focal_eiou":
            return L.focal_eiou_loss(pred, target, gamma=c.focal_eiou_gamma, weight=h, avg_factor=avg_factor)
        raise ValueError(f"unknown regression loss {c.reg!r}")

    # ---- inference -----------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, feats: list[Tensor], image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Detections per image in input pixels: boxes (K, 4), scores (K,), labels (K,)."""
        outputs = self(feats)
        with float32(feats[0].device.type):  # decoding and NMS in float32
            return self._predict(*outputs, image_sizes)

    def _predict(
        self, cls_logits: Tensor, reg: Tensor, ctr_logits: Tensor | None, sizes: list[tuple[int, int]],
        image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        layout = self.prior_layout(sizes, cls_logits.device)
        boxes = self.decode(layout, reg)
        scores = cls_logits.sigmoid_()  # in place: the (B, N, C) logits are not needed any more
        ctr = ctr_logits.sigmoid() if ctr_logits is not None else None
        t = self.test_cfg
        nms_iou = self.default_nms_iou if t.nms_iou is None else t.nms_iou
        results = []
        for i, size in enumerate(image_sizes):
            per_level = layout.num_level_priors
            lvl_scores = list(scores[i].split(per_level))
            lvl_boxes = [clip_boxes(bx, size) for bx in boxes[i].split(per_level)]
            lvl_ctr = list(ctr[i].split(per_level)) if ctr is not None else None
            det_boxes, det_scores, det_labels = select_detections(
                lvl_scores, lvl_boxes, nms_pre=t.nms_pre, score_thr=t.score_thr,
                iou_threshold=nms_iou, max_per_img=t.max_per_img, score_factors=lvl_ctr if t.use_centerness else None,
            )
            results.append({"boxes": det_boxes, "scores": det_scores, "labels": det_labels})
        return results
