"""Build a detector from the typed config: the one place where config choices become modules."""

from __future__ import annotations

from torch import nn

from hcral.config import TIMM_BACKBONE_PREFIX, Config, ModelConfig, validate
from hcral.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from hcral.models.backbones import ResNet, SmallBackbone, TimmBackbone
from hcral.models.detector import Detector
from hcral.models.fpn import FPN
from hcral.models.heads.atss import ATSSHead
from hcral.models.heads.dense_head import DenseHead
from hcral.models.heads.fcos_atss import FCOSATSSHead
from hcral.models.heads.retinanet import RetinaNetHead

RESNET_DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}
HEADS: dict[str, type[DenseHead]] = {"retinanet": RetinaNetHead, "atss": ATSSHead, "fcos_atss": FCOSATSSHead}


def build_backbone(m: ModelConfig, *, float32_stages: int = -1) -> nn.Module:
    """The backbone of ``m.backbone`` with its weights (``m.pretrained``), returning C3, C4, C5;
    ``float32_stages`` (``train.amp_float32_stages``) run in float32 under autocast.

    ``norm_eval=True`` gives frozen BatchNorms (detectron2's fine-tuning default), ``False`` trainable
    ``BatchNorm2d`` in train mode (outside the frozen stages).
    """
    if any(m.stage_with_dcn) and m.backbone not in ("resnet50", "resnet101"):
        raise ValueError(f"model.stage_with_dcn={m.stage_with_dcn} needs backbone resnet50 or resnet101, not {m.backbone!r}")
    if m.backbone == "small":
        if m.pretrained:
            raise ValueError(f"model.pretrained={m.pretrained!r} needs a ResNet or timm backbone; 'small' has no ImageNet weights")
        return SmallBackbone(float32_stages=float32_stages)
    norm = "frozen_bn" if m.norm_eval else "bn"
    if m.backbone.startswith(TIMM_BACKBONE_PREFIX):
        return TimmBackbone(
            m.backbone[len(TIMM_BACKBONE_PREFIX) :],
            frozen_stages=m.frozen_stages,
            float32_stages=float32_stages,
            norm=norm,
            norm_eval=m.norm_eval,
            weights=m.pretrained,
            # The weights' own normalisation is applied inside the backbone, from the pipeline's.
            input_mean=IMAGENET_MEAN,
            input_std=IMAGENET_STD,
        )
    return ResNet(
        RESNET_DEPTHS[m.backbone],
        frozen_stages=m.frozen_stages,
        float32_stages=float32_stages,
        norm=norm,
        norm_eval=m.norm_eval,
        stage_with_dcn=m.stage_with_dcn,
        weights=m.pretrained,
    )


def build_model(cfg: Config, num_classes: int) -> Detector:
    validate(cfg)  # e.g. an assigner that does not fit the detector, for configs built in Python
    m = cfg.model
    backbone = build_backbone(m, float32_stages=cfg.train.amp_float32_stages)
    # RetinaNet builds P6 from C5 ("on_input"); ATSS and FCOS from P5 ("on_output"), FCOS with a
    # ReLU before P7's conv, as in the detectors' reference configs.
    neck = FPN(
        backbone.out_channels,
        m.fpn_channels,
        num_outs=5,
        extra_source="input" if m.detector == "retinanet" else "output",
        relu_before_extra=m.detector == "fcos_atss",
    )
    head = HEADS[m.detector](
        num_classes,
        m.fpn_channels,
        feat_channels=m.head_channels,
        num_convs=m.head_convs,
        prior_prob=m.prior_prob,
        loss=cfg.loss,
        test=cfg.eval,
        log_grad_share=cfg.train.log_grad_share,
    )
    return Detector(backbone, neck, head)
