"""COCO evaluation wrapper and helpers of hcral.evaluation."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hcral.data import SyntheticShapes, VOCDataset
from hcral.evaluation import METRIC_KEYS, coco_evaluate, detections_to_coco, write_json_atomic

RACCOON = Path(
    os.environ.get("HCRAL_RACCOON", Path(__file__).resolve().parents[2] / "shared/datasets/raccoon")
)


def _gt(
    boxes_xywh: list[list[float]],
    *,
    iscrowd: list[int] | None = None,
    cat_ids: tuple[int, ...] = (1,),
) -> dict:
    """One 400x400 image (id 1) with the given boxes, all of category cat_ids[0]."""
    iscrowd = iscrowd or [0] * len(boxes_xywh)
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 400, "height": 400}],
        "annotations": [
            {
                "id": k + 1,
                "image_id": 1,
                "category_id": cat_ids[0],
                "bbox": box,
                "area": box[2] * box[3],
                "iscrowd": crowd,
            }
            for k, (box, crowd) in enumerate(zip(boxes_xywh, iscrowd))
        ],
        "categories": [{"id": c, "name": f"c{c}"} for c in cat_ids],
    }


def _as_detections(gt: dict, score: float = 1.0) -> list[dict]:
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": list(a["bbox"]),
            "score": score,
        }
        for a in gt["annotations"]
        if not a["iscrowd"]
    ]


def test_perfect_detections_give_one_and_inputs_untouched() -> None:
    gt = SyntheticShapes(12, seed=0).coco_gt()
    detections = _as_detections(gt)
    gt_before, detections_before = copy.deepcopy(gt), copy.deepcopy(detections)
    metrics = coco_evaluate(gt, detections)
    assert list(metrics) == list(METRIC_KEYS)
    # pycocotools' precision is tp / (tp + fp + eps): 1 up to rounding.
    assert [metrics[k] for k in ("AP", "AP50", "AP75")] == pytest.approx([1.0] * 3, abs=1e-12)
    # 160x160 images with shapes up to 96 px: small and medium exist, large (area > 96²) does not.
    assert [metrics["APs"], metrics["APm"]] == pytest.approx([1.0, 1.0], abs=1e-12)
    assert metrics["APl"] == -1.0
    assert gt == gt_before and detections == detections_before


@pytest.mark.skipif(not RACCOON.is_dir(), reason="raccoon dataset not available")
def test_perfect_detections_on_raccoon_val() -> None:
    gt = VOCDataset(RACCOON, "val", class_names=["raccoon"]).coco_gt()
    metrics = coco_evaluate(gt, _as_detections(gt))
    assert [metrics[k] for k in ("AP", "AP50", "AP75")] == pytest.approx([1.0] * 3, abs=1e-12)


def test_shifted_box_closed_form() -> None:
    # GT 100x100 (large); detection shifted 20 px: IoU = 80·100 / (120·100) = 2/3, which passes
    # the IoU thresholds 0.50, 0.55, 0.60, 0.65 of the ten -> AP = 4/10, AP50 = 1, AP75 = 0.
    gt = _gt([[50.0, 50.0, 100.0, 100.0]])
    detections = [
        {"image_id": 1, "category_id": 1, "bbox": [70.0, 50.0, 100.0, 100.0], "score": 0.9}
    ]
    metrics = coco_evaluate(gt, detections)
    assert metrics["AP"] == pytest.approx(0.4)
    assert metrics["AP50"] == pytest.approx(1.0, abs=1e-12) and metrics["AP75"] == 0.0
    assert metrics["APl"] == pytest.approx(0.4)
    assert metrics["APs"] == metrics["APm"] == -1.0  # no ground truth in these ranges


def test_no_detections_matches_pycocotools_with_a_useless_detection() -> None:
    # Areas 20² (small), 50² (medium): no large ground truth.
    gt = _gt([[0.0, 0.0, 20.0, 20.0], [100.0, 100.0, 50.0, 50.0]])
    empty = coco_evaluate(gt, [])
    assert empty == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": 0.0, "APm": 0.0, "APl": -1.0}
    miss = [{"image_id": 1, "category_id": 1, "bbox": [300.0, 300.0, 10.0, 10.0], "score": 0.5}]
    assert coco_evaluate(gt, miss) == empty
    assert coco_evaluate(_gt([]), []) == {key: -1.0 for key in METRIC_KEYS}


def test_crowd_ground_truth_is_ignored_not_missed() -> None:
    # A detection on a crowd (VOC difficult) region is neither a TP nor an FP, and the crowd box is
    # not a miss: the perfect detection of the normal box keeps AP = 1.
    gt = _gt([[10.0, 10.0, 60.0, 60.0], [200.0, 200.0, 80.0, 80.0]], iscrowd=[0, 1])
    detections = _as_detections(gt, score=0.5)
    detections.append(
        {"image_id": 1, "category_id": 1, "bbox": [200.0, 200.0, 80.0, 80.0], "score": 0.9}
    )
    assert coco_evaluate(gt, detections)["AP"] == pytest.approx(1.0, abs=1e-12)
    detections[-1]["bbox"] = [300.0, 10.0, 80.0, 80.0]  # elsewhere: a false positive above the TP
    assert coco_evaluate(gt, detections)["AP"] < 0.99


def test_detection_validation() -> None:
    gt = _gt([[0.0, 0.0, 20.0, 20.0]])
    with pytest.raises(ValueError, match="image_id 5 is not in coco_gt"):
        coco_evaluate(gt, [{"image_id": 5, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(ValueError, match=r"category_id 2 is not in coco_gt \(valid: \[1\]\)"):
        coco_evaluate(gt, [{"image_id": 1, "category_id": 2, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(ValueError, match=r"missing field\(s\) \['score'\]"):
        coco_evaluate(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match="iou_type"):
        coco_evaluate(gt, [], iou_type="segm")


def test_missing_pycocotools_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    with pytest.raises(ImportError, match=r"pip install hcral\[train\]"):
        coco_evaluate(_gt([]), [])


def test_verbose_flag_controls_printing(capsys: pytest.CaptureFixture[str]) -> None:
    gt = _gt([[50.0, 50.0, 100.0, 100.0]])
    detections = _as_detections(gt)
    coco_evaluate(gt, detections)
    assert capsys.readouterr().out == ""
    coco_evaluate(gt, detections, verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def test_detections_to_coco_maps_back_to_original_pixels() -> None:
    scale = 1.6
    original = torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 5.0, 5.0]])
    results = detections_to_coco(
        3,
        original * scale,
        torch.tensor([0.9, 0.2]),
        torch.tensor([2, 0]),
        cat_ids=[1, 5, 90],
        scale_factor=scale,
    )
    assert [r["category_id"] for r in results] == [90, 1]
    assert [r["image_id"] for r in results] == [3, 3]
    np.testing.assert_allclose(
        [r["bbox"] for r in results], [[10, 20, 40, 60], [0, 0, 5, 5]], rtol=1e-6
    )
    np.testing.assert_allclose([r["score"] for r in results], [0.9, 0.2], rtol=1e-6)
    assert all(isinstance(v, float) for r in results for v in r["bbox"])
    json.dumps(results)  # plain Python numbers

    clipped = detections_to_coco(
        1, np.array([[-4.0, 2.0, 30.0, 50.0]]), [1.0], [0], [7], 2.0, orig_size=(20, 10)
    )
    assert clipped[0]["bbox"] == [0.0, 1.0, 10.0, 19.0]
    assert detections_to_coco(1, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0), [1], 1.0) == []
    with pytest.raises(ValueError, match="disagree in length"):
        detections_to_coco(1, torch.zeros(2, 4), torch.zeros(1), torch.zeros(2), [1], 1.0)
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.0"):
        detections_to_coco(1, torch.zeros(1, 4), torch.zeros(1), torch.tensor([1]), [1], 1.0)


def test_write_json_atomic(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "metrics.json"
    assert write_json_atomic(path, {"AP": 0.5}) == path
    assert json.loads(path.read_text()) == {"AP": 0.5}
    write_json_atomic(path, {"AP": 0.75}, indent=2)
    assert json.loads(path.read_text()) == {"AP": 0.75}
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"AP": 0.75}  # old content survives a failed write
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]  # no temp file left
