"""What the two anchor-based heads (RetinaNet, ATSS) share: anchors on a grid and delta decoding.

Boxes are regressed as deltas on the anchors (MMDetection's DeltaXYWH coder) and every regression
loss acts on the decoded boxes (``reg_decoded_bbox=True`` in MMDetection's terms), so the GIoU
family and HCRA-R apply unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hcral.models.coders import DeltaXYWHCoder
from hcral.models.heads.dense_head import DenseHead, PriorLayout
from hcral.models.priors import AnchorGenerator


class AnchorHead(DenseHead):
    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        *,
        octave_base_scale: float,
        scales_per_octave: int,
        ratios: tuple[float, ...],
        target_stds: tuple[float, float, float, float],
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
