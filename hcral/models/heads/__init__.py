"""Dense detection heads: RetinaNet, ATSS and FCOS+ATSS, sharing one loss pipeline."""

from hcral.models.heads.atss import ATSSHead
from hcral.models.heads.dense_head import DenseHead, PriorLayout
from hcral.models.heads.fcos_atss import FCOSATSSHead
from hcral.models.heads.retinanet import RetinaNetHead

__all__ = ["ATSSHead", "DenseHead", "FCOSATSSHead", "PriorLayout", "RetinaNetHead"]
