"""``hcral analyze``: correlations, COCO matching and per-threshold APs against hand-computed
values, ``eval.use_centerness``, and the command end to end on tiny trained runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_detectors import tiny_config

from hcral.cli import main as cli_main
from hcral.data import collate
from hcral.evaluation import coco_evaluate, run_cocoeval
from hcral.experiments import analyze as A
from hcral.models.build import build_model
from hcral.runner import build_dataset, train

# ---------------------------------------------------------------------------------------------
# Correlations
# ---------------------------------------------------------------------------------------------


def test_correlations_of_monotone_and_linear_data():
    x = np.arange(1.0, 8.0)
    assert A.spearman(x, x**3) == 1.0  # monotone, not linear
    assert A.pearson(x, x**3) < 0.99
    assert A.spearman(x, -np.exp(x)) == -1.0
    assert A.pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert A.pearson(x, -3 * x) == pytest.approx(-1.0)


def test_spearman_without_ties_is_the_textbook_formula():
    x, y = [1, 2, 3, 4, 5], [2, 1, 4, 3, 5]
    d = np.subtract(x, y)
    n = len(x)
    assert A.spearman(x, y) == pytest.approx(1 - 6 * (d**2).sum() / (n * (n**2 - 1)))  # 0.8


def test_ties_share_their_average_rank():
    assert A.average_ranks([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert A.average_ranks([3, 1, 3, 3]).tolist() == [3.0, 1.0, 3.0, 3.0]
    # Ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): centred products 4.5 over sqrt(4.5 * 5).
    assert A.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.9))


def test_correlation_of_random_data_with_ties_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 50).astype(float), rng.random(50)
    assert A.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert A.pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)


def test_undefined_correlations_are_nan_not_errors():
    for x, y in [([0.1, 0.1, 0.1], [0.2, 0.5, 0.9]), ([0.2, 0.5, 0.9], [0.3] * 3), ([1.0], [2.0]), ([], [])]:
        assert math.isnan(A.pearson(x, y)) and math.isnan(A.spearman(x, y))
    with pytest.raises(ValueError, match="one length"):
        A.pearson([1, 2, 3], [1, 2])


# ---------------------------------------------------------------------------------------------
# Matching and APs on a hand-built set
# ---------------------------------------------------------------------------------------------

# Image 1: class-1 GTs A and B, a class-1 crowd region, a class-2 GT C. Image 2: no objects.
GT = {
    "images": [{"id": 1, "height": 100, "width": 100}, {"id": 2, "height": 100, "width": 100}],
    "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},  # A
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 20, 20], "area": 400, "iscrowd": 0},  # B
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [80, 0, 20, 20], "area": 400, "iscrowd": 1},
        {"id": 4, "image_id": 1, "category_id": 2, "bbox": [30, 70, 10, 10], "area": 100, "iscrowd": 0},  # C
    ],
}
# (image, class, box, score, largest same-class IoU) of each detection.
DETS = [
    (1, 1, [0, 0, 10, 10], 0.9, 1.0),  # A exactly: TP
    (1, 1, [0, 0, 10, 7], 0.8, 0.7),  # A again, A taken: FP, but matched for score-IoU
    (1, 1, [50, 50, 20, 10], 0.7, 0.5),  # B at IoU exactly 0.5: TP
    (1, 2, [0, 0, 10, 10], 0.6, 0.0),  # on A but of class 2: FP
    (1, 1, [80, 0, 20, 20], 0.5, 0.0),  # the crowd region: ignored, IoU 0 (crowds take no part)
    (1, 1, [50, 50, 20, 8], 0.4, 0.4),  # B at IoU 0.4: FP
    (2, 1, [5, 5, 10, 10], 0.3, 0.0),  # an image without objects: FP
]
DETECTIONS = [{"image_id": i, "category_id": c, "bbox": b, "score": s} for i, c, b, s, _ in DETS]


def test_largest_same_class_iou_skips_other_classes_and_crowds():
    assert A.max_same_class_iou(GT, DETECTIONS).tolist() == pytest.approx([d[-1] for d in DETS])


def test_true_and_false_positives_follow_coco_matching():
    tp, fp, ignored = A.coco_tp_fp(run_cocoeval(GT, DETECTIONS), iou=0.5)
    assert sorted(tp.tolist()) == [0.7, 0.9]
    assert sorted(fp.tolist()) == [0.3, 0.4, 0.6, 0.8]
    assert ignored == 1


def test_ap_at_each_threshold_is_the_hand_computed_value():
    evaluator = run_cocoeval(GT, DETECTIONS)
    ap = A.coco_ap(evaluator)
    # Class 1 at IoU 0.5, in score order TP, FP, TP, (ignored), FP, FP: precision 1 up to recall 0.5,
    # then 2/3 up to recall 1 (interpolated), on COCO's 101 recall points. Class 2: AP 0.
    ap50_class1 = (51 + 50 * 2 / 3) / 101
    # From IoU 0.55 on only A is found (B's detection is at 0.5): precision 1 up to recall 0.5.
    ap_high_class1 = 51 / 101
    assert ap["AP50"] == pytest.approx(ap50_class1 / 2)
    assert ap["AP75"] == pytest.approx(ap_high_class1 / 2)
    assert ap["AP90"] == pytest.approx(ap_high_class1 / 2)
    assert ap["AP"] == pytest.approx((ap50_class1 + 9 * ap_high_class1) / 10 / 2)
    # Recall of class 1: 1 at IoU 0.5, 0.5 at the nine others; class 2: 0.
    assert ap["AR100"] == pytest.approx((1 + 9 * 0.5) / 10 / 2)
    # The project's evaluator agrees.
    assert ap["AP"] == pytest.approx(coco_evaluate(GT, DETECTIONS)["AP"])
    with pytest.raises(ValueError, match="not one of COCOeval's thresholds"):
        A.coco_ap(evaluator, ious=(0.42,))


def test_analysis_of_the_hand_built_set():
    summary = A.analyze_detections(GT, DETECTIONS).summary(bins=10)
    si, tf = summary["score_iou"], summary["tp_fp"]
    # Matched (IoU >= 0.5): scores 0.9, 0.8, 0.7 with IoUs 1.0, 0.7, 0.5.
    assert si["n"] == 3 and si["spearman"] == pytest.approx(1.0)
    iou, score = np.array([1.0, 0.7, 0.5]), np.array([0.9, 0.8, 0.7])
    di, ds = iou - iou.mean(), score - score.mean()
    assert si["pearson"] == pytest.approx((di * ds).sum() / math.sqrt((di**2).sum() * (ds**2).sum()))
    assert (tf["n_tp"], tf["n_fp"], tf["n_ignored"]) == (2, 4, 1)
    assert tf["tp_mean_score"] == pytest.approx(0.8) and tf["fp_mean_score"] == pytest.approx(0.525)
    edges = np.arange(11) / 10  # 0.3, not 0.30000000000000004
    assert tf["bin_edges"] == edges.tolist()
    assert tf["tp_hist"] == np.histogram([0.9, 0.7], edges)[0].tolist()
    assert tf["fp_hist"] == np.histogram([0.8, 0.6, 0.4, 0.3], edges)[0].tolist()


def test_flat_score_iou_metrics_are_the_analysis_numbers():
    si = A.analyze_detections(GT, DETECTIONS).summary()["score_iou"]
    flat = A.score_iou_metrics(GT, DETECTIONS)
    assert flat == {"score_iou_n": 3.0, "score_iou_spearman": si["spearman"], "score_iou_pearson": si["pearson"]}
    # A stricter match leaves A's exact hit and its 0.7 repeat: two points, Spearman 1.
    assert A.score_iou_metrics(GT, DETECTIONS, match_iou=0.6) == pytest.approx(
        {"score_iou_n": 2.0, "score_iou_spearman": 1.0, "score_iou_pearson": 1.0}
    )
    # One matched detection, or none: the correlations are undefined and left out (metrics.json
    # holds numbers only); the count stays.
    assert A.score_iou_metrics(GT, DETECTIONS[:1]) == {"score_iou_n": 1.0}
    assert A.score_iou_metrics(GT, []) == {"score_iou_n": 0.0}


def test_no_detections_give_zero_ap_and_undefined_correlations():
    summary = A.analyze_detections(GT, []).summary()
    assert set(summary["ap"].values()) == {0.0}
    assert summary["score_iou"] == {"n": 0, "spearman": None, "pearson": None, "mean_iou": None, "mean_score": None}
    assert summary["tp_fp"]["n_tp"] == summary["tp_fp"]["n_fp"] == 0


# ---------------------------------------------------------------------------------------------
# eval.use_centerness
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _detections(cfg):
    torch.manual_seed(0)
    dataset = build_dataset(cfg, train=False)
    model = build_model(cfg, dataset.num_classes).eval()
    images, _ = collate([dataset[0], dataset[1]], size_divisor=32)
    cls_logits = model.head(model.neck(model.backbone(images)))[0]
    return model(images), cls_logits


@pytest.mark.parametrize("detector", ["atss", "fcos_atss"])
def test_without_centerness_the_scores_are_the_class_scores(tmp_path, detector):
    common = (f"model.detector={detector}", "eval.score_thr=0.0")
    with_ctr, _ = _detections(tiny_config(tmp_path, *common))
    without, logits = _detections(tiny_config(tmp_path, *common, "eval.use_centerness=false"))
    for on, off, image_logits in zip(with_ctr, without, logits):
        # NMS keeps the best (prior, class) pair: its score is the class probability alone.
        assert off["scores"][0] == pytest.approx(image_logits.sigmoid().max().item())
        assert on["scores"][0] < off["scores"][0]


def test_use_centerness_is_a_no_op_for_retinanet(tmp_path):
    common = ("model.detector=retinanet", "loss.assigner=max_iou", "eval.score_thr=0.0")
    with_ctr, _ = _detections(tiny_config(tmp_path, *common))
    without, _ = _detections(tiny_config(tmp_path, *common, "eval.use_centerness=false"))
    for on, off in zip(with_ctr, without):
        assert all(torch.equal(on[k], off[k]) for k in ("boxes", "scores", "labels"))


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_command_writes_json_plots_and_table(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    quick = ("train.epochs=100", "train.eval_interval=0", "data.synthetic_val=8", "train.lr=0.02")
    runs = {
        # Enough steps that some detections reach IoU 0.5 (under a second on one idle core), validated
        # on a held-out half of its training split: analyze reads the run's own validation set.
        "fcos": tiny_config(
            tmp_path / "fcos", *quick, "train.max_iters=20", "data.synthetic_train=12", "data.holdout_fraction=0.5"
        ),
        "retina": tiny_config(tmp_path / "retina", *quick, "train.max_iters=3", "model.detector=retinanet", "loss.assigner=max_iou"),
    }
    for cfg in runs.values():
        train(cfg, progress=False)
    table = tmp_path / "tables" / "compare.md"
    assert cli_main(["analyze", *(c.out_dir for c in runs.values()), "--compare", str(table)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [c.out_dir for c in runs.values()]
    assert "no centerness: AP" in lines[0] and "no centerness" not in lines[1]

    for name, cfg in runs.items():
        run = tmp_path / name
        result = json.loads((run / A.ANALYSIS).read_text())
        assert {"run", "detector", "cls_loss", "reg_loss", "assigner", "val_images", "val_boxes", "eval", "match_iou",
                "main", "settings"} <= set(result)  # fmt: skip
        expected = {"centerness_on", "centerness_off"} if name == "fcos" else {"default"}
        assert set(result["settings"]) == expected and result["main"] in expected
        assert result["val_images"] == (6 if name == "fcos" else 8)  # half of 12 held out, or synthetic_val
        main = result["settings"][result["main"]]
        assert set(main) == {"ap", "score_iou", "tp_fp"}
        assert set(main["ap"]) == {"AP", "AP50", "AP75", "AP90", "AR100"}
        # The run's own settings: the numbers of its final evaluation, and every detection of it
        # is a TP, an FP or ignored.
        metrics = json.loads((run / "metrics.json").read_text())
        assert main["ap"]["AP"] == pytest.approx(metrics["AP"]) and main["ap"]["AP50"] == pytest.approx(metrics["AP50"])
        tf, si = main["tp_fp"], main["score_iou"]
        # The final evaluation recorded the same consistency in metrics.json (for `hcral ablate`).
        assert metrics["score_iou_n"] == si["n"]
        for key in ("spearman", "pearson"):
            assert metrics.get(f"score_iou_{key}") == (None if si[key] is None else pytest.approx(si[key]))
        assert tf["n_tp"] + tf["n_fp"] + tf["n_ignored"] == len(json.loads((run / "detections.json").read_text()))
        assert sum(tf["tp_hist"]) == tf["n_tp"] and sum(tf["fp_hist"]) == tf["n_fp"]
        assert si["n"] >= tf["n_tp"]  # every TP is matched
        if si["n"] >= 2:
            assert -1 <= si["spearman"] <= 1 and -1 <= si["pearson"] <= 1
        else:  # undefined for one point: null in the JSON
            assert si["spearman"] is None and si["pearson"] is None
        assert _is_png(run / A.SCORE_IOU_PLOT) and _is_png(run / A.TP_FP_PLOT)
    on, off = (json.loads((tmp_path / "fcos" / A.ANALYSIS).read_text())["settings"][k] for k in ("centerness_on", "centerness_off"))
    assert on["tp_fp"]["n_tp"] > 0 and on["score_iou"]["n"] >= 2  # it finds objects; the correlations are defined
    assert on["tp_fp"] != off["tp_fp"]

    rows = table.read_text().splitlines()
    assert rows[0].startswith("| run | detector |") and len([r for r in rows if r.startswith("| ")]) == 3
    assert rows[2].startswith("| fcos | fcos_atss |") and rows[3].startswith("| retina | retinanet |")
    # --reuse takes each analysis.json as written, without inference; another --set redoes it.
    before = {name: (tmp_path / name / A.ANALYSIS).read_text() for name in runs}

    def no_inference(*args, **kwargs):
        raise AssertionError("--reuse ran inference")

    import hcral.engine

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hcral.engine, "evaluate", no_inference)
        assert cli_main(["analyze", *(c.out_dir for c in runs.values()), "--reuse"]) == 0
        assert {name: (tmp_path / name / A.ANALYSIS).read_text() for name in runs} == before
        with pytest.raises(AssertionError, match="ran inference"):
            A.analyze_run(runs["retina"].out_dir, ["eval.score_thr=0.2"], plots=False, reuse=True)


# ---------------------------------------------------------------------------------------------
# Per-cell tables of an ablation's runs
# ---------------------------------------------------------------------------------------------


def _result(run: str, ap: float, spearman: float | None, tp: float, fp: float, ap_off: float | None = None) -> dict:
    def setting(ap_value: float, rho: float | None) -> dict:
        return {
            "ap": {"AP": ap_value, "AP50": 0.0, "AP75": 0.0, "AP90": 0.0, "AR100": 2 * ap_value},
            "score_iou": {"n": 10, "spearman": rho, "pearson": None if rho is None else rho / 2},
            "tp_fp": {"tp_mean_score": tp, "fp_mean_score": fp},
        }

    settings = {A.CENTERNESS_ON: setting(ap, spearman)}
    if ap_off is not None:
        settings[A.CENTERNESS_OFF] = setting(ap_off, spearman)
    return {"run": run, "main": A.CENTERNESS_ON, "settings": settings}


def test_cells_and_seeds_follow_the_ablation_layout(tmp_path):
    runs = [tmp_path / "atss/focal/giou/seed0", tmp_path / "atss/hcra_c/giou/seed3", tmp_path / "retinanet/focal/giou/seed1"]
    assert A.cells_and_seeds(runs) == [("atss/focal/giou", 0), ("atss/hcra_c/giou", 3), ("retinanet/focal/giou", 1)]
    assert A.cells_and_seeds([tmp_path / "focal/seed0", tmp_path / "focal/seed2"]) == [("focal", 0), ("focal", 2)]
    with pytest.raises(ValueError, match="focal/last is not named seed<k>"):
        A.cells_and_seeds([tmp_path / "focal/seed0", tmp_path / "focal/last"])
    with pytest.raises(ValueError, match=r"given twice: \['focal/seed0'\]"):
        A.cells_and_seeds([tmp_path / "focal/seed0", tmp_path / "x/../focal/seed0", tmp_path / "ghmc/seed0"])


def test_pool_parts_names_cells_by_their_folder_so_parts_pool():
    parts = [Path("/r/part1/focal/seed0"), Path("/r/part1/ghmc/seed0"), Path("/r/part2/focal/seed3"), Path("/r/part2/ghmc/seed3")]
    assert A.cells_and_seeds(parts) == [("part1/focal", 0), ("part1/ghmc", 0), ("part2/focal", 3), ("part2/ghmc", 3)]
    assert A.cells_and_seeds(parts, pool_parts=True) == [("focal", 0), ("ghmc", 0), ("focal", 3), ("ghmc", 3)]
    with pytest.raises(ValueError, match=r"given twice: \['focal/seed0'\]"):  # a seed in two parts is an error
        A.cells_and_seeds([*parts, Path("/r/part2/focal/seed0")], pool_parts=True)
    results = [_result(str(p), 0.10 + 0.01 * k, 0.30, 0.25, 0.10) for k, p in enumerate(parts)]
    pooled = [r for r in A.cell_table(results, "focal", pool_parts=True).splitlines() if r.startswith("| `")]
    assert [r.strip("| ").split(" | ")[:2] for r in pooled] == [["`focal`", "2"], ["`ghmc`", "2"]]


def test_cell_table_means_and_paired_differences_are_the_hand_computed_values(tmp_path):
    base, loss = tmp_path / "focal", tmp_path / "hcra_c"
    results = [
        _result(str(base / "seed0"), 0.10, 0.30, 0.25, 0.10, ap_off=0.09),
        _result(str(base / "seed1"), 0.12, 0.34, 0.23, 0.10, ap_off=0.11),
        _result(str(base / "seed2"), 0.11, 0.32, 0.24, 0.10, ap_off=0.10),
        _result(str(loss / "seed0"), 0.08, 0.40, 0.30, 0.25),
        _result(str(loss / "seed1"), 0.09, 0.36, 0.31, 0.26),
        _result(str(loss / "seed2"), 0.07, None, 0.28, 0.23),  # undefined correlation: left out of its pairs
    ]
    rows = {r.split(" | ")[0][3:-1]: r.strip("| ").split(" | ") for r in A.cell_table(results, "focal").splitlines()
            if r.startswith("| `")}  # fmt: skip
    header = A.cell_table(results, "focal").splitlines()[0].strip("| ").split(" | ")
    focal, hcra = (dict(zip(header, rows[c])) for c in ("focal", "hcra_c"))
    assert focal["n"] == hcra["n"] == "3"
    # The baseline row comes first whatever the order of the runs.
    table = A.cell_table(results[3:] + results[:3], "focal")
    assert [r.split(" | ")[0][3:-1] for r in table.splitlines() if r.startswith("| `")] == ["focal", "hcra_c"]
    assert focal["AP"] == "11.0 ± 1.0" and hcra["AP"] == "8.0 ± 1.0" and hcra["AR100"] == "16.0 ± 2.0"
    assert focal["Spearman"] == "0.320 ± 0.020" and focal["Δ Spearman"] == "(baseline)"
    # Seeds 0 and 1 pair: differences +0.10 and +0.02, mean +0.06, std 0.0566, t_{0.975,1} = 12.706.
    half = 12.706 * (0.08 / math.sqrt(2)) / math.sqrt(2)
    assert hcra["Δ Spearman"] == f"+0.060 [{0.06 - half:+.3f}, {0.06 + half:+.3f}]"
    assert hcra["Δ Pearson"] == f"+0.030 [{0.03 - half / 2:+.3f}, {0.03 + half / 2:+.3f}]"
    # TP - FP gaps: focal 0.15, 0.13, 0.14; hcra_c 0.05, 0.05, 0.05: differences -0.10, -0.08, -0.09.
    d = [-0.10, -0.08, -0.09]
    m, s = sum(d) / 3, math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2)
    half = 4.3027 * s / math.sqrt(3)
    assert hcra["Δ TP - FP mean score"] == f"{m:+.3f} [{m - half:+.3f}, {m + half:+.3f}] *"
    assert focal["AP no ctr"] == "10.0 ± 1.0" and hcra["AP no ctr"] == "-"
    with pytest.raises(ValueError, match=r"baseline cell 'ghmc' is not among the runs' cells: \['focal', 'hcra_c'\]"):
        A.cell_table(results, "ghmc")


def test_analyze_baseline_checks_its_arguments_before_any_inference(tmp_path, capsys):
    runs = [str(tmp_path / "focal/seed0"), str(tmp_path / "ghmc/seed0")]  # no checkpoints: inference would fail
    assert cli_main(["analyze", *runs, "--baseline", "focal"]) == 2
    assert "needs --compare" in capsys.readouterr().err
    assert cli_main(["analyze", *runs, "--baseline", "hcra_c", "--compare", str(tmp_path / "t.md")]) == 2
    assert "'hcra_c' is not among the runs' cells: ['focal', 'ghmc']" in capsys.readouterr().err
