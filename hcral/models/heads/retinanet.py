"""RetinaNet head (Lin et al., ICCV 2017): 9 anchors per location, max-IoU assignment (0.5 / 0.4).

Boxes are regressed as deltas on the anchors (MMDetection's DeltaXYWH coder, stds 1.0) and every
regression loss acts on the decoded boxes (``reg_decoded_bbox=True`` in MMDetection's terms), so the
GIoU family and HCRA-R apply unchanged. No centerness branch: h = 1 (formulation §4).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hcral.assign import Assignment, max_iou_assign
from hcral.models.coders import DeltaXYWHCoder
from hcral.models.heads.dense_head import DenseHead, PriorLayout
from hcral.models.priors import AnchorGenerator


class RetinaNetHead(DenseHead):
    group_norm = False
    with_centerness = False
    use_scales = False
    default_hcra_gamma = 0.5  # formulation §6: γ = 0.5 for RetinaNet

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        *,
        octave_base_scale: float = 4,
        scales_per_octave: int = 3,
        ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
        target_stds: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
        **kwargs,
    ) -> None:
        strides = kwargs.get("strides", (8, 16, 32, 64, 128))
        self.anchor_generator = AnchorGenerator(
            strides, octave_base_scale=octave_base_scale, scales_per_octave=scales_per_octave, ratios=ratios
        )
        super().__init__(num_classes, in_channels, num_base_priors=self.anchor_generator.num_base_priors, **kwargs)
        self.coder = DeltaXYWHCoder(stds=target_stds)

    def prior_layout(self, feat_sizes: list[tuple[int, int]], device: torch.device) -> PriorLayout:
        levels = self.anchor_generator.grid_priors(feat_sizes, device=device, dtype=torch.float32)
        anchors = torch.cat(levels)
        strides = torch.cat([anchors.new_full((len(a),), s) for a, s in zip(levels, self.strides)])
        return PriorLayout(anchors, anchors, strides, [len(a) for a in levels])

    def decode(self, layout: PriorLayout, reg: Tensor) -> Tensor:
        return self.coder.decode(layout.decode_priors.expand_as(reg), reg)

    def assign(self, layout: PriorLayout, target: dict, pred_boxes: Tensor, pred_scores: Tensor) -> Assignment:
        c = self.loss_cfg
        return max_iou_assign(
            layout.assign_boxes, target["boxes"], target["labels"], pos_iou=c.pos_iou, neg_iou=c.neg_iou
        )

    def regression_weight(self, layout: PriorLayout, pos_prior_index: Tensor, pos_gt_boxes: Tensor) -> Tensor:
        return pos_gt_boxes.new_ones(pos_gt_boxes.shape[0])
