"""Feature Pyramid Network (Lin et al., CVPR 2017) with the P6/P7 extras of RetinaNet, ATSS and FCOS.

Given backbone maps C3..C5 (strides 8, 16, 32), :class:`FPN` returns P3..P7 (strides 8..128):

- ``P5..P3``: lateral 1x1 conv of each ``C``, plus the coarser lateral upsampled (nearest, to the
  finer map's exact size), then a 3x3 output conv;
- ``P6``: 3x3 stride-2 conv on ``C5`` (``extra_source="input"``: RetinaNet, MMDetection's
  ``add_extra_convs='on_input'``) or on ``P5`` (``"output"``: ATSS and FCOS, ``'on_output'``);
- ``P7``: 3x3 stride-2 conv on ``P6``, after a ReLU when ``relu_before_extra=True`` (FCOS). The ReLU
  is applied before every extra conv except the first, as MMDetection's ``relu_before_extra_convs``.

Init as MMDetection's FPN: Xavier-uniform weights (gain 1) and zero biases on every conv. The convs
carry biases because the FPN has no normalisation layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from hcral.precision import run_in_float32

__all__ = ["FPN"]

_EXTRA_SOURCES = ("input", "output")


class FPN(nn.Module):
    """Top-down feature pyramid with stride-2 extra levels.

    Args:
        in_channels: channels of the backbone maps, finest first (e.g. ``[512, 1024, 2048]`` for
            C3..C5 of ResNet-50).
        out_channels: channels of every output level.
        num_outs: number of outputs; ``num_outs - len(in_channels)`` extra stride-2 levels are added
            (5 with C3..C5 gives P3..P7).
        extra_source: ``"input"`` (first extra conv on the last backbone map) or ``"output"`` (on the
            last pyramid output).
        relu_before_extra: ReLU before the second and later extra convs.

    ``forward(feats)`` maps ``[(B, in_channels[i], H_i, W_i)]`` to ``num_outs`` maps
    ``(B, out_channels, H_l, W_l)``, each extra level ``ceil(H / 2)`` of the previous.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int = 256,
        *,
        num_outs: int = 5,
        extra_source: str = "input",
        relu_before_extra: bool = False,
    ) -> None:
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        if not in_channels:
            raise ValueError("FPN needs at least one input level, got in_channels=[]")
        if num_outs < len(in_channels):
            raise ValueError(f"num_outs={num_outs} must be >= the number of inputs ({len(in_channels)})")
        if extra_source not in _EXTRA_SOURCES:
            raise ValueError(f"extra_source must be one of {_EXTRA_SOURCES}, got {extra_source!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_outs = num_outs
        self.extra_source = extra_source
        self.relu_before_extra = relu_before_extra

        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, kernel_size=1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1) for _ in in_channels
        )
        self.extra_convs = nn.ModuleList()
        for i in range(num_outs - len(in_channels)):
            c_in = in_channels[-1] if (i == 0 and extra_source == "input") else out_channels
            # float32 under autocast: on a 1x1 input (the coarsest levels of small images), oneDNN's bf16
            # backward of this stride-2 conv returned non-finite weight gradients at random (torch 2.14.1,
            # Intel Xeon with AMX; docs/performance.md, "bf16 autocast on the CPU"). P6/P7 are ~1% of the FLOPs.
            conv = nn.Conv2d(c_in, out_channels, kernel_size=3, stride=2, padding=1)
            self.extra_convs.append(run_in_float32(conv))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        if len(feats) != len(self.in_channels):
            raise ValueError(f"FPN built for {len(self.in_channels)} inputs, got {len(feats)}")
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        # Top-down: coarse to fine, each coarser map upsampled to the finer map's exact size.
        for i in range(len(laterals) - 1, 0, -1):
            upsampled = F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
            laterals[i - 1] = laterals[i - 1] + upsampled
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)]
        for i, conv in enumerate(self.extra_convs):
            if i == 0:
                src = feats[-1] if self.extra_source == "input" else outs[-1]
            else:
                src = F.relu(outs[-1]) if self.relu_before_extra else outs[-1]
            outs.append(conv(src))
        return outs
