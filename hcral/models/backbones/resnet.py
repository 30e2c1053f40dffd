"""torchvision's ResNet-18/34/50/101 (He et al., CVPR 2016) as a detection backbone.

The network is ``torchvision.models.resnet{depth}`` itself, built with torchvision's
``FrozenBatchNorm2d`` (detectron2's default for detection fine-tuning: neither the statistics nor the
affine of a norm are trained; here with an output in the input's dtype, for AMP) or
``nn.BatchNorm2d``. Its classifier (``avgpool``, ``fc``) is dropped, and so are the stages after the
last output. Parameter and buffer names are torchvision's (``conv1, bn1, layer1..layer4``), which
timm's ResNets share, so ImageNet state dicts of either load strictly.

Stage indices follow MMDetection: ``out_indices`` counts ``layer1..layer4`` from 0, so the default
``(1, 2, 3)`` returns C3, C4, C5 (strides 8, 16, 32); ``frozen_stages = k`` freezes the stem and
``layer1..layerk`` (``0``: stem only, ``-1``: nothing); ``norm_eval`` keeps every BatchNorm in eval
mode during ``train()`` (statistics from ImageNet, not from detection batches of 2 images a GPU);
``stage_with_dcn`` makes the 3x3 conv of every Bottleneck of the chosen stages deformable
(:class:`DeformConv2dPack`; MMDetection's ``dconv_c3-c5`` configs use ``(False, True, True, True)``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torchvision
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import Bottleneck
from torchvision.ops import DeformConv2d, misc

from hcral.models.backbones.pretrained import (
    TORCHVISION,
    TORCHVISION_DEFAULT_TAG,
    load_pretrained,
    load_state_dict_checked,
    split_weights,
    torchvision_state_dict,
)
from hcral.precision import run_in_float32

__all__ = ["DeformConv2dPack", "FrozenBatchNorm2d", "ResNet", "keep_norms_in_eval"]


class FrozenBatchNorm2d(misc.FrozenBatchNorm2d):
    """torchvision's ``FrozenBatchNorm2d`` whose output keeps the input's dtype, as detectron2's does.

    torchvision's multiplies by fp32 buffers, so under CUDA autocast every fp16 activation of the
    backbone would come out (and be saved for backward) in fp32.
    """

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)


class DeformConv2dPack(DeformConv2d):
    """``conv`` made deformable (Dai et al., ICCV 2017): torchvision's ``DeformConv2d`` with its offsets
    predicted from the same input by a conv of the same geometry (``conv_offset``).

    As mmcv's ``DeformConv2dPack`` (same state dict names, ``weight`` and ``conv_offset.*``): the
    offset conv starts at zero, so the module starts as the conv it replaces, whose weights it takes.
    """

    def __init__(self, conv: nn.Conv2d, *, deform_groups: int = 1) -> None:
        super().__init__(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
        )
        self.load_state_dict(conv.state_dict())
        kh, kw = conv.kernel_size
        self.conv_offset = nn.Conv2d(
            conv.in_channels, deform_groups * 2 * kh * kw, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation,
        )
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x, self.conv_offset(x))


DEPTHS = (18, 34, 50, 101)
NORM_LAYERS: dict[str, type[nn.Module]] = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d}
_NUM_STAGES = 4
_STEM = ("conv1", "bn1")
_CLASSIFIER_PREFIX = "fc."
# Keys ImageNet weights do not have: the DCN offset convs keep their (zero) init.
_DCN_OFFSET = ".conv_offset."


def _stem_and_stages(net: nn.Module, k: int) -> list[str]:
    """Names of the stem and ``layer1..layerk`` (``k = -1``: none), those ``net`` has."""
    names = list(_STEM) if k >= 0 else []
    return names + [f"layer{i + 1}" for i in range(max(k, 0)) if f"layer{i + 1}" in net]


def keep_norms_in_eval(module: nn.Module, *, norm_eval: bool) -> None:
    """Put back into eval mode the BatchNorms of ``module`` that are frozen, or all of them under ``norm_eval``.

    Call after ``module.train()``: a frozen stage must not update its running statistics either.
    """
    for m in module.modules():
        if isinstance(m, _BatchNorm) and (norm_eval or not any(p.requires_grad for p in m.parameters())):
            m.eval()


def _load_weights(net: nn.Module, weights: str | os.PathLike, arch: str) -> None:
    scheme, rest = split_weights(str(weights))
    if scheme is None:
        load_pretrained(net, rest, drop_prefixes=(_CLASSIFIER_PREFIX,), keep_init=(_DCN_OFFSET,))
        return
    if scheme != TORCHVISION:
        raise ValueError(
            f"pretrained weights {weights!r}: backbone {arch} takes a file or {TORCHVISION}://{arch}[.TAG]; "
            f"for timm's weights use the backbone timm:{arch}"
        )
    name, _, tag = rest.partition(".")
    if name != arch:
        raise ValueError(f"pretrained weights {weights!r} are for {name}, but the backbone is {arch}")
    state = torchvision_state_dict(arch, tag or TORCHVISION_DEFAULT_TAG)
    load_state_dict_checked(net, state, source=str(weights), drop_prefixes=(_CLASSIFIER_PREFIX,), keep_init=(_DCN_OFFSET,))


class ResNet(IntermediateLayerGetter):
    """torchvision ResNet returning the feature maps of the stages in ``out_indices`` (a list).

    Args:
        depth: 18, 34, 50 or 101.
        out_indices: stages to return, counted from ``layer1`` = 0 (strides 4, 8, 16, 32); the
            default ``(1, 2, 3)`` gives C3, C4, C5. Stages after the last one listed are not built.
        frozen_stages: ``-1`` freezes nothing, ``0`` the stem (conv1, bn1), ``k`` the stem and
            ``layer1..layerk`` (MMDetection's convention; detection configs use 1).
        float32_stages: the stages that run in float32 under autocast, counted as ``frozen_stages``
            (:func:`hcral.precision.run_in_float32`).
        norm: ``"frozen_bn"`` (:class:`FrozenBatchNorm2d`: nothing of the norm is trained)
            or ``"bn"`` (``nn.BatchNorm2d``, affine trained; MMDetection's default).
        norm_eval: keep every ``nn.BatchNorm2d`` in eval mode during ``train()`` (no effect with
            ``"frozen_bn"``, which never updates).
        stage_with_dcn: per stage ``layer1..layer4``, whether its Bottlenecks' 3x3 convs are
            deformable (depth 50/101 only, as MMDetection).
        weights: a torchvision/timm ImageNet state dict file, ``torchvision://resnet{depth}[.TAG]``
            (see :mod:`hcral.models.backbones.pretrained`), or None for torchvision's random init.
    """

    def __init__(
        self,
        depth: int,
        *,
        out_indices: Sequence[int] = (1, 2, 3),
        frozen_stages: int = 1,
        float32_stages: int = -1,
        norm: str = "frozen_bn",
        norm_eval: bool = True,
        stage_with_dcn: Sequence[bool] = (False,) * _NUM_STAGES,
        weights: str | os.PathLike | None = None,
    ) -> None:
        if depth not in DEPTHS:
            raise ValueError(f"ResNet depth must be one of {list(DEPTHS)}, got {depth!r}")
        out_indices = tuple(int(i) for i in out_indices)
        increasing = list(out_indices) == sorted(set(out_indices))
        if not out_indices or not increasing or not all(0 <= i < _NUM_STAGES for i in out_indices):
            raise ValueError(f"out_indices must be increasing stage indices in 0..3, got {out_indices!r}")
        if not -1 <= frozen_stages <= _NUM_STAGES:
            raise ValueError(f"frozen_stages must be in -1..4, got {frozen_stages!r}")
        if not -1 <= float32_stages <= _NUM_STAGES:
            raise ValueError(f"float32_stages must be in -1..4, got {float32_stages!r}")
        if norm not in NORM_LAYERS:
            raise ValueError(f"norm must be one of {tuple(NORM_LAYERS)}, got {norm!r}")
        stage_with_dcn = tuple(bool(d) for d in stage_with_dcn)
        if len(stage_with_dcn) != _NUM_STAGES:
            raise ValueError(f"stage_with_dcn needs one flag per stage (4), got {stage_with_dcn!r}")

        arch = f"resnet{depth}"
        net = torchvision.models.get_model(arch, weights=None, norm_layer=NORM_LAYERS[norm])
        del net.avgpool, net.fc  # a detection backbone stops at C5
        for i, dcn in enumerate(stage_with_dcn):
            if not dcn:
                continue
            for block in getattr(net, f"layer{i + 1}"):
                if not isinstance(block, Bottleneck):
                    raise ValueError(f"stage_with_dcn needs Bottleneck blocks (depth 50 or 101), not {arch}")
                block.conv2 = DeformConv2dPack(block.conv2)  # the 3x3 conv, as MMDetection
        if weights is not None:
            _load_weights(net, weights, arch)
        # Stage i's width, as torchvision's resnet_fpn_backbone computes it (inplanes: C5's width).
        stage_channels = [net.inplanes // 2 ** (_NUM_STAGES - 1 - i) for i in range(_NUM_STAGES)]
        super().__init__(net, return_layers={f"layer{i + 1}": str(i) for i in out_indices})

        self.depth = depth
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.norm = norm
        self.norm_eval = norm_eval
        self.stage_with_dcn = stage_with_dcn
        self.out_channels: list[int] = [stage_channels[i] for i in out_indices]
        self.strides: list[int] = [2 ** (i + 2) for i in out_indices]
        for name in _stem_and_stages(self, frozen_stages):
            self[name].requires_grad_(False)
        for name in _stem_and_stages(self, float32_stages):
            run_in_float32(self[name])
        self.float32_stages = float32_stages
        self.train()

    def train(self, mode: bool = True) -> ResNet:
        super().train(mode)
        if mode:
            keep_norms_in_eval(self, norm_eval=self.norm_eval)
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        """``x (B, 3, H, W)`` -> one map per ``out_indices``, ``(B, out_channels[i], H/s, W/s)``."""
        return list(super().forward(x).values())

