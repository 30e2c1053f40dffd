"""Any timm model with ``features_only=True`` support as a detection backbone (``model.backbone=timm:<name>``).

The network is ``timm.create_model(name, features_only=True, out_indices=...)`` with the out
indices whose reductions are the requested strides (8, 16, 32: C3, C4, C5); channels come from its
``feature_info``.

Stages. ``frozen_stages = k`` freezes the stem and the first ``k`` stages, where the stages are
timm's own coarse parameter groups of the model (``model.group_matcher(coarse=True)``, the groups of
timm's layer-wise learning-rate decay): group 0 is the stem, group ``i`` the ``i``-th stage in
forward order. For a ResNet/Res2Net these are ``layer1..layer4`` (the same meaning as for
:class:`~hcral.models.backbones.resnet.ResNet`); for an EfficientNet/MobileNet the seven
``blocks.0..blocks.6``, so ``k`` freezes ``conv_stem``, ``bn1`` and ``blocks[0..k-1]``; for a
ConvNeXt ``stages.0..3``. ``-1`` freezes nothing.

Norms. ``norm="frozen_bn"`` turns every BatchNorm into timm's ``FrozenBatchNorm2d``
(``timm.layers.freeze_batch_norm_2d``); ``norm="bn"`` keeps them, and ``norm_eval`` keeps them in eval
mode during ``train()``. BatchNorms of frozen stages are always in eval mode.

Input. hcral's data pipeline normalises images with ``input_mean``/``input_std`` (ImageNet's). If
the model's weights expect another normalisation (``pretrained_cfg`` mean/std, e.g. [-1, 1] for the
TF-ported EfficientNets: mean = std = 0.5), one per-channel affine folded into a buffer converts the
input first: ``x * s_in / s + (m_in - m) / s``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import freeze_batch_norm_2d
from timm.layers.norm_act import FrozenBatchNormAct2d as TimmFrozenBatchNormAct2d
from torchvision.ops.misc import FrozenBatchNorm2d as TorchvisionFrozenBatchNorm2d
from timm.models import group_parameters, split_model_name_tag
from torch import Tensor, nn

from hcral.models.backbones.pretrained import (
    PACKAGED_WEIGHTS,
    PYPI,
    TIMM,
    check_state_dict,
    download_error,
    packaged_state_dict,
    read_state_dict,
    split_weights,
)
from hcral.models.backbones.resnet import FrozenBatchNorm2d, keep_norms_in_eval
from hcral.precision import run_in_float32

__all__ = ["TimmBackbone"]

NORMS = ("frozen_bn", "bn")
_STEM_GROUP = 0


class FrozenBatchNormAct2d(TimmFrozenBatchNormAct2d):
    """timm's ``FrozenBatchNormAct2d`` whose output keeps the input's dtype, as
    :class:`~hcral.models.backbones.resnet.FrozenBatchNorm2d` does for torchvision's: timm's multiplies
    by fp32 buffers, so under bf16 autocast every activation of a frozen backbone came out in fp32,
    and each convolution cast it back (a third of a bf16 Lite0 forward). The same float32 arithmetic
    in float32."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        shift = b - rm * scale
        return self.act(self.drop(x * scale.to(x.dtype) + shift.to(x.dtype)))


# timm's freeze_batch_norm_2d makes these; each is swapped for the subclass that keeps the dtype
# (same buffers, same state dict).
_DTYPE_KEEPING_NORMS = {TimmFrozenBatchNormAct2d: FrozenBatchNormAct2d, TorchvisionFrozenBatchNorm2d: FrozenBatchNorm2d}


def _keep_activation_dtype(module: nn.Module) -> None:
    for m in module.modules():
        if type(m) in _DTYPE_KEEPING_NORMS:
            m.__class__ = _DTYPE_KEEPING_NORMS[type(m)]


def _modules_of_stages(body: nn.Module, stage_of: dict[str, int], last: int) -> list[nn.Module]:
    """The largest modules of ``body`` whose parameters all lie in timm's groups ``0..last``. Modules
    without parameters (activations, pools, frozen norms) are not chosen: they keep the dtype they
    receive, float32 after a chosen module."""
    chosen: list[nn.Module] = []

    def visit(prefix: str, module: nn.Module) -> None:
        groups = {stage_of[prefix + n] for n, _ in module.named_parameters()}
        if not groups:
            return
        if max(groups) <= last:
            chosen.append(module)
            return
        for n, child in module.named_children():
            visit(f"{prefix}{n}.", child)

    visit("", body)
    return chosen


def _create(name: str, **kwargs) -> nn.Module:
    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as exc:
        if not timm.models.is_model(name):
            raise ValueError(f"timm has no model {name!r} (see timm.list_models())") from exc
        raise


def _stage_of_parameters(full: nn.Module, features: nn.Module, name: str) -> dict[str, int]:
    """timm's coarse group id (0: stem, i: i-th stage) of each parameter of ``features``.

    The groups are defined on the classifier model ``full``; a features_only model holds the same
    parameters in the same order (a prefix: the head is cut), under the same or flattened names
    (``stages.0`` -> ``stages_0``), so they are matched by position, shapes checked.
    """
    if not hasattr(full, "group_matcher"):
        raise ValueError(f"timm:{name} defines no stages (group_matcher); frozen_stages cannot apply to it")
    groups = group_parameters(full, full.group_matcher(coarse=True))
    group_of = {p: int(g) for g, names in groups.items() for p in names}
    ours = list(features.named_parameters())
    theirs = list(full.named_parameters())[: len(ours)]
    if len(theirs) != len(ours) or any(a.shape != b.shape for (_, a), (_, b) in zip(ours, theirs)):
        raise ValueError(f"timm:{name}: the features_only model's parameters are not a prefix of the full model's")
    return {ours_name: group_of[full_name] for (ours_name, _), (full_name, _) in zip(ours, theirs)}


class TimmBackbone(nn.Module):
    """A timm ``features_only`` model returning the maps at ``strides`` (a list); see the module docstring.

    Args:
        name: timm model name, optionally with a pretrained tag (``resnet50.a1_in1k``; the tag's
            ``pretrained_cfg`` gives the input normalisation of a weights file).
        strides: reductions of the maps to return, finest first.
        frozen_stages: ``-1`` nothing, ``0`` the stem, ``k`` the stem and timm's first ``k`` stages.
        float32_stages: the stages that run in float32 under autocast, counted as ``frozen_stages``
            (:func:`hcral.precision.run_in_float32`).
        norm: ``"frozen_bn"`` or ``"bn"``.
        norm_eval: keep BatchNorms in eval mode during ``train()`` (with ``norm="bn"``).
        weights: None (timm's random init), a state dict file of the timm classifier model,
            ``timm://<name>[.<tag>]`` (download) or ``pypi://<package>`` (see
            :mod:`hcral.models.backbones.pretrained`).
        input_mean, input_std: the normalisation the input already has (0..1 scale).
    """

    def __init__(
        self,
        name: str,
        *,
        strides: Sequence[int] = (8, 16, 32),
        frozen_stages: int = 1,
        float32_stages: int = -1,
        norm: str = "frozen_bn",
        norm_eval: bool = True,
        weights: str | os.PathLike | None = None,
        input_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        input_std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        arch, _ = split_model_name_tag(name)
        # Architecture facts (feature levels, stage groups, state dict shapes) from weightless copies.
        with torch.device("meta"):
            full = _create(name)
            try:
                probe = _create(name, features_only=True)
            except Exception as exc:  # noqa: BLE001 - timm raises various types for "not supported"
                raise ValueError(f"timm:{name} does not support features_only=True: {exc}") from exc
        reductions = probe.feature_info.reduction()
        missing = [s for s in strides if s not in reductions]
        if missing:
            raise ValueError(f"timm:{name} has feature maps at strides {reductions}, none at {missing}")
        out_indices = tuple(reductions.index(s) for s in strides)

        model_name, pretrained, state = name, False, None
        if weights is not None:
            scheme, rest = split_weights(str(weights))
            if scheme == TIMM:
                if split_model_name_tag(rest)[0] != arch:
                    raise ValueError(f"pretrained weights {weights!r} are for {rest}, but the backbone is timm:{name}")
                model_name, pretrained = rest, True
            elif scheme == PYPI:
                fits = PACKAGED_WEIGHTS.get(rest, (None,))[0]
                if fits is not None and fits != arch:
                    raise ValueError(f"pretrained weights {weights!r} fit timm:{fits}, not timm:{name}")
                state = packaged_state_dict(rest, {k: v.shape for k, v in full.state_dict().items()})
            elif scheme is None:
                expected = {k: v.shape for k, v in full.state_dict().items()}
                classifier = full.pretrained_cfg.get("classifier")
                drop = (f"{classifier}.",) if isinstance(classifier, str) else tuple(f"{c}." for c in classifier or ())
                state = check_state_dict(
                    expected, read_state_dict(rest), source=rest, target=f"timm:{name}", drop_prefixes=drop
                )
            else:
                raise ValueError(
                    f"pretrained weights {weights!r}: a timm backbone takes a file, timm://... or pypi://..."
                )
        kwargs = dict(features_only=True, out_indices=out_indices)
        if state is not None:
            # The features model holds a prefix of the full model's tensors (head cut): keep those,
            # and let timm load them through its own pipeline (which maps flattened names).
            kept = set(list(full.state_dict())[: len(probe.state_dict())])
            state = {k: v for k, v in state.items() if k in kept}
            body = _create(model_name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=state), **kwargs)
            body.pretrained_cfg.pop("state_dict", None)  # do not keep a second copy of the weights
        else:
            try:
                body = _create(model_name, pretrained=pretrained, **kwargs)
            except OSError as exc:  # offline: huggingface_hub's LocalEntryNotFoundError, urllib's URLError
                raise download_error(str(weights), f"timm's weights for {model_name}", exc) from exc

        stage_of = _stage_of_parameters(full, body, name)
        num_stages = max(stage_of.values())
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(f"frozen_stages must be in -1..{num_stages} for timm:{name}, got {frozen_stages!r}")
        if not -1 <= float32_stages <= num_stages:
            raise ValueError(f"float32_stages must be in -1..{num_stages} for timm:{name}, got {float32_stages!r}")
        if norm == "frozen_bn":
            body = freeze_batch_norm_2d(body)  # BN parameters become buffers; other names unchanged
            _keep_activation_dtype(body)
        for pname, p in body.named_parameters():
            if stage_of[pname] <= frozen_stages:
                p.requires_grad_(False)
        for module in _modules_of_stages(body, stage_of, float32_stages):
            run_in_float32(module)
        self.body = body

        self.name = name
        self.frozen_stages = frozen_stages
        self.float32_stages = float32_stages
        self.norm = norm
        self.norm_eval = norm_eval
        self.out_channels: list[int] = body.feature_info.channels()
        self.strides: list[int] = body.feature_info.reduction()
        if self.strides != list(strides):
            raise ValueError(f"timm:{name}: features_only model gives strides {self.strides}, expected {list(strides)}")
        # Input conversion from the pipeline's normalisation to the weights' (identity: none).
        mean, std = body.pretrained_cfg.get("mean", input_mean), body.pretrained_cfg.get("std", input_std)
        m_in, s_in, m, s = (
            torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (input_mean, input_std, mean, std)
        )
        self.input_scale: Tensor | None
        self.input_shift: Tensor | None
        if torch.equal(m_in, m) and torch.equal(s_in, s):
            self.input_scale = self.input_shift = None
        else:
            self.register_buffer("input_scale", s_in / s, persistent=False)
            self.register_buffer("input_shift", (m_in - m) / s, persistent=False)
        self.train()

    def train(self, mode: bool = True) -> TimmBackbone:
        super().train(mode)
        if mode:
            keep_norms_in_eval(self, norm_eval=self.norm_eval)
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        """``x (B, 3, H, W)`` -> one map per stride, ``(B, out_channels[i], H/s, W/s)``."""
        if self.input_scale is not None:
            x = x * self.input_scale + self.input_shift
        return list(self.body(x))
