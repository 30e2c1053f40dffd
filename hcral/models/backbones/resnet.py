"""ResNet-18/34/50/101 (He et al., CVPR 2016) as a detection backbone, in plain PyTorch.

Parameter and buffer names are identical to ``torchvision.models.resnet`` (v1.5: in a Bottleneck the
stride sits on the 3x3 conv): ``conv1, bn1, layer1..layer4``, blocks with ``conv1/bn1/conv2/bn2
(/conv3/bn3)`` and ``downsample.0`` (1x1 conv) / ``downsample.1`` (norm). timm's ResNets use the
same names, so an ImageNet state dict from either loads with ``strict=True`` through
:func:`load_pretrained`. The classifier ``fc`` is not built: a detection backbone stops at C5.

Stage indices follow MMDetection: ``out_indices`` counts ``layer1..layer4`` from 0, so the default
``(1, 2, 3)`` returns C3, C4, C5 (strides 8, 16, 32); ``frozen_stages = k`` freezes the stem and
``layer1..layerk`` (``0``: stem only, ``-1``: nothing); ``norm_eval`` keeps every BatchNorm in eval
mode during ``train()`` (statistics from ImageNet, not from detection batches of 2 images a GPU).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["BasicBlock", "Bottleneck", "FrozenBatchNorm2d", "ResNet", "load_pretrained"]

# depth -> (block type, blocks per stage), as torchvision's resnet18/34/50/101.
_ARCH_SETTINGS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
_STAGE_PLANES = (64, 128, 256, 512)
_STEM_CHANNELS = 64
_NORMS = ("frozen_bn", "bn")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed affine parameters and statistics (all four are buffers).

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``, folded into one scale and
    shift. A torchvision/timm state dict carries ``num_batches_tracked`` for every BatchNorm; it has
    no meaning here and is dropped on load, so such a state dict loads with ``strict=True``.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Tensor],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        # Cast to the input's dtype so fp16/bf16 activations stay in their dtype under AMP.
        return x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


NormFactory = Callable[[int], nn.Module]


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut; stride on the first conv."""

    expansion = 1

    def __init__(
        self, in_channels: int, planes: int, *, stride: int = 1, downsample: nn.Module | None = None,
        norm_layer: NormFactory = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride: ResNet v1.5 as torchvision), 1x1 expand by 4."""

    expansion = 4

    def __init__(
        self, in_channels: int, planes: int, *, stride: int = 1, downsample: nn.Module | None = None,
        norm_layer: NormFactory = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_channels, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet backbone returning the feature maps of the stages in ``out_indices``.

    Args:
        depth: 18, 34, 50 or 101.
        out_indices: stages to return, counted from ``layer1`` = 0 (strides 4, 8, 16, 32); the
            default ``(1, 2, 3)`` gives C3, C4, C5. Stages after the last one listed are kept (so
            ImageNet state dicts still load strictly) but neither run nor trained.
        frozen_stages: ``-1`` freezes nothing, ``0`` the stem (conv1, bn1), ``k`` the stem and
            ``layer1..layerk`` (MMDetection's convention; detection configs use 1).
        norm: ``"frozen_bn"`` (:class:`FrozenBatchNorm2d`, detectron2's default: nothing of the
            norm is trained) or ``"bn"`` (``nn.BatchNorm2d``, affine trained; MMDetection's default).
        norm_eval: keep every ``nn.BatchNorm2d`` in eval mode during ``train()`` (no effect with
            ``"frozen_bn"``, which never updates).
        weights: path of a torchvision/timm ImageNet state dict to load (see :func:`load_pretrained`),
            or None for random init.
    """

    def __init__(
        self,
        depth: int,
        *,
        out_indices: Sequence[int] = (1, 2, 3),
        frozen_stages: int = 1,
        norm: str = "frozen_bn",
        norm_eval: bool = True,
        weights: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if depth not in _ARCH_SETTINGS:
            raise ValueError(f"ResNet depth must be one of {sorted(_ARCH_SETTINGS)}, got {depth!r}")
        out_indices = tuple(int(i) for i in out_indices)
        increasing = list(out_indices) == sorted(set(out_indices))
        if not out_indices or not increasing or not all(0 <= i <= 3 for i in out_indices):
            raise ValueError(f"out_indices must be increasing stage indices in 0..3, got {out_indices!r}")
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in -1..4, got {frozen_stages!r}")
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")

        self.depth = depth
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.norm = norm
        self.norm_eval = norm_eval
        block_type, stage_blocks = _ARCH_SETTINGS[depth]
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock if block_type == "basic" else Bottleneck
        norm_layer: NormFactory = FrozenBatchNorm2d if norm == "frozen_bn" else nn.BatchNorm2d

        self.conv1 = nn.Conv2d(3, _STEM_CHANNELS, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(_STEM_CHANNELS)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = _STEM_CHANNELS
        stage_channels: list[int] = []
        for i, (planes, num_blocks) in enumerate(zip(_STAGE_PLANES, stage_blocks)):
            stride = 1 if i == 0 else 2
            layer, in_channels = self._make_layer(block, in_channels, planes, num_blocks, stride, norm_layer)
            self.add_module(f"layer{i + 1}", layer)
            stage_channels.append(in_channels)
        self.stage_channels = stage_channels
        self.out_channels: list[int] = [stage_channels[i] for i in out_indices]
        self.strides: list[int] = [2 ** (i + 2) for i in out_indices]

        self._init_weights()
        if weights is not None:
            load_pretrained(self, weights)
        self._freeze()

    @staticmethod
    def _make_layer(
        block: type[BasicBlock] | type[Bottleneck], in_channels: int, planes: int, num_blocks: int,
        stride: int, norm_layer: NormFactory,
    ) -> tuple[nn.Sequential, int]:
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(_conv1x1(in_channels, out_channels, stride), norm_layer(out_channels))
        blocks = [block(in_channels, planes, stride=stride, downsample=downsample, norm_layer=norm_layer)]
        blocks += [block(out_channels, planes, norm_layer=norm_layer) for _ in range(1, num_blocks)]
        return nn.Sequential(*blocks), out_channels

    def _init_weights(self) -> None:
        # torchvision's init: He-normal (fan_out) convs, unit-scale zero-shift norms.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def _frozen_modules(self) -> list[nn.Module]:
        frozen: list[nn.Module] = []
        if self.frozen_stages >= 0:
            frozen += [self.conv1, self.bn1]
        frozen += self._stages()[: max(self.frozen_stages, 0)]
        # Stages after the last output never run: freeze them so DDP sees no unused parameter.
        frozen += self._stages()[self.out_indices[-1] + 1 :]
        return frozen

    def _freeze(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNet:
        super().train(mode)
        if mode:
            for module in self._frozen_modules():
                module.eval()
            if self.norm_eval:
                for m in self.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        """``x (B, 3, H, W)`` -> one map per ``out_indices``, ``(B, out_channels[i], H/s, W/s)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs: list[Tensor] = []
        for i, stage in enumerate(self._stages()[: self.out_indices[-1] + 1]):
            x = stage(x)
            if i in self.out_indices:
                outs.append(x)
        return outs


# ---------------------------------------------------------------------------------------------
# Pretrained weights
# ---------------------------------------------------------------------------------------------

# Keys of the ImageNet classifier: not part of a detection backbone, dropped before loading.
_CLASSIFIER_PREFIX = "fc."
_BN_COUNTER = "num_batches_tracked"
_MAX_KEYS_IN_ERROR = 20


def _unwrap_state_dict(obj: object, path: Path) -> Mapping[str, Tensor]:
    """A plain state dict, or one nested under "state_dict" / "model" (common checkpoint layouts)."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    return obj


def _fmt_keys(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_IN_ERROR])
    more = len(keys) - _MAX_KEYS_IN_ERROR
    return shown + (f", ... ({more} more)" if more > 0 else "")


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a torchvision- or timm-format ImageNet state dict from ``path`` into ``model`` (strict).

    ``fc.*`` (the 1000-class ImageNet classifier) is dropped first: a detection backbone has no
    classifier. ``num_batches_tracked`` counters of BatchNorms are accepted whether or not the model
    keeps them. Everything else must match exactly; otherwise a ``ValueError`` names the file and the
    missing, unexpected and wrongly shaped keys, and the model is left untouched.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure gets the file name
        raise ValueError(f"cannot read pretrained weights {path}: {exc}") from exc
    state = {k: v for k, v in _unwrap_state_dict(obj, path).items() if not k.startswith(_CLASSIFIER_PREFIX)}

    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(_BN_COUNTER)]
    # A counter is fine where the model has that BatchNorm (FrozenBatchNorm2d keeps no counter).
    unexpected = [
        k for k in state
        if k not in expected and not (k.endswith(_BN_COUNTER) and k[: -len(_BN_COUNTER)] + "running_mean" in expected)
    ]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        parts = [f"pretrained weights {path} do not match {type(model).__name__}"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {_fmt_keys(mismatched)}")
        raise ValueError("; ".join(parts))
    # Counters the model has no slot for (frozen BN) are removed by FrozenBatchNorm2d itself.
    model.load_state_dict(state, strict=True)
