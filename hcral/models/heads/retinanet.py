"""RetinaNet head (Lin et al., ICCV 2017): 9 anchors per location, max-IoU assignment (0.5 / 0.4).

Deltas on the anchors with MMDetection's RetinaNet stds (1.0); no centerness branch, so h = 1
(formulation §4) and the regression loss is the mean over positives.
"""

from __future__ import annotations

from torch import Tensor

from hcral.assign import Assignment, max_iou_assign
from hcral.defaults import HCRA_GAMMA_RETINANET
from hcral.models.heads.anchor_head import AnchorHead
from hcral.models.heads.dense_head import PriorLayout


class RetinaNetHead(AnchorHead):
    group_norm = False
    with_centerness = False
    use_scales = False
    default_hcra_gamma = HCRA_GAMMA_RETINANET  # formulation §6
    default_nms_iou = 0.5  # MMDetection's RetinaNet config

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
        super().__init__(
            num_classes, in_channels, octave_base_scale=octave_base_scale, scales_per_octave=scales_per_octave,
            ratios=ratios, target_stds=target_stds, **kwargs,
        )

    def assign(self, layout: PriorLayout, target: dict, pred_boxes: Tensor, pred_scores: Tensor) -> Assignment:
        c = self.loss_cfg
        return max_iou_assign(
            layout.assign_boxes, target["boxes"], target["labels"], pos_iou=c.pos_iou, neg_iou=c.neg_iou
        )

    def regression_weight(self, layout: PriorLayout, pos_prior_index: Tensor, pos_gt_boxes: Tensor) -> Tensor:
        return pos_gt_boxes.new_ones(pos_gt_boxes.shape[0])
