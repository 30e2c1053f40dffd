"""Losses: HCRA-C and HCRA-R (HCRAL, arXiv:2408.17182) and the losses they are compared with.

Each loss is a plain function (``*_loss``) plus a thin ``nn.Module`` that stores its hyperparameters
and multiplies by ``loss_weight``. Formulas: ``docs/method.md``. ``hcra_cls_loss_fused`` is an optional
``torch.compile`` path for HCRA-C (``docs/performance.md``).
"""

from hcral.losses._reduction import REDUCTIONS, weight_reduce_loss
from hcral.losses.focal import (
    QualityFocalLoss,
    SigmoidFocalLoss,
    VarifocalLoss,
    quality_focal_loss,
    sigmoid_focal_loss,
    varifocal_loss,
)
from hcral.losses.ghm import GHMCLoss, ghm_beta, ghm_edges, ghmc_loss
from hcral.losses.hcra import (
    HCRA_REG_EPS,
    HCRAClassificationLoss,
    HCRARegressionLoss,
    cls_weights,
    hcra_cls_loss,
    hcra_ious,
    hcra_reg_loss,
    rci,
    reg_weights,
)
from hcral.losses.fused import FusedHCRAClassificationLoss, hcra_cls_loss_fused
from hcral.losses.iou import (
    CIoULoss,
    DIoULoss,
    EIoULoss,
    FocalEIoULoss,
    GIoULoss,
    IoULoss,
    ciou_loss,
    diou_loss,
    eiou_loss,
    focal_eiou_loss,
    giou_loss,
    iou_loss,
)

__all__ = [
    "HCRA_REG_EPS",
    "REDUCTIONS",
    "CIoULoss",
    "DIoULoss",
    "EIoULoss",
    "FocalEIoULoss",
    "FusedHCRAClassificationLoss",
    "GHMCLoss",
    "GIoULoss",
    "HCRAClassificationLoss",
    "HCRARegressionLoss",
    "IoULoss",
    "QualityFocalLoss",
    "SigmoidFocalLoss",
    "VarifocalLoss",
    "ciou_loss",
    "cls_weights",
    "diou_loss",
    "eiou_loss",
    "focal_eiou_loss",
    "ghm_beta",
    "ghm_edges",
    "ghmc_loss",
    "giou_loss",
    "hcra_cls_loss",
    "hcra_cls_loss_fused",
    "hcra_ious",
    "hcra_reg_loss",
    "iou_loss",
    "quality_focal_loss",
    "rci",
    "reg_weights",
    "sigmoid_focal_loss",
    "varifocal_loss",
    "weight_reduce_loss",
]
