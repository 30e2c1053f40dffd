"""COCO box evaluation (pycocotools) and result/JSON helpers.

pycocotools is an optional dependency (``pip install hcral[train]``); it is imported only inside
:func:`coco_evaluate`.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hcral.utils import write_json_atomic  # re-exported: part of this module's API

__all__ = ["METRIC_KEYS", "coco_evaluate", "detections_to_coco", "run_cocoeval", "write_json_atomic"]

# Names of pycocotools' COCOeval.stats[0:6], in order.
METRIC_KEYS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# pycocotools' object-area ranges in pixels² (all, small, medium, large), bounds inclusive.
_AREA_RANGES: tuple[tuple[float, float], ...] = (
    (0.0, 1e5**2),
    (0.0, 32.0**2),
    (32.0**2, 96.0**2),
    (96.0**2, 1e5**2),
)
# pycocotools' value for "no ground truth in this range".
_NO_GT = -1.0


def coco_evaluate(
    coco_gt: dict[str, Any],
    detections: Sequence[dict[str, Any]],
    *,
    iou_type: str = "bbox",
    verbose: bool = False,
) -> dict[str, float]:
    """COCO mAP of ``detections`` against ``coco_gt`` with pycocotools' ``COCOeval``.

    Args:
        coco_gt: COCO ground-truth dict (``images``, ``annotations`` with ``bbox`` xywh, ``area``,
            ``iscrowd``, ``categories``), e.g. from a dataset's ``coco_gt()``. Not modified.
        detections: COCO results, one dict per box: ``image_id``, ``category_id``, ``bbox``
            ``[x, y, w, h]`` in original image pixels, ``score``. Not modified.
        iou_type: only ``"bbox"`` is supported.
        verbose: let pycocotools print its progress and summary table.

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}``: ``COCOeval.stats[0:6]`` as floats in
        [0, 1] (AP at IoU 0.50:0.95, at 0.50, at 0.75, and for small < 32², medium, large > 96²
        pixel areas; 100 detections per image). A value is ``-1.0`` where pycocotools gives -1:
        no (non-crowd) ground truth in that size range. With no detections at all pycocotools
        would fail, so the result is computed directly: 0.0 where the range has ground truth,
        -1.0 where it has none (what pycocotools reports for an empty result).

    Raises:
        ImportError: pycocotools is not installed.
        ValueError: a detection names an image or category that is not in ``coco_gt`` or lacks
            a field.
    """
    evaluator = run_cocoeval(coco_gt, detections, iou_type=iou_type, verbose=verbose)
    if evaluator is None:
        return _metrics_without_detections(coco_gt)
    return {
        key: float(value) for key, value in zip(METRIC_KEYS, evaluator.stats[: len(METRIC_KEYS)])
    }


def run_cocoeval(
    coco_gt: dict[str, Any],
    detections: Sequence[dict[str, Any]],
    *,
    iou_type: str = "bbox",
    verbose: bool = False,
) -> Any:
    """pycocotools' ``COCOeval`` after ``evaluate``, ``accumulate`` and ``summarize``, for the
    numbers :func:`coco_evaluate` does not return (``eval["precision"]`` at any IoU threshold,
    ``evalImgs``' matches, ``stats[6:12]`` recalls); None when there are no detections (pycocotools
    fails on an empty result). Arguments and errors as :func:`coco_evaluate`."""
    if iou_type != "bbox":
        raise ValueError(f"iou_type must be 'bbox', got {iou_type!r}")
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as error:
        raise ImportError("COCO evaluation needs pycocotools: pip install hcral[train]") from error

    image_ids = {image["id"] for image in coco_gt["images"]}
    category_ids = {category["id"] for category in coco_gt["categories"]}
    results: list[dict[str, Any]] = []
    for k, detection in enumerate(detections):
        missing = [
            key for key in ("image_id", "category_id", "bbox", "score") if key not in detection
        ]
        if missing:
            raise ValueError(f"detections[{k}]: missing field(s) {missing}")
        if detection["image_id"] not in image_ids:
            raise ValueError(f"detections[{k}]: image_id {detection['image_id']} is not in coco_gt")
        if detection["category_id"] not in category_ids:
            raise ValueError(
                f"detections[{k}]: category_id {detection['category_id']} is not in coco_gt "
                f"(valid: {sorted(category_ids)})"
            )
        # pycocotools' loadRes writes area/id/iscrowd/segmentation into each dict: copy.
        results.append(
            {
                "image_id": detection["image_id"],
                "category_id": detection["category_id"],
                "bbox": [float(v) for v in detection["bbox"]],
                "score": float(detection["score"]),
            }
        )
    if not results:
        return None

    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        gt = COCO()
        gt.dataset = copy.deepcopy(dict(coco_gt))
        gt.createIndex()
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, iouType=iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def _metrics_without_detections(coco_gt: dict[str, Any]) -> dict[str, float]:
    """What pycocotools reports for an empty result: per IoU and area range, 0 if some non-crowd
    ground truth has its area in the range (bounds inclusive, as COCOeval), else -1."""
    areas = [
        float(annotation["area"])
        for annotation in coco_gt.get("annotations", [])
        if not annotation.get("iscrowd", 0)
    ]
    has_gt = [any(low <= area <= high for area in areas) for low, high in _AREA_RANGES]
    all_range, small, medium, large = (0.0 if present else _NO_GT for present in has_gt)
    return {
        "AP": all_range,
        "AP50": all_range,
        "AP75": all_range,
        "APs": small,
        "APm": medium,
        "APl": large,
    }


def detections_to_coco(
    image_id: int,
    boxes: torch.Tensor | np.ndarray,
    scores: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    cat_ids: Sequence[int],
    scale_factor: float,
    *,
    orig_size: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """One image's detections -> COCO result dicts in ORIGINAL image pixels.

    Args:
        image_id: the image's id in the ground truth.
        boxes: ``(N, 4)`` xyxy predicted on the resized (unpadded, unflipped) image.
        scores: ``(N,)`` confidences.
        labels: ``(N,)`` contiguous labels in ``0..C-1``.
        cat_ids: ``cat_ids[label]`` is the COCO category id (dataset ``cat_ids``).
        scale_factor: resized / original size (the target's ``scale_factor``); boxes are divided
            by it.
        orig_size: optional ``(h, w)``; if given, boxes are clipped to the original image.

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]`` with Python numbers.
    """
    if scale_factor <= 0:
        raise ValueError(f"scale_factor must be positive, got {scale_factor}")
    boxes_np = _to_numpy(boxes).astype(np.float64).reshape(-1, 4) / float(scale_factor)  # (N, 4)
    scores_np = _to_numpy(scores).astype(np.float64).reshape(-1)  # (N,)
    labels_np = _to_numpy(labels).astype(np.int64).reshape(-1)  # (N,)
    if not len(boxes_np) == len(scores_np) == len(labels_np):
        raise ValueError(
            f"boxes, scores and labels disagree in length: {len(boxes_np)}, {len(scores_np)}, "
            f"{len(labels_np)}"
        )
    if len(labels_np) and (labels_np.min() < 0 or labels_np.max() >= len(cat_ids)):
        raise ValueError(
            f"labels must be in 0..{len(cat_ids) - 1}, got {sorted(set(labels_np.tolist()))}"
        )
    if orig_size is not None:
        height, width = orig_size
        boxes_np = np.clip(boxes_np, 0.0, [width, height, width, height])
    results = []
    for (x1, y1, x2, y2), score, label in zip(
        boxes_np.tolist(), scores_np.tolist(), labels_np.tolist()
    ):
        results.append(
            {
                "image_id": int(image_id),
                "category_id": int(cat_ids[label]),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": score,
            }
        )
    return results


def _to_numpy(values: torch.Tensor | np.ndarray | Sequence[Any]) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)
