"""ATSS head (Zhang et al., CVPR 2020): one square anchor (side 8·stride) per location, GN towers,
a centerness branch on the regression tower, ATSS or EATSS assignment (formulation §5).

Deltas on the anchor with MMDetection's ATSS stds (0.1, 0.1, 0.2, 0.2); regression losses act on the
decoded boxes, weighted by the centerness target h of each positive's anchor centre.
"""

from __future__ import annotations

from torch import Tensor

from hcral.assign import Assignment, atss_assign, eatss_assign
from hcral.models.heads.anchor_head import AnchorHead
from hcral.models.heads.dense_head import DenseHead, PriorLayout


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


class ATSSHead(AnchorHead):
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
        super().__init__(
            num_classes, in_channels, octave_base_scale=octave_base_scale, scales_per_octave=1, ratios=(1.0,),
            target_stds=target_stds, **kwargs,
        )

    def assign(self, layout: PriorLayout, target: dict, pred_boxes: Tensor, pred_scores: Tensor) -> Assignment:
        return assign_atss_or_eatss(self, layout, target, pred_boxes, pred_scores)
