"""Label assignment (formulation §5): ATSS, EATSS and RetinaNet's max-IoU assigner.

Each assigner has a per-image form (``(N, 4)`` priors, ``(M, 4)`` GTs -> ``(N,)`` fields) and a
batched form over images sharing one prior layout (GTs padded to ``(B, M, 4)`` with a ``(B, M)``
mask -> ``(B, N)`` fields) that gives exactly the per-image results. The label convention is in
:mod:`hcral.assign.types`. Point-based heads build their square priors (side 8·stride) with
:func:`hcral.models.priors.points_to_boxes`.
"""

from hcral.assign.atss import atss_assign, atss_assign_batched
from hcral.assign.eatss import eatss_assign, eatss_assign_batched
from hcral.assign.max_iou import max_iou_assign, max_iou_assign_batched
from hcral.assign.types import BACKGROUND, IGNORED, Assignment
from hcral.assign.utils import CENTER_MARGIN, DEFAULT_MAX_PAIRS, DEFAULT_MAX_PAIRS_CPU

__all__ = [
    "BACKGROUND",
    "CENTER_MARGIN",
    "DEFAULT_MAX_PAIRS",
    "DEFAULT_MAX_PAIRS_CPU",
    "IGNORED",
    "Assignment",
    "atss_assign",
    "atss_assign_batched",
    "eatss_assign",
    "eatss_assign_batched",
    "max_iou_assign",
    "max_iou_assign_batched",
]
