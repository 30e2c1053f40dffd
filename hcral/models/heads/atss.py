"""ATSS head (Zhang et al., CVPR 2020): one square anchor (side 8·stride) per location, GN towers,
a centerness branch on the regression tower, ATSS or EATSS assignment (formulation §5).

Deltas on the anchor with MMDetection's ATSS stds (0.1, 0.1, 0.2, 0.2); regression losses act on the
decoded boxes, weighted by the centerness target h of each positive's anchor centre.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hcral.assign import Assignment, atss_assign, eatss_assign
from hcral.models.coders import DeltaXYWHCoder
from hcral.models.heads.dense_head import DenseHead, PriorLayout
from hcral.models.priors import AnchorGenerator


def assign_atss_or_eatss(
    head: DenseHead, layout: PriorLayout, target: dict, pred_boxes: Tensor, pred_scores: Tensor
) -> Assignment:
    """ATSS, or EATSS when the config asks for it (formulation §5); shared by ATSS and FCOS+ATSS."""
    c = head.loss_cfg
    if c.assigner == "eatss":
        return eatss_assign(
            layout.assign_boxes, layout.num_level_priors, target["boxes"], target["labels"],
            pred_boxes=pred_boxes, pred_scores=pred_scores, topk=c.atss_topk, max_extra=c.eatss_max_extra,
        )
    if c.assigner == "atss":
        return atss_assign(
            layout.assign_boxes, layout.num_level_priors, target["boxes"], target["labels"],
            topk=c.atss_topk, ignore_boxes=target.get("ignore_boxes"),
        )
    raise ValueError(f"{type(head).__name__} takes assigner 'atss' or 'eatss', not {c.assigner!r}")


class ATSSHead(DenseHead):
    default_hcra_gamma = 0.0  # formulation §6: γ is set aside for ATSS

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        *,
        octave_base_scale: float = 8,
        target_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2),
        **kwargs,
    ) -> None:
        strides = kwargs.get("strides", (8, 16, 32, 64, 128))
        self.anchor_generator = AnchorGenerator(
            strides, octave_base_scale=octave_base_scale, scales_per_octave=1, ratios=(1.0,)
        )
        super().__init__(num_classes, in_channels, num_base_priors=1, **kwargs)
        self.coder = DeltaXYWHCoder(stds=target_stds)

    def prior_layout(self, feat_sizes: list[tuple[int, int]], device: torch.device) -> PriorLayout:
        levels = self.anchor_generator.grid_priors(feat_sizes, device=device, dtype=torch.float32)
        anchors = torch.cat(levels)
        strides = torch.cat([anchors.new_full((len(a),), s) for a, s in zip(levels, self.strides)])
        return PriorLayout(anchors, anchors, strides, [len(a) for a in levels])

    def decode(self, layout: PriorLayout, reg: Tensor) -> Tensor:
        return self.coder.decode(layout.decode_priors.expand_as(reg), reg)

    def assign(self, layout: PriorLayout, target: dict, pred_boxes: Tensor, pred_scores: Tensor) -> Assignment:
        return assign_atss_or_eatss(self, layout, target, pred_boxes, pred_scores)
