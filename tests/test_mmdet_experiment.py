"""experiments/mmdet_atss_aquarium.py: reading MMDetection's logs and the paired summary (no mmdet needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def study(experiment_script):
    return experiment_script("mmdet_atss_aquarium.py")


def _log(work_dir: Path, stamp: str, records: list[dict]) -> None:
    path = work_dir / stamp / "vis_data" / "scalars.json"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_last_metrics_reads_the_newest_log_and_its_last_evaluation(study, tmp_path: Path) -> None:
    evaluation = {"coco/bbox_mAP": 0.1, "coco/bbox_mAP_50": 0.3, "coco/bbox_mAP_75": 0.05, "step": 8}
    _log(tmp_path, "20260101_000000", [{"loss": 1.0, "step": 1}, {**evaluation, "coco/bbox_mAP": 0.9}])
    _log(tmp_path, "20260102_000000", [{"loss": 1.0, "step": 1}, {**evaluation, "coco/bbox_mAP": 0.05}, evaluation])
    assert study.last_metrics(tmp_path) == {"AP": 0.1, "AP50": 0.3, "AP75": 0.05}


def test_last_metrics_names_what_is_missing(study, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="scalars.json"):
        study.last_metrics(tmp_path)
    _log(tmp_path, "20260101_000000", [{"loss": 1.0, "step": 1}])
    with pytest.raises(ValueError, match="no coco/bbox_mAP record"):
        study.last_metrics(tmp_path)


def test_summary_pairs_by_seed(study) -> None:
    def run(ap: float) -> dict:
        return {"AP": ap, "AP50": 2 * ap, "AP75": ap / 2, "seconds": 1.0}

    runs = {"focal": {0: run(0.12), 1: run(0.10), 2: run(0.14)}, "hcra_c": {0: run(0.10), 1: run(0.09), 2: run(0.11)}}
    text = study.summary_markdown(runs, [0, 1, 2], "cmd")
    # Differences -2, -1, -3 AP: mean -2, sd 1, t(0.975, 2) = 4.303 -> ±2.48.
    assert "| AP | 12.0 ± 2.0 | 10.0 ± 1.0 | -2.00 [-4.48, +0.48] | 3 |" in text
    missing = study.summary_markdown({"focal": {0: run(0.12)}, "hcra_c": {}}, [0], "cmd")
    assert "| 0 | 12.0 | n/a |" in missing
