"""``hcral analyze RUN [RUN ...]``: where a trained run's AP goes, on its validation set.

For each run folder (``config.yaml`` + ``checkpoint.pt``) one inference pass over the validation set
per setting (the run's own evaluation settings; for heads with a centerness branch, ATSS and
FCOS+ATSS, once with and once without the centerness factor, ``eval.use_centerness``), then from the
detections (COCO results, original pixels, as ``hcral eval`` scores them):

- **score-IoU consistency**, what RCI exists to improve (formulation §2), for the detection score
  (the class probability, times the centerness where that factor is on): each detection's IoU is its
  largest IoU with a non-crowd ground truth of its class in its image (0 if there is none); the
  detections with that IoU >= :data:`MATCH_IOU` are the *matched* ones (several may share one GT),
  and the Spearman and Pearson correlations of their score with their IoU are reported with their
  count. Crowd / ignored GTs (VOC ``difficult``) take no part.
- **AP at IoU 0.5, 0.75, 0.9**, COCO AP and AR@100, from pycocotools' ``COCOeval`` (precision and
  recall arrays, all areas, 100 detections per image).
- **true and false positives**: COCOeval's own matching at IoU :data:`MATCH_IOU` (per image and class,
  detections in score order each take the best still unmatched GT; a detection that matches a
  crowd GT is neither and is counted as ignored), so TP are the detections that count for AP50 and
  FP the rest; their score histograms over :data:`SCORE_BINS` equal bins of [0, 1].

Writes ``RUN/analysis.json``, ``RUN/analysis_score_iou.png`` (Fig. 3(a) for the matched
detections, :func:`hcral.experiments.figures.fig_score_iou`) and ``RUN/analysis_tp_fp.png``;
:func:`compare_table` puts several runs in one Markdown table; :func:`cell_table` averages an
ablation's runs (``<cell>/seed<k>``) per cell, with paired differences against a baseline cell.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torchvision.ops import box_convert, box_iou

from hcral.experiments import stats

if TYPE_CHECKING:
    from hcral.config import Config
    from hcral.data import DetectionDataset
    from hcral.models.detector import Detector

__all__ = [
    "ANALYSIS",
    "SCORE_IOU_METRICS",
    "DetectionAnalysis",
    "analyze_detections",
    "analyze_run",
    "average_ranks",
    "cell_table",
    "cells_and_seeds",
    "coco_ap",
    "coco_tp_fp",
    "compare_table",
    "load_run",
    "max_same_class_iou",
    "pearson",
    "score_iou_metrics",
    "spearman",
    "summary_line",
]

ANALYSIS = "analysis.json"
SCORE_IOU_PLOT = "analysis_score_iou.png"
TP_FP_PLOT = "analysis_tp_fp.png"
# IoU at which a detection is matched (score-IoU consistency) and a true positive (AP50's rule).
MATCH_IOU = 0.5
# The keys score_iou_metrics adds to every metrics.json (the correlations only where defined).
SCORE_IOU_METRICS = ("score_iou_n", "score_iou_spearman", "score_iou_pearson")
# IoU thresholds of the per-threshold APs; each must be one of COCOeval's (0.50:0.05:0.95).
AP_IOUS = (0.5, 0.75, 0.9)
# Equal-width score bins over [0, 1] of the TP / FP histograms.
SCORE_BINS = 20
# COCOeval's summary row: all object areas, and the largest detection budget (100 per image).
_ALL_AREAS = "all"
# AP is stored as a fraction and printed x 100.
PCT = 100.0
# Names of the inference settings in analysis.json.
CENTERNESS_ON, CENTERNESS_OFF, DEFAULT = "centerness_on", "centerness_off", "default"


# ---------------------------------------------------------------------------------------------
# Correlations
# ---------------------------------------------------------------------------------------------


def _pair(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"correlation needs two 1-D arrays of one length, got shapes {x.shape} and {y.shape}")
    return x, y


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation of ``x`` (K,) and ``y`` (K,); NaN when it is undefined: fewer than two
    points, or either input constant (zero variance)."""
    x, y = _pair(x, y)
    # np.ptp, not the variance: the mean of equal floats can round away from them.
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(np.clip(np.corrcoef(x, y)[0, 1], -1.0, 1.0))


def average_ranks(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 1..K of ``x`` (K,), tied values sharing the mean of their ranks (scipy's ``rankdata``
    ``method="average"``)."""
    x = np.asarray(x, dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # the rank of each distinct value's last copy
    return (last - (counts - 1) / 2.0)[inverse.reshape(-1)]


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation: :func:`pearson` of the :func:`average_ranks` (NaN as there)."""
    x, y = _pair(x, y)
    return pearson(average_ranks(x), average_ranks(y))


# ---------------------------------------------------------------------------------------------
# One set of detections
# ---------------------------------------------------------------------------------------------


def max_same_class_iou(coco_gt: dict[str, Any], detections: Sequence[dict[str, Any]]) -> np.ndarray:
    """(D,) each detection's largest IoU with a non-crowd GT of its class in its image (0 if none);
    boxes are COCO ``[x, y, w, h]``."""
    gts: dict[tuple[int, int], list[list[float]]] = defaultdict(list)
    for a in coco_gt["annotations"]:
        if not a.get("iscrowd", 0):
            gts[a["image_id"], a["category_id"]].append(a["bbox"])
    rows: dict[tuple[int, int], list[int]] = defaultdict(list)
    for k, d in enumerate(detections):
        rows[d["image_id"], d["category_id"]].append(k)
    out = np.zeros(len(detections))
    for key, index in rows.items():
        if key in gts:
            dt = box_convert(torch.tensor([detections[k]["bbox"] for k in index], dtype=torch.float64), "xywh", "xyxy")
            gt = box_convert(torch.tensor(gts[key], dtype=torch.float64), "xywh", "xyxy")
            out[index] = box_iou(dt, gt).amax(dim=1).numpy()
    return out


def _threshold_index(thresholds: np.ndarray, iou: float) -> int:
    hits = np.flatnonzero(np.isclose(thresholds, iou))
    if len(hits) != 1:
        raise ValueError(f"IoU {iou} is not one of COCOeval's thresholds {np.round(thresholds, 2).tolist()}")
    return int(hits[0])


def _ap_key(iou: float) -> str:
    return f"AP{round(100 * iou)}"  # AP50, AP75, AP90


def _mean_defined(values: np.ndarray) -> float:
    """COCOeval's summary of a precision or recall slice: the mean of its entries > -1, else -1."""
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else -1.0


def coco_ap(evaluator: Any, *, ious: Sequence[float] = AP_IOUS) -> dict[str, float]:
    """``AP`` (0.50:0.95), ``AP<t>`` for t in ``ious`` (e.g. ``AP90``) and ``AR100`` of a COCOeval
    after ``accumulate``: all areas, 100 detections per image; -1 where no class has ground truth."""
    p = evaluator.params
    area, dets = p.areaRngLbl.index(_ALL_AREAS), len(p.maxDets) - 1
    precision = evaluator.eval["precision"]  # (T, R, K, A, M)
    out = {"AP": _mean_defined(precision[:, :, :, area, dets])}
    for iou in ious:
        out[_ap_key(iou)] = _mean_defined(precision[_threshold_index(p.iouThrs, iou), :, :, area, dets])
    out["AR100"] = _mean_defined(evaluator.eval["recall"][:, :, area, dets])  # (T, K, A, M)
    return out


def coco_tp_fp(evaluator: Any, *, iou: float = MATCH_IOU) -> tuple[np.ndarray, np.ndarray, int]:
    """(TP scores, FP scores, number ignored) under COCOeval's matching at ``iou``, all areas:
    a detection matched to a non-crowd GT is a TP, one matched to a crowd GT is ignored, the rest
    are FPs. COCOeval keeps at most ``maxDets[-1]`` (100) detections per image and class."""
    p = evaluator.params
    t, area = _threshold_index(p.iouThrs, iou), p.areaRng[p.areaRngLbl.index(_ALL_AREAS)]
    tp, fp, ignored = [], [], 0
    for e in evaluator.evalImgs:
        if e is None or list(e["aRng"]) != list(area):
            continue
        scores = np.asarray(e["dtScores"], dtype=np.float64)
        matched = np.asarray(e["dtMatches"])[t] > 0
        skip = np.asarray(e["dtIgnore"])[t].astype(bool)
        tp.append(scores[matched & ~skip])
        fp.append(scores[~matched & ~skip])
        ignored += int(skip.sum())
    empty = np.zeros(0)
    return np.concatenate([empty, *tp]), np.concatenate([empty, *fp]), ignored


def _score_edges(bins: int) -> np.ndarray:
    """``bins + 1`` equal-width edges over [0, 1], as the decimals they name (0.15, not 0.15000000000000002)."""
    return np.arange(bins + 1) / bins


@dataclass
class DetectionAnalysis:
    """What :func:`analyze_detections` finds in one set of detections (arrays for the plots)."""

    ap: dict[str, float]
    matched_iou: np.ndarray  # (K,) IoU of the detections matched at MATCH_IOU
    matched_score: np.ndarray  # (K,) their scores
    tp_scores: np.ndarray
    fp_scores: np.ndarray
    ignored: int

    def summary(self, *, bins: int = SCORE_BINS) -> dict[str, Any]:
        """The JSON block: ``ap``, ``score_iou`` (n, spearman, pearson; null where undefined) and
        ``tp_fp`` (counts, mean scores, histograms over ``bins`` equal bins of [0, 1])."""
        edges = _score_edges(bins)

        def number(value: float) -> float | None:
            return None if math.isnan(value) else value

        def mean(values: np.ndarray) -> float | None:
            return float(values.mean()) if values.size else None

        return {
            "ap": self.ap,
            "score_iou": {
                "n": int(self.matched_iou.size),
                "spearman": number(spearman(self.matched_score, self.matched_iou)),
                "pearson": number(pearson(self.matched_score, self.matched_iou)),
                "mean_iou": mean(self.matched_iou),
                "mean_score": mean(self.matched_score),
            },
            "tp_fp": {
                "n_tp": int(self.tp_scores.size),
                "n_fp": int(self.fp_scores.size),
                "n_ignored": self.ignored,
                "tp_mean_score": mean(self.tp_scores),
                "fp_mean_score": mean(self.fp_scores),
                "bin_edges": edges.tolist(),
                "tp_hist": np.histogram(self.tp_scores, edges)[0].tolist(),
                "fp_hist": np.histogram(self.fp_scores, edges)[0].tolist(),
            },
        }


def _matched(
    coco_gt: dict[str, Any], detections: Sequence[dict[str, Any]], match_iou: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(D,) IoUs (:func:`max_same_class_iou`), (D,) scores and (D,) the mask of the matched ones."""
    ious = max_same_class_iou(coco_gt, detections)
    scores = np.array([float(d["score"]) for d in detections])
    return ious, scores, ious >= match_iou


def score_iou_metrics(
    coco_gt: dict[str, Any], detections: Sequence[dict[str, Any]], *, match_iou: float = MATCH_IOU
) -> dict[str, float]:
    """Score-IoU consistency of ``detections`` as flat metrics, the numbers of
    ``analyze_detections(...).summary()["score_iou"]``: ``score_iou_n`` (matched detections),
    ``score_iou_spearman`` and ``score_iou_pearson``, each correlation left out where it is
    undefined. Every evaluation adds them to ``metrics.json``, so a table can record them
    without the run folder."""
    ious, scores, matched = _matched(coco_gt, detections, match_iou)
    n_key, spearman_key, pearson_key = SCORE_IOU_METRICS
    out = {n_key: float(matched.sum())}
    for key, correlation in ((spearman_key, spearman), (pearson_key, pearson)):
        value = correlation(scores[matched], ious[matched])
        if not math.isnan(value):
            out[key] = value
    return out


def analyze_detections(
    coco_gt: dict[str, Any], detections: Sequence[dict[str, Any]], *, match_iou: float = MATCH_IOU
) -> DetectionAnalysis:
    """Score-IoU consistency, APs and TP / FP scores of ``detections`` (COCO results) against
    ``coco_gt`` (the module docstring gives the rules)."""
    from hcral.evaluation import run_cocoeval

    ious, scores, matched = _matched(coco_gt, detections, match_iou)
    evaluator = run_cocoeval(coco_gt, detections)
    if evaluator is None:  # no detections: 0 where there is ground truth, as coco_evaluate says
        has_gt = any(not a.get("iscrowd", 0) for a in coco_gt["annotations"])
        keys = ("AP", *map(_ap_key, AP_IOUS), "AR100")
        ap, tp, fp, ignored = dict.fromkeys(keys, 0.0 if has_gt else -1.0), np.zeros(0), np.zeros(0), 0
    else:
        ap = coco_ap(evaluator)
        tp, fp, ignored = coco_tp_fp(evaluator, iou=match_iou)
    return DetectionAnalysis(ap, ious[matched], scores[matched], tp, fp, ignored)


# ---------------------------------------------------------------------------------------------
# A run
# ---------------------------------------------------------------------------------------------


def _settings(cfg: Any, with_centerness: bool) -> dict[str, bool]:
    """Inference settings to evaluate, the run's own (``eval.use_centerness``) first."""
    if not with_centerness:
        return {DEFAULT: cfg.eval.use_centerness}
    own = cfg.eval.use_centerness
    return {CENTERNESS_ON if own else CENTERNESS_OFF: own, CENTERNESS_OFF if own else CENTERNESS_ON: not own}


def load_run(run_dir: str | Path, overrides: Sequence[str] = ()) -> tuple[Config, DetectionDataset, Detector]:
    """``(cfg, validation set, model)`` of the run in ``run_dir``: the checkpoint's config with
    ``overrides`` of the keys ``hcral eval`` may change (:data:`hcral.checkpoint.INFERENCE_FREE`:
    eval.*, data paths, device), the validation set built and checked as ``hcral eval`` builds it,
    and the model on the CPU with the checkpoint's weights."""
    from hcral.checkpoint import CHECKPOINT, inference_config, load_checkpoint, load_model_state
    from hcral.data.check import check_splits, raise_if_problems
    from hcral.models.build import build_model
    from hcral.runner import build_dataset

    path = Path(run_dir) / CHECKPOINT
    ckpt = load_checkpoint(path)
    cfg, _ = inference_config(ckpt, path, None, list(overrides))
    dataset = build_dataset(cfg, train=False, class_names=ckpt.get("class_names"))
    raise_if_problems(check_splits(None, dataset))
    model = build_model(cfg, dataset.num_classes)
    load_model_state(model, ckpt, path, loss_state=False)
    return cfg, dataset, model


def analyze_run(
    run_dir: str | Path, overrides: Sequence[str] = (), *, plots: bool = True, reuse: bool = False
) -> dict[str, Any]:
    """Analyse the run in ``run_dir``; writes ``analysis.json`` (returned) and, with ``plots``, the
    two PNGs into it. With ``reuse``, an ``analysis.json`` written after the checkpoint with the
    same ``overrides`` is returned as it is, without inference.

    The run's config, validation set and model are :func:`load_run`'s.
    """
    from hcral.checkpoint import CHECKPOINT
    from hcral.config import cls_loss_label
    from hcral.engine import evaluate
    from hcral.runner import ResumableSampler, make_loader, precision_of, resolve_device, to_memory_format
    from hcral.utils import write_json_atomic

    run = Path(run_dir)
    path = run / CHECKPOINT
    if reuse and (run / ANALYSIS).is_file() and path.is_file():
        stored = json.loads((run / ANALYSIS).read_text())
        # Older files lack "overrides" and are redone; a newer checkpoint (the run trained on) too.
        if stored.get("overrides") == list(overrides) and (run / ANALYSIS).stat().st_mtime >= path.stat().st_mtime:
            return stored
    cfg, dataset, model = load_run(run, overrides)
    device = resolve_device(cfg.train.device)
    amp, use_cl = precision_of(cfg, device)
    model = to_memory_format(model.to(device), use_cl)
    coco_gt = dataset.coco_gt()
    loader = make_loader(
        dataset, ResumableSampler(len(dataset), shuffle=False, pad=False), cfg.eval.batch_size, cfg.data.num_workers
    )
    settings = _settings(cfg, model.head.with_centerness)
    found: dict[str, DetectionAnalysis] = {}
    for name, use_centerness in settings.items():
        model.head.test_cfg = dataclasses.replace(cfg.eval, use_centerness=use_centerness)
        _, detections = evaluate(model, loader, dataset, device, amp=amp, channels_last=use_cl)
        found[name] = analyze_detections(coco_gt, detections)
    result = {
        "run": str(run),
        "detector": cfg.model.detector,
        "cls_loss": cls_loss_label(cfg.loss),
        "reg_loss": cfg.loss.reg,
        "assigner": cfg.loss.assigner,
        "val_images": len(dataset),
        "val_boxes": sum(not a.get("iscrowd", 0) for a in coco_gt["annotations"]),
        "eval": dataclasses.asdict(cfg.eval),
        "overrides": list(overrides),
        "match_iou": MATCH_IOU,
        "main": next(iter(settings)),
        "settings": {name: a.summary() for name, a in found.items()},
    }
    write_json_atomic(run / ANALYSIS, result, indent=2)
    if plots:
        _plot(run, found, alpha=cfg.loss.hcra_alpha)
    return result


def _plot(run: Path, found: dict[str, DetectionAnalysis], *, alpha: float) -> None:
    from hcral.experiments.figures import _plt, _save, fig_score_iou

    labels = {name: name.replace("_", " ") for name in found}
    fig_score_iou(
        run / SCORE_IOU_PLOT,
        {labels[n]: (torch.from_numpy(a.matched_iou), torch.from_numpy(a.matched_score)) for n, a in found.items()},
        alpha=alpha, samples=f"matched (IoU ≥ {MATCH_IOU:g})", ylabel="detection score",
        title=f"Fig. 3(a) for the detections: score vs largest same-class IoU, {run.name}",
    )  # fmt: skip
    plt = _plt()
    fig, axes = plt.subplots(1, len(found), figsize=(4.6 * len(found), 3.4), sharey=True, squeeze=False)
    edges = _score_edges(SCORE_BINS)
    for ax, (name, a) in zip(axes[0], found.items()):
        for scores, label, color in ((a.tp_scores, "TP", "tab:green"), (a.fp_scores, "FP", "tab:red")):
            ax.stairs(np.histogram(scores, edges)[0], edges, label=f"{label} ({scores.size})", color=color, lw=1.4)
        ax.set_yscale("symlog")
        ax.set_xlabel("detection score")
        ax.set_title(f"{labels[name]}: AP50 {100 * a.ap['AP50']:.1f} (x100)", fontsize=9)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("detections")
    fig.suptitle(f"Scores of true and false positives at IoU {MATCH_IOU:g} (COCO matching), {run.name}", fontsize=10)
    _save(fig, run / TP_FP_PLOT)


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None or value < 0 else f"{PCT * value:.1f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def summary_line(result: dict[str, Any]) -> str:
    """One line: the run, its losses, its APs (x100) and score-IoU correlations, and AP / AP50
    without the centerness factor where it has one."""
    main = result["settings"][result["main"]]
    ap, si = main["ap"], main["score_iou"]
    line = (
        f"{result['run']}: {result['detector']} {result['cls_loss']}+{result['reg_loss']}+{result['assigner']} "
        f"AP {_pct(ap['AP'])} AP50 {_pct(ap['AP50'])} AP75 {_pct(ap['AP75'])} AP90 {_pct(ap['AP90'])} "
        f"AR100 {_pct(ap['AR100'])} | score-IoU n={si['n']} spearman {_num(si['spearman'])} "
        f"pearson {_num(si['pearson'])}"
    )
    off = result["settings"].get(CENTERNESS_OFF)
    if off is not None and result["main"] != CENTERNESS_OFF:
        line += f" | no centerness: AP {_pct(off['ap']['AP'])} AP50 {_pct(off['ap']['AP50'])}"
    return line


def compare_table(results: Sequence[dict[str, Any]]) -> str:
    """One Markdown table of several runs' analyses: AP columns x 100 at the runs' own settings,
    then AP and AP50 without the centerness factor (- for heads without one)."""
    header = [
        "run", "detector", "losses", "AP", "AP50", "AP75", "AP90", "AR100", "score-IoU n", "Spearman", "Pearson",
        "TP mean score", "FP mean score", "AP no ctr", "AP50 no ctr", "Spearman no ctr",
    ]  # fmt: skip
    from hcral.experiments.figures import run_labels

    rows = []
    labels = list(run_labels([r["run"] for r in results]))
    for label, r in zip(labels, results):
        main = r["settings"][r["main"]]
        ap, si, tf = main["ap"], main["score_iou"], main["tp_fp"]
        off = r["settings"].get(CENTERNESS_OFF) if r["main"] != CENTERNESS_OFF else None
        rows.append([
            label, r["detector"], f"{r['cls_loss']} + {r['reg_loss']} + {r['assigner']}",
            *(_pct(ap[k]) for k in ("AP", "AP50", "AP75", "AP90", "AR100")),
            str(si["n"]), _num(si["spearman"]), _num(si["pearson"]), _num(tf["tp_mean_score"]), _num(tf["fp_mean_score"]),
            _pct(off["ap"]["AP"]) if off else "-", _pct(off["ap"]["AP50"]) if off else "-",
            _num(off["score_iou"]["spearman"]) if off else "-",
        ])  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    note = (
        f"\nAP columns x 100 (COCOeval, all areas, 100 detections); score-IoU: detections whose largest IoU with "
        f"a same-class GT is >= {MATCH_IOU:g}; TP / FP: COCO's matching at IoU {MATCH_IOU:g}; written by `hcral analyze`.\n"
    )
    return "\n".join(lines) + "\n" + note


# Per-run numbers that cell_table averages over seeds: column -> (scale of the printed value, digits).
_CELL_METRICS = {
    "AP": (PCT, 1), "AR100": (PCT, 1), "Spearman": (1.0, 3), "Pearson": (1.0, 3), "TP - FP mean score": (1.0, 3),
    "AP no ctr": (PCT, 1),
}  # fmt: skip
# Columns that also get a paired difference against the baseline cell.
_CELL_DIFFS = ("Spearman", "Pearson", "TP - FP mean score")
_SEED_FOLDER = re.compile(r"seed(\d+)")


def cells_and_seeds(runs: Sequence[str | Path], *, pool_parts: bool = False) -> list[tuple[str, int]]:
    """``(cell, seed)`` of each run folder of an ablation (``hcral ablate``'s ``<out_dir>/<cell>/seed<k>``):
    the seed from the folder name, the cell from the parent's path below the parents' common folder
    (``atss/focal/giou`` for a loss swap), or the parent's name when all runs share one parent.
    With ``pool_parts`` the cell is always the parent's name, so that a study split into parts (one
    SPEC per part, same cell names, each seed in one part) pools its runs by cell."""
    paths = [Path(run).resolve() for run in runs]
    seeds = []
    for path in paths:
        m = _SEED_FOLDER.fullmatch(path.name)
        if m is None:
            raise ValueError(f"run folder {path} is not named seed<k>: per-cell tables need hcral ablate's <cell>/seed<k>")
        seeds.append(int(m.group(1)))
    parents = [p.parent for p in paths]
    common = Path(os.path.commonpath(parents))
    cells = [p.name if pool_parts or p == common else p.relative_to(common).as_posix() for p in parents]
    pairs = list(zip(cells, seeds))
    repeated = sorted({f"{c}/seed{k}" for c, k in pairs if pairs.count((c, k)) > 1})
    if repeated:
        raise ValueError(f"the same cell and seed are given twice: {repeated}")
    return pairs


def _per_run(result: dict[str, Any]) -> dict[str, float]:
    main = result["settings"][result["main"]]
    off = result["settings"].get(CENTERNESS_OFF) if result["main"] != CENTERNESS_OFF else None
    tp, fp = main["tp_fp"]["tp_mean_score"], main["tp_fp"]["fp_mean_score"]
    values = {
        "AP": main["ap"]["AP"], "AR100": main["ap"]["AR100"],
        "Spearman": main["score_iou"]["spearman"], "Pearson": main["score_iou"]["pearson"],
        "TP - FP mean score": None if tp is None or fp is None else tp - fp, "AP no ctr": off["ap"]["AP"] if off else None,
    }  # fmt: skip
    return {k: float(v) for k, v in values.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}


def cell_table(
    results: Sequence[dict[str, Any]], baseline: str, *, confidence: float = 0.95, pool_parts: bool = False
) -> str:
    """One Markdown row per cell of an ablation's analyses (:func:`cells_and_seeds` names the cells):
    the mean ± std over seeds of AP, AR@100, Spearman and Pearson score-IoU correlation, the gap between
    the mean scores of true and false positives, and AP without centerness; and for the
    correlations and the gap, the difference against cell ``baseline`` paired by seed, with its
    Student-t ``confidence`` interval (`` *``: it excludes 0). ``pool_parts``: as for :func:`cells_and_seeds`."""
    values: dict[str, dict[str, dict[int, float]]] = {}
    for (cell, seed), result in zip(cells_and_seeds([r["run"] for r in results], pool_parts=pool_parts), results):
        for metric, v in _per_run(result).items():
            values.setdefault(cell, {m: {} for m in _CELL_METRICS})[metric][seed] = v
    if baseline not in values:
        raise ValueError(f"baseline cell {baseline!r} is not among the runs' cells: {sorted(values)}")

    def pm(metric: str, per_seed: dict[int, float]) -> str:
        scale, digits = _CELL_METRICS[metric]
        if not per_seed:
            return "-"
        xs = list(per_seed.values())
        return f"{stats.mean(xs) * scale:.{digits}f}" + (f" ± {stats.std(xs) * scale:.{digits}f}" if len(xs) > 1 else "")

    header = ["cell", "n"]
    for metric in _CELL_METRICS:
        header += [metric] + ([f"Δ {metric}"] if metric in _CELL_DIFFS else [])
    rows = []
    # The baseline row first, the others in the order their runs were given.
    for cell, per_metric in sorted(values.items(), key=lambda item: item[0] != baseline):
        row = [f"`{cell}`", str(max(len(v) for v in per_metric.values()))]
        for metric, per_seed in per_metric.items():
            row.append(pm(metric, per_seed))
            if metric in _CELL_DIFFS:
                diff = stats.paired_difference(per_seed, values[baseline][metric], confidence=confidence)
                scale = _CELL_METRICS[metric][0]
                row.append("(baseline)" if cell == baseline else stats.format_ci(diff, scale=scale, digits=3))
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    note = (
        f"\nMean ± std over seeds; AP x 100 at the runs' own settings; Δ: paired by seed against `{baseline}`, "
        f"mean [{confidence:.0%} t-interval], * when it excludes 0. Spearman and Pearson: score against IoU of the "
        f"detections whose largest IoU with a same-class GT is >= {MATCH_IOU:g}; TP - FP mean score: COCO's "
        f"matching at IoU {MATCH_IOU:g}; written by `hcral analyze --baseline`.\n"
    )
    return "\n".join(lines) + "\n" + note
