"""Mixed precision: where bf16 autocast runs, and where it ends.

``train.amp`` runs the convolutions of backbone, FPN and head towers under bf16 autocast, on CUDA
and, with ``train.cpu_amp`` (off by default), on CPUs whose oneDNN has bf16 kernels (AVX-512 BF16 or
AMX); bf16 keeps fp32's exponent range, so no loss scaling is needed. The region ends inside the head (:func:`float32`), before
the prediction convolutions: logits, box deltas and centerness, and everything computed from
them -- decoding, assignment, IoU u (formulation §1), the GHM histogram, the losses, NMS -- run in
float32. bf16 keeps 8 significant bits: a logit near the prior's -4.6 would be rounded by up to
0.016, a box side by up to 0.4%, and HCRAL's weights read both (§2, §5).

The backbone's stem and first stages (``train.amp_float32_stages``) run in float32 too
(:func:`run_in_float32`): on the frozen pretrained Lite0 of the Aquarium configs, bf16 there took the
features 7-9% (relative L2) away from float32's, and the FPN and head's gradients 14% (the FPN and
towers' own bf16: 3%); most of it is made in the first, high-resolution block, and keeping the stem
and that block in float32 halves it for a quarter of a bf16 backbone forward
(docs/performance.md, "bf16 autocast on the CPU"). The FPN's P6/P7 convs run in float32 as well
(hcral/models/fpn.py): a oneDNN bf16 backward gave non-finite gradients on their 1x1 inputs.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import torch
from torch import nn

__all__ = ["autocast", "bf16_supported", "float32", "resolve_amp", "run_in_float32", "use_channels_last"]


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast runs fast kernels on ``device``: CUDA, or a CPU with oneDNN bf16."""
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


@functools.cache
def _note_no_bf16(device_type: str) -> None:
    print(f"train.amp: this {device_type} has no bf16 kernels; running in float32", file=sys.stderr)


def resolve_amp(enabled: bool, device: torch.device, *, cpu: bool = False) -> bool:
    """``train.amp`` as it takes effect on ``device``: on a CPU only with ``cpu`` (``train.cpu_amp``);
    says once (stderr) when bf16 is asked for and unavailable."""
    if device.type == "cpu" and not cpu:
        return False
    if enabled and not bf16_supported(device):
        _note_no_bf16(device.type)
        return False
    return enabled


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``enabled`` (callers pass :func:`resolve_amp`'s answer)."""
    if enabled:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def float32(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off: inside, float32 inputs give float32 results (the end of the bf16 region)."""
    return torch.autocast(device_type, enabled=False)


def use_channels_last(enabled: bool, device: torch.device, amp: bool) -> bool:
    """``train.channels_last`` as it takes effect (``amp``: :func:`resolve_amp`'s answer). On CUDA;
    on a CPU only under bf16 autocast, whose oneDNN kernels run NHWC faster (the frozen Lite0 of the
    Aquarium configs: 0.23 s against 0.28 s a batch), while float32 stays as it was, bit for bit."""
    return enabled and (device.type == "cuda" or amp)


@functools.cache
def _float32_class(cls: type[nn.Module]) -> type[nn.Module]:
    def forward(self: nn.Module, x: torch.Tensor, *args, **kwargs):
        if not torch.is_autocast_enabled(x.device.type):  # float32 runs the module's own forward, as it was
            return cls.forward(self, x, *args, **kwargs)
        with float32(x.device.type):
            return cls.forward(self, x.float(), *args, **kwargs)

    return type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__, "__doc__": cls.__doc__})


def run_in_float32(module: nn.Module) -> nn.Module:
    """Make ``module`` (whose forward takes one tensor first) run in float32 under autocast: its input
    is cast to float32 and autocast is off inside. Its class becomes a same-named subclass, so the
    state dict, the repr and the result without autocast stay as they were."""
    module.__class__ = _float32_class(type(module))
    return module
