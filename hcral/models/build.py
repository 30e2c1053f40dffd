"""Build a detector from the typed config: the one place where config choices become modules."""

from __future__ import annotations

from hcral.config import Config, validate
from hcral.models.backbones import ResNet, SmallBackbone
from hcral.models.detector import Detector
from hcral.models.fpn import FPN
from hcral.models.heads.atss import ATSSHead
from hcral.models.heads.dense_head import DenseHead
from hcral.models.heads.fcos_atss import FCOSATSSHead
from hcral.models.heads.retinanet import RetinaNetHead

RESNET_DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}
HEADS: dict[str, type[DenseHead]] = {"retinanet": RetinaNetHead, "atss": ATSSHead, "fcos_atss": FCOSATSSHead}


def build_model(cfg: Config, num_classes: int) -> Detector:
    validate(cfg)  # e.g. an assigner that does not fit the detector, for configs built in Python
    m = cfg.model
    if m.backbone == "small":
        if m.pretrained:
            raise ValueError("model.pretrained needs a ResNet backbone (resnet18/34/50/101); 'small' has no ImageNet weights")
        backbone = SmallBackbone()
    else:
        backbone = ResNet(
            RESNET_DEPTHS[m.backbone], frozen_stages=m.frozen_stages, norm_eval=m.norm_eval, weights=m.pretrained
        )
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
    )
    return Detector(backbone, neck, head)
