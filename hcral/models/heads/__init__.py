"""Dense detection heads: RetinaNet, ATSS and FCOS+ATSS, sharing one loss pipeline."""

from hcral.models.heads.anchor_head import AnchorHead
from hcral.models.heads.atss import ATSSHead
from hcral.models.heads.dense_head import DenseHead, PriorLayout
from hcral.models.heads.fcos_atss import FCOSATSSHead
from hcral.models.heads.retinanet import RetinaNetHead

__all__ = ["AnchorHead", "ATSSHead", "DenseHead", "FCOSATSSHead", "PriorLayout", "RetinaNetHead"]
