"""A small residual backbone for CPU work (synthetic data, raccoon, tests).

Layout: a 3x3 stride-2 stem, then four stages, each a 3x3 stride-2 conv followed by
``blocks_per_stage`` residual blocks (two 3x3 convs). Stage ``i`` (0-based) has stride
``2 ** (i + 2)``, so the default ``out_indices=(1, 2, 3)`` gives C3, C4, C5 at strides 8, 16, 32, as
:class:`~hcral.models.backbones.resnet.ResNet` does. With the default widths it has 2.0 M parameters
(ResNet-18: 11.2 M).

GroupNorm by default: CPU configs train with 2-4 images per step, and 1-2 per process under
2-process DDP on gloo (no SyncBatchNorm on CPU). BatchNorm statistics of so few images are noisy
and differ between train and eval; GroupNorm does not depend on the batch at all. ``norm="bn"`` is
there for comparison.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from hcral.precision import run_in_float32

__all__ = ["SmallBackbone"]

_NORMS = ("gn", "bn")


class _ConvNormAct(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, *, stride: int, norm: nn.Module, act: bool = True):
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
            norm,
        ]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int, make_norm) -> None:
        super().__init__()
        self.conv1 = _ConvNormAct(channels, channels, stride=1, norm=make_norm(channels))
        self.conv2 = _ConvNormAct(channels, channels, stride=1, norm=make_norm(channels), act=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(x + self.conv2(self.conv1(x)))


class SmallBackbone(nn.Module):
    """Small residual backbone; see the module docstring.

    Args:
        widths: channels of the stem and of the four stages (5 values).
        blocks_per_stage: residual blocks after each stage's stride-2 conv.
        out_indices: stages to return, from 0 (stride 4) to 3 (stride 32).
        norm: ``"gn"`` (GroupNorm with ``num_groups`` groups) or ``"bn"`` (BatchNorm2d).
        num_groups: GroupNorm groups; must divide every width.
        in_channels: channels of the input image.
        float32_stages: under autocast, ``-1`` nothing, ``0`` the stem, ``k`` the stem and the first
            ``k`` stages run in float32 (:func:`hcral.precision.run_in_float32`).
    """

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64, 128, 256),
        *,
        blocks_per_stage: int = 1,
        out_indices: Sequence[int] = (1, 2, 3),
        norm: str = "gn",
        num_groups: int = 8,
        in_channels: int = 3,
        float32_stages: int = -1,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 5 or min(widths) < 1:
            raise ValueError(f"widths must be 5 positive channel counts (stem + 4 stages), got {widths!r}")
        out_indices = tuple(int(i) for i in out_indices)
        increasing = list(out_indices) == sorted(set(out_indices))
        if not out_indices or not increasing or not all(0 <= i <= 3 for i in out_indices):
            raise ValueError(f"out_indices must be increasing stage indices in 0..3, got {out_indices!r}")
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
        if blocks_per_stage < 0:
            raise ValueError(f"blocks_per_stage must be >= 0, got {blocks_per_stage!r}")
        if norm == "gn":
            bad = [w for w in widths if w % num_groups]
            if bad:
                raise ValueError(f"num_groups={num_groups} must divide every width, not {bad} (widths={widths})")

        def make_norm(channels: int) -> nn.Module:
            return nn.GroupNorm(num_groups, channels) if norm == "gn" else nn.BatchNorm2d(channels)

        self.out_indices = out_indices
        self.stem = _ConvNormAct(in_channels, widths[0], stride=2, norm=make_norm(widths[0]))
        stages = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            blocks: list[nn.Module] = [_ConvNormAct(c_in, c_out, stride=2, norm=make_norm(c_out))]
            blocks += [_ResidualBlock(c_out, make_norm) for _ in range(blocks_per_stage)]
            stages.append(nn.Sequential(*blocks))
        # Stages after the last output are not built: nothing loads into this backbone strictly.
        self.stages = nn.ModuleList(stages[: out_indices[-1] + 1])
        self.out_channels: list[int] = [widths[i + 1] for i in out_indices]
        self.strides: list[int] = [2 ** (i + 2) for i in out_indices]
        self._init_weights()
        if not -1 <= float32_stages <= 4:
            raise ValueError(f"float32_stages must be in -1..4, got {float32_stages!r}")
        for module in ([self.stem] if float32_stages >= 0 else []) + list(self.stages[: max(float32_stages, 0)]):
            run_in_float32(module)
        self.float32_stages = float32_stages

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``x (B, C, H, W)`` -> one map per ``out_indices``, ``(B, out_channels[i], H/s, W/s)``."""
        x = self.stem(x)
        outs: list[Tensor] = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outs.append(x)
        return outs
