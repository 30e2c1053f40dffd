"""Box operations (hand-written, see hcral.ops.boxes) and NMS (torchvision's, see hcral.ops.nms)."""

from hcral.ops.boxes import (
    AlignedBoxTerms,
    aligned_box_terms,
    aligned_ciou,
    aligned_diou,
    aligned_eiou,
    aligned_giou,
    aligned_iou,
    box_area,
    box_centers,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xywh_to_xyxy,
    box_xyxy_to_cxcywh,
    box_xyxy_to_xywh,
    clip_boxes,
)

__all__ = [
    "AlignedBoxTerms",
    "aligned_box_terms",
    "aligned_ciou",
    "aligned_diou",
    "aligned_eiou",
    "aligned_giou",
    "aligned_iou",
    "box_area",
    "box_centers",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_xyxy_to_xywh",
    "clip_boxes",
]
