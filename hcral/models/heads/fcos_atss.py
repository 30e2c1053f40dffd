"""FCOS+ATSS head (Tian et al., ICCV 2019, with ATSS sampling as in Zhang et al., CVPR 2020).

Points instead of anchors; the head predicts distances (l, t, r, b) to the box edges, kept
non-negative by a ReLU and scaled by the level's stride (FCOS's ``norm_on_bbox``). The assigner sees
each point as a square of side 8·stride centred on it (formulation §5). Centerness on the regression
tower; regression losses weighted by the centerness target h.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hcral.assign import Assignment
from hcral.models.heads.atss import assign_atss_or_eatss
from hcral.models.heads.dense_head import DenseHead, PriorLayout
from hcral.models.priors import PointGenerator, points_to_boxes


class FCOSATSSHead(DenseHead):
    default_hcra_gamma = 0.0  # formulation §6: γ is set aside for ATSS-style heads

    def __init__(self, num_classes: int, in_channels: int, *, prior_box_side: float = 8.0, **kwargs) -> None:
        strides = kwargs.get("strides", (8, 16, 32, 64, 128))
        self.point_generator = PointGenerator(strides)
        self.prior_box_side = prior_box_side
        # The official ATSS code's point mode: a bias of side/2 (4) under the stride-normalised
        # decode makes the first box the 8·stride prior square, not a zero-size box whose IoU ≈ 0
        # would starve EATSS step 3, u of HCRA-C and q of HCRA-R early in training.
        self.reg_bias_init = prior_box_side / 2
        super().__init__(num_classes, in_channels, num_base_priors=1, **kwargs)

    def prior_layout(self, feat_sizes: list[tuple[int, int]], device: torch.device) -> PriorLayout:
        levels = self.point_generator.grid_priors(feat_sizes, device=device, dtype=torch.float32)
        points = torch.cat(levels)
        strides = torch.cat([points.new_full((len(p),), s) for p, s in zip(levels, self.strides)])
        boxes = points_to_boxes(points, strides, side=self.prior_box_side)
        return PriorLayout(points, boxes, strides, [len(p) for p in levels])

    def decode(self, layout: PriorLayout, reg: Tensor) -> Tensor:
        dist = F.relu(reg) * layout.strides[None, :, None]  # (B, N, 4) pixels
        pts = layout.decode_priors[None]  # (1, N, 2)
        return torch.cat((pts - dist[..., :2], pts + dist[..., 2:]), dim=-1)

    def assign(self, layout: PriorLayout, target: dict, pred_boxes: Tensor, pred_scores: Tensor) -> Assignment:
        return assign_atss_or_eatss(self, layout, target, pred_boxes, pred_scores)
