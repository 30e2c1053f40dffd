"""The calibration table and figure (issue 23): GHM-C - focal loss against training compute.

Run from the repository root after the calibration SPECs' runs::

    python experiments/calibrate_figure.py     # prints the Markdown table, writes docs/img/calibration_gap_vs_compute.png
    python experiments/calibrate_figure.py --verdict-only     # only the verdict tables (seconds)

It also prints the verdict table of each regime that has one (``VERDICTS``), its parts merged by
seed, and the score-IoU consistency of its cells (``consistency_table``).

Each regime has paired ΔAPs (same seeds, 95% Student-t interval; hcral.experiments.stats) read
from the studies' per-run CSVs (``experiments/results/*_runs.csv``), and its training compute from
``experiments/calibrate_compute.py`` (step GFLOPs per image x batch x iterations). The base regime
is the module ablation's (docs/results.md §10d), whose GHM-C cell is the same MMDetection GHM-C at
weight 4; its seeds 0-2 are used so every point has the same seeds. Its ATSS - RetinaNet, VFL -
focal and QFL - focal come from the loss swaps on Aquarium's ATSS and RetinaNet configs (§10e, §10f: the same
frozen Lite0, size, batch and schedule), the comparisons the criterion names. A comparison without
runs shows "not run"; a point with fewer pairs than SEEDS is left out of the figure and of the
trend, and not judged. The paper's COCO regime is drawn for scale (its compute counted the same
way; GHM-C and focal loss are level there).
The schedule points' mean GHM-C - focal is fitted against log10 compute (a trend line, drawn
dotted); where it would reach -1 and 0 AP is an extrapolation, printed as such.

The criterion (experiments/calibrate_axes2_fcos_atss_aquarium.yaml, pinned before those runs):
(0) focal loss at least at the base regime's AP, (1) GHM-C within 1 AP of focal loss with a CI
that contains 0, (2) ATSS beats RetinaNet (CI above 0). At 9x x batch 16, criterion (2) has a
second stage, pinned before its third seed's RetinaNet AP was known
(experiments/calibrate_detectors9x_batch16_seeds34_aquarium.yaml): a positive mean whose 3-seed CI
reaches 0 is read once more at 5 seeds.
"""

from __future__ import annotations

import csv
import functools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hcral.config import load_config
from hcral.experiments.ablate import load_spec
from hcral.experiments.stats import PairedDiff, format_ci, mean, paired_difference, std

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibrate_compute import TRAIN_IMAGES, step_gflops  # noqa: E402

RESULTS = Path("experiments/results")
FIGURE = Path("docs/img/calibration_gap_vs_compute.png")
SEEDS = (0, 1, 2)
# The paper's regime, for scale: FCOS+ATSS R50-FPN at 1333x800, batch 16 (8 GPUs x 2), and
# MMDetection's 1x schedule of 90k iterations (12 COCO epochs).
COCO_CONFIG = "configs/coco_fcos_atss_r50_fpn_1x_baseline.yaml"
COCO_BATCH, COCO_ITERS = 16, 90_000
# Criterion (1): GHM-C within this many AP points of focal loss.
LEVEL_AP = 1.0

# A run set: (per-run CSV under experiments/results, cell name).
Runs = tuple[str, str]
# The comparisons of the table, in its column order: (label, treatment - baseline).
COMPARISONS = ("GHM-C − focal", "HCRA-C − GHM-C", "ATSS − RetinaNet", "VFL − focal", "QFL − focal")


@dataclass(frozen=True)
class Point:
    regime: str
    spec: str  # the SPEC whose config the point trains (for its compute)
    spec_cell: str  # the cell of that SPEC (any loss; the loss does not change the compute)
    focal: Runs
    pairs: dict[str, tuple[Runs, Runs]] = field(default_factory=dict)  # COMPARISONS label -> (treatment, baseline)
    schedule: bool = False  # on the schedule axis (base, 3x, 6x, ...): the points the trend line fits
    # Criterion (2)'s second stage, seeds 3-4 of (ATSS, RetinaNet), pooled by seed with the
    # "ATSS − RetinaNet" pair; read only under its SPEC's rule (``verdict``).
    stage2: tuple[Runs, Runs] | None = None


def _axes(regime: str) -> Point:
    runs = "calibrate_axes_fcos_atss_aquarium_runs.csv"
    focal = (runs, f"{regime}/focal")
    return Point(regime, "experiments/calibrate_axes_fcos_atss_aquarium.yaml", f"{regime}/focal", focal,
                 {"GHM-C − focal": ((runs, f"{regime}/ghmc"), focal)})  # fmt: skip


def _axes2(regime: str) -> Point:
    runs = "calibrate_axes2_fcos_atss_aquarium_runs.csv"
    focal = (runs, f"{regime}/focal")
    return Point(regime, "experiments/calibrate_axes2_fcos_atss_aquarium.yaml", f"{regime}/focal", focal,
                 {"GHM-C − focal": ((runs, f"{regime}/ghmc"), focal)})  # fmt: skip


_BASE = "module_ablation_fcos_atss_aquarium_runs.csv"
_SCHEDULE = "schedule_fcos_atss_aquarium_runs.csv"
_GHMC_3X = "calibrate_schedule_ghmc_fcos_atss_aquarium_runs.csv"
_SCHEDULE_6X = "calibrate_schedule6x_fcos_atss_aquarium_runs.csv"
_SCHEDULE_9X = "calibrate_schedule9x_fcos_atss_aquarium_runs.csv"
_6X_BATCH16 = "calibrate_schedule6x_batch16_fcos_atss_aquarium_runs.csv"
_9X_BATCH16 = "calibrate_schedule9x_batch16_fcos_atss_aquarium_runs.csv"
_VERDICT = "verdict_6x_batch16_fcos_atss_aquarium_runs.csv"
# Criterion (2) and VFL there, as the base row measures them: the ATSS detector against RetinaNet.
_DETECTORS_6X_BATCH16 = "calibrate_detectors6x_batch16_aquarium_runs.csv"
_QFL_6X_BATCH16 = "calibrate_qfl6x_batch16_aquarium_runs.csv"  # against the detector study's atss runs
_DETECTORS_9X_BATCH16 = "calibrate_detectors9x_batch16_aquarium_runs.csv"  # run only if 9x x batch 16 passes (0)-(1)
_DETECTORS_9X_BATCH16_STAGE2 = "calibrate_detectors9x_batch16_seeds34_aquarium_runs.csv"
# The verdict at 9x x batch 16, run only if that regime is calibrated.
_VERDICT_9X_BATCH16 = "verdict_9x_batch16_fcos_atss_aquarium_runs.csv"
_BASELINES_9X_BATCH16 = "verdict_baselines_9x_batch16_fcos_atss_aquarium_runs.csv"
POINTS = (
    Point("base (§10d)", "experiments/module_ablation_fcos_atss_aquarium.yaml", "baseline", (_BASE, "baseline"), {
        "GHM-C − focal": ((_BASE, "ghmc"), (_BASE, "baseline")),
        "HCRA-C − GHM-C": ((_BASE, "hcra_c"), (_BASE, "ghmc")),
        "ATSS − RetinaNet": (("loss_swaps_atss_aquarium_runs.csv", "focal_giou"),
                             ("loss_swaps_retinanet_aquarium_runs.csv", "focal_giou")),
        "VFL − focal": (("loss_swaps_atss_aquarium_runs.csv", "vfl"), ("loss_swaps_atss_aquarium_runs.csv", "focal_giou")),
        "QFL − focal": (("loss_swaps_atss_aquarium_runs.csv", "qfl"), ("loss_swaps_atss_aquarium_runs.csv", "focal_giou")),
    }, schedule=True),
    _axes("finetune"),
    _axes("head_4conv"),
    _axes("batch16"),
    _axes2("res384"),
    _axes2("ch128"),
    Point("3x schedule", "experiments/calibrate_schedule_ghmc_fcos_atss_aquarium.yaml", "3x/ghmc", (_SCHEDULE, "3x/focal"), {
        "GHM-C − focal": ((_GHMC_3X, "3x/ghmc"), (_SCHEDULE, "3x/focal")),
        "HCRA-C − GHM-C": ((_SCHEDULE, "3x/hcra_c"), (_GHMC_3X, "3x/ghmc")),
    }, schedule=True),
    Point("6x schedule", "experiments/calibrate_schedule6x_fcos_atss_aquarium.yaml", "6x/focal", (_SCHEDULE_6X, "6x/focal"), {
        "GHM-C − focal": ((_SCHEDULE_6X, "6x/ghmc"), (_SCHEDULE_6X, "6x/focal")),
    }, schedule=True),
    Point("9x schedule", "experiments/calibrate_schedule9x_fcos_atss_aquarium.yaml", "9x/focal", (_SCHEDULE_9X, "9x/focal"), {
        "GHM-C − focal": ((_SCHEDULE_9X, "9x/ghmc"), (_SCHEDULE_9X, "9x/focal")),
    }, schedule=True),
    # Two axes combined (schedule and batch 16): off the schedule trend, which is batch 8.
    Point("6x schedule, batch 16", "experiments/calibrate_schedule6x_batch16_fcos_atss_aquarium.yaml", "6x_batch16/focal",
          (_6X_BATCH16, "6x_batch16/focal"), {
        "GHM-C − focal": ((_6X_BATCH16, "6x_batch16/ghmc"), (_6X_BATCH16, "6x_batch16/focal")),
        "HCRA-C − GHM-C": ((_VERDICT, "6x_batch16/hcra_c"), (_6X_BATCH16, "6x_batch16/ghmc")),
        "ATSS − RetinaNet": ((_DETECTORS_6X_BATCH16, "6x_batch16/atss"), (_DETECTORS_6X_BATCH16, "6x_batch16/retinanet")),
        "VFL − focal": ((_DETECTORS_6X_BATCH16, "6x_batch16/atss_vfl"), (_DETECTORS_6X_BATCH16, "6x_batch16/atss")),
        "QFL − focal": ((_QFL_6X_BATCH16, "6x_batch16/atss_qfl"), (_DETECTORS_6X_BATCH16, "6x_batch16/atss")),
    }),
    Point("9x schedule, batch 16", "experiments/calibrate_schedule9x_batch16_fcos_atss_aquarium.yaml", "9x_batch16/focal",
          (_9X_BATCH16, "9x_batch16/focal"), {
        "GHM-C − focal": ((_9X_BATCH16, "9x_batch16/ghmc"), (_9X_BATCH16, "9x_batch16/focal")),
        "HCRA-C − GHM-C": ((_VERDICT_9X_BATCH16, "9x_batch16/hcra_c"), (_9X_BATCH16, "9x_batch16/ghmc")),
        "ATSS − RetinaNet": ((_DETECTORS_9X_BATCH16, "9x_batch16/atss"), (_DETECTORS_9X_BATCH16, "9x_batch16/retinanet")),
        "VFL − focal": ((_DETECTORS_9X_BATCH16, "9x_batch16/atss_vfl"), (_DETECTORS_9X_BATCH16, "9x_batch16/atss")),
    }, stage2=((_DETECTORS_9X_BATCH16_STAGE2, "9x_batch16/atss"), (_DETECTORS_9X_BATCH16_STAGE2, "9x_batch16/retinanet"))),
)  # fmt: skip
# The verdict (issue 23, item 3), per regime: each cell's runs as parts (runs CSV, cell), merged by
# seed (each seed is in one part only). Pairs are by seed (runs repeat bit for bit per thread count
# on one CPU model; on another they are a second draw). A comparison without runs shows "not run".
VERDICT_SEEDS = (0, 1, 2, 3, 4)
Parts = tuple[Runs, ...]


@dataclass(frozen=True)
class VerdictCells:
    spec: str  # where the verdict's own cells are pinned, for the "not run" line
    focal: Parts  # FL + GIoU + ATSS
    ghmc: Parts
    hcra_c: Parts  # HCRA-C + GIoU + ATSS
    hcral: Parts  # HCRA-C + HCRA-R + EATSS
    hcra_r: Parts  # FL + HCRA-R + ATSS
    eatss: Parts  # FL + GIoU + EATSS

    def by_cell(self) -> dict[str, Parts]:
        """Cell name (as in the runs CSVs) -> its parts, for the six cells."""
        return {parts[0][1]: parts for parts in (self.focal, self.ghmc, self.hcra_c, self.hcral, self.hcra_r, self.eatss)}

    def comparisons(self) -> dict[str, tuple[Parts, Parts]]:
        """Comparison label -> (treated, baseline), in the verdict table's row order."""
        return {
            "HCRA-C − GHM-C (the paper's comparison)": (self.hcra_c, self.ghmc),
            "HCRA-C − focal": (self.hcra_c, self.focal),
            "HCRAL − (FL + GIoU + ATSS)": (self.hcral, self.focal),
            "HCRAL − HCRA-C (what HCRA-R + EATSS add)": (self.hcral, self.hcra_c),
            "HCRA-R − GIoU": (self.hcra_r, self.focal),
            "EATSS − ATSS": (self.eatss, self.focal),
            # The calibration reading over every seed run, beside the table's pre-registered 3-seed one.
            "GHM-C − focal (criterion (1), all seeds)": (self.ghmc, self.focal),
        }


# 6x schedule x batch 16, the closest regime so far. Seeds 0-2: part 1 (HCRA-C, HCRAL) against the
# calibration study's focal and GHM-C runs; the later parts: 2 (seed 3 of focal and GHM-C), 3 (seed
# 4 of all four), 4 (seed 3 of HCRA-C and HCRAL), 5 (HCRA-R and EATSS, seeds 0-4).
_PART = "verdict{}_6x_batch16_fcos_atss_aquarium_runs.csv".format
_PARTS_6X = {  # variant -> the runs CSVs that hold its seeds
    "focal": (_6X_BATCH16, _PART(2), _PART(3)),
    "ghmc": (_6X_BATCH16, _PART(2), _PART(3)),
    "hcra_c": (_VERDICT, _PART(3), _PART(4)),
    "hcral": (_VERDICT, _PART(3), _PART(4)),
    "hcra_r": (_PART(5),),
    "eatss": (_PART(5),),
}
# 9x schedule x batch 16, run only if calibrated: focal and GHM-C from the calibration study (seeds
# 0-2) and the baselines SPEC (seeds 3-4), the other four cells from one SPEC (seeds 0-4).
_PARTS_9X = {
    "focal": (_9X_BATCH16, _BASELINES_9X_BATCH16),
    "ghmc": (_9X_BATCH16, _BASELINES_9X_BATCH16),
    **{v: (_VERDICT_9X_BATCH16,) for v in ("hcra_c", "hcral", "hcra_r", "eatss")},
}
VERDICTS = {
    "6x schedule, batch 16": VerdictCells("experiments/verdict_6x_batch16_fcos_atss_aquarium.yaml",
        **{v: tuple((runs, f"6x_batch16/{v}") for runs in csvs) for v, csvs in _PARTS_6X.items()}),
    "9x schedule, batch 16": VerdictCells("experiments/verdict_9x_batch16_fcos_atss_aquarium.yaml",
        **{v: tuple((runs, f"9x_batch16/{v}") for runs in csvs) for v, csvs in _PARTS_9X.items()}),
}  # fmt: skip
# The regime whose score-IoU consistency comes from `hcral analyze` files and consistency reruns
# (its run folders were lost before every evaluation wrote score_iou_* into metrics.json).
VERDICT_6X = VERDICTS["6x schedule, batch 16"]


def ap_by_seed(runs: Runs, seeds: tuple[int, ...] = SEEDS, *, metric: str = "AP") -> dict[int, float]:
    path = RESULTS / runs[0]
    if not path.is_file():
        return {}
    with path.open() as f:
        return {
            int(r["seed"]): float(r[metric]) for r in csv.DictReader(f)
            if r["cell"] == runs[1] and r["status"] == "ok" and int(r["seed"]) in seeds
        }  # fmt: skip


def has_column(runs: Runs, metric: str) -> bool:
    """Whether a runs CSV exists and tables ``metric`` (the score_iou_* columns came later than AP)."""
    path = RESULTS / runs[0]
    if not path.is_file():
        return False
    with path.open() as f:
        return metric in next(csv.reader(f))


def verdict_ap(parts: Parts) -> dict[int, float]:
    """AP by seed of one verdict cell, its parts merged (each seed is in one part only)."""
    return {s: ap for runs in parts for s, ap in ap_by_seed(runs, VERDICT_SEEDS).items()}


def verdict_table(cells: VerdictCells) -> str:
    """The verdict comparisons as Markdown: paired ΔAP with its CI, the per-seed differences, the seeds."""
    lines = ["| comparison | ΔAP [95% CI] | per seed | seeds |", "|---|---|---|---|"]
    for label, (t, b) in cells.comparisons().items():
        treated, base = verdict_ap(t), verdict_ap(b)
        d = paired_difference(treated, base)
        per_seed = ", ".join(f"{k}: {100 * (treated[k] - base[k]):+.2f}" for k in sorted(treated.keys() & base.keys()))
        lines.append(f"| {label} | {format_ci(d, scale=100) if d.n >= 2 else 'not run'} | {per_seed} | {d.n} |")
    return "\n".join(lines)


def verdict_interaction(cells: VerdictCells) -> PairedDiff:
    """Per seed, (HCRAL − HCRA-C) − (HCRA-R − GIoU) − (EATSS − ATSS): how far HCRA-R and EATSS on
    HCRA-C fall from their sum on focal loss (0 if their effects add and do not depend on the base)."""
    focal, hcra_c, hcral = verdict_ap(cells.focal), verdict_ap(cells.hcra_c), verdict_ap(cells.hcral)
    hcra_r, eatss = verdict_ap(cells.hcra_r), verdict_ap(cells.eatss)
    seeds = focal.keys() & hcra_c.keys() & hcral.keys() & hcra_r.keys() & eatss.keys()
    treated = {s: hcral[s] + 2 * focal[s] for s in seeds}
    return paired_difference(treated, {s: hcra_c[s] + hcra_r[s] + eatss[s] for s in seeds})


# Score-IoU consistency of the verdict cells (issue 23, item 3), by seed. Every final evaluation
# now writes score_iou_* into metrics.json, so SPECs that table them (the 9x x batch 16 verdict's)
# hold it in their runs CSVs. The 6x x batch 16 runs came before that: those whose folders lived
# until `hcral analyze` read them are rows of its pooled analysis file; the rest were rerun by the
# consistency SPECs.
_POOLED_ANALYSIS = "verdict_pooled_6x_batch16_fcos_atss_aquarium_analysis.md"
_RERUNS = ("consistency_6x_batch16_focal_ghmc_aquarium_runs.csv", "consistency_verdict5_6x_batch16_aquarium_runs.csv")
# Column of `hcral analyze`'s per-run table (3 decimals) -> key of metrics.json and the runs CSVs
# (6 decimals; hcral.experiments.analyze.SCORE_IOU_METRICS).
CONSISTENCY = {"Spearman": "score_iou_spearman", "Pearson": "score_iou_pearson"}
# A rerun repeats its original only if their APs (6 decimals in the CSVs) are equal; part 5's did
# not (another CPU model: docs/results.md, section 12 summary).
RERUN_AP_TOL = 1e-6


@functools.cache  # read once: every cell and comparison of the consistency table looks it up
def analysis_rows(name: str = _POOLED_ANALYSIS) -> dict[tuple[str, int], dict[str, str]]:
    """(cell, seed) -> column -> value of the per-run table of an `hcral analyze` Markdown file
    (its run column is ``<cell folder>/seed<k>``, the cell folder being the cell with ``/`` as ``__``)."""
    path = RESULTS / name
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    if header[0] != "run":
        raise ValueError(f"{path}: first table's first column is {header[0]!r}, expected 'run' (hcral analyze's per-run table)")
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break  # the per-run table ends at the first non-table line
        values = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        folder, seed = values["run"].rsplit("/seed", 1)
        rows[(folder.replace("__", "/"), int(seed))] = values
    return rows


def consistency_by_seed(parts: Parts, metric: str = "score_iou_spearman") -> dict[int, float]:
    """``metric`` (a CONSISTENCY value) by seed for a verdict cell, from the analysis file, the
    reruns and the cell's own runs CSVs where they table it."""
    cell = parts[0][1]
    column = next(c for c, m in CONSISTENCY.items() if m == metric)
    merged = {s: float(v[column]) for (c, s), v in analysis_rows().items() if c == cell and s in VERDICT_SEEDS}
    sources = [(runs, cell) for runs in _RERUNS] + [p for p in parts if has_column(p, metric)]
    for runs in sources:
        found = ap_by_seed(runs, VERDICT_SEEDS, metric=metric)
        if overlap := merged.keys() & found.keys():
            raise ValueError(f"{cell}: seeds {sorted(overlap)} in {runs[0]} and in an earlier source ({_POOLED_ANALYSIS}, {', '.join(_RERUNS)})")
        merged.update(found)
    return merged


def rerun_ap(cell: str) -> dict[int, float]:
    """AP by seed of a verdict cell's consistency reruns."""
    return {s: ap for runs in _RERUNS for s, ap in ap_by_seed((runs, cell), VERDICT_SEEDS).items()}


def _second_draws(rerun: dict[int, float], original: dict[int, float]) -> set[int]:
    """The seeds whose rerun did not repeat its original (an original missing counts as not repeated)."""
    return {s for s, ap in rerun.items() if s not in original or abs(ap - original[s]) > RERUN_AP_TOL}


def rerun_ap_check() -> list[str]:
    """Each rerun's AP against its original's (same cell and seed in the verdict's parts): whether
    a rerun is the run whose consistency it stands for, or a second draw at the same seed."""
    lines = []
    for cell, parts in VERDICT_6X.by_cell().items():
        rerun, original = rerun_ap(cell), verdict_ap(parts)
        differ = _second_draws(rerun, original)
        for s in sorted(rerun):
            orig = f"{100 * original[s]:.4f}" if s in original else "missing"
            lines.append(f"{cell} seed {s}: rerun AP {100 * rerun[s]:.4f}, original {orig}{'  MISMATCH' if s in differ else ''}")
    return lines


def second_draw_table() -> str:
    """ΔAP of each verdict comparison whose treated cell's reruns are second draws (an AP off its
    original's), on those reruns against the same baseline: how far another draw at the same seeds
    moves the verdict."""
    lines = ["| comparison | ΔAP on the reruns [95% CI] | on the originals, same seeds | seeds |", "|---|---|---|---|"]
    for label, (t, b) in VERDICT_6X.comparisons().items():
        rerun, original, base = rerun_ap(t[0][1]), verdict_ap(t), verdict_ap(b)
        if not _second_draws(rerun, original) & original.keys():
            continue
        d, o = paired_difference(rerun, base), paired_difference({s: original[s] for s in rerun if s in original}, base)
        show = [format_ci(x, scale=100) if x.n >= 2 else "not run" for x in (d, o)]
        lines.append(f"| {label} | {show[0]} | {show[1]} | {d.n} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def consistency_table(cells: VerdictCells) -> str:
    """Per verdict cell: seeds, mean ± std of Spearman and Pearson (score against IoU); per verdict
    comparison: Δ Spearman and Δ Pearson paired by seed, with their CIs."""
    lines = ["| cell | seeds | Spearman | Pearson |", "|---|---|---|---|"]
    for cell, parts in sorted(cells.by_cell().items()):
        rho, r = consistency_by_seed(parts), consistency_by_seed(parts, "score_iou_pearson")
        stats = [f"{mean(list(v.values())):.3f} ± {std(list(v.values())):.3f}" if len(v) >= 2 else "–" for v in (rho, r)]
        lines.append(f"| `{cell}` | {','.join(map(str, sorted(rho)))} | {stats[0]} | {stats[1]} |")
    lines += ["", "| comparison | Δ Spearman [95% CI] | Δ Pearson [95% CI] | seeds |", "|---|---|---|---|"]
    for label, (t, b) in cells.comparisons().items():
        d = {m: paired_difference(consistency_by_seed(t, m), consistency_by_seed(b, m))
             for m in ("score_iou_spearman", "score_iou_pearson")}  # fmt: skip
        cis = [format_ci(x, digits=3) if x.n >= 2 else "not run" for x in d.values()]
        lines.append(f"| {label} | {cis[0]} | {cis[1]} | {d['score_iou_spearman'].n} |")
    return "\n".join(lines)


def training_pflops(spec_path: str, cell_name: str) -> float:
    spec = load_spec(spec_path)
    cell = spec.cell(cell_name)
    cfg = load_config(spec.base_config, [*spec.base_overrides, *cell.overrides])
    iters = cfg.train.epochs * -(-TRAIN_IMAGES // cfg.data.batch_size)
    return step_gflops(cfg) * cfg.data.batch_size * iters / 1e6


def log_linear_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope per tenfold compute) of mean ΔAP = a + b log10(PFLOPs), least squares: the
    trend of the schedule points, an extrapolation and not a result."""
    xs = [math.log10(x) for x, _ in points]
    ys = [y for _, y in points]
    mx, my = mean(xs), mean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def stage2_diff(p: Point) -> PairedDiff | None:
    """ATSS − RetinaNet at the verdict's 5 seeds (VERDICT_SEEDS), the pair's own runs and its
    stage-2 runs merged by seed; read once (its SPEC: no later look)."""
    if p.stage2 is None:
        return None
    return paired_difference(*(verdict_ap(parts) for parts in zip(p.pairs["ATSS − RetinaNet"], p.stage2)))


def verdict(focal_ap: float, base_focal_ap: float, diffs: dict[str, PairedDiff], stage2: PairedDiff | None = None) -> str:
    """The criterion (module docstring), condition by condition. ``stage2``: ATSS − RetinaNet at 5
    seeds, for a regime whose criterion (2) has a second stage pinned (``Point.stage2``)."""
    ghmc, atss = diffs.get("GHM-C − focal"), diffs.get("ATSS − RetinaNet")
    if ghmc is None or ghmc.n == 0:
        return "not run"
    if ghmc.n < len(SEEDS):  # the design's seeds per cell; 2 pairs give a t-interval 3.6x as wide as 3
        return f"not judged: {ghmc.n} of {len(SEEDS)} seeds"
    if focal_ap < base_focal_ap:
        return "no: (0) focal below base"
    if not (abs(100 * ghmc.mean) <= LEVEL_AP and ghmc.ci_low <= 0 <= ghmc.ci_high):
        return "no: (1)"
    if atss is None or atss.n == 0:
        return "(1) yes; (2) not run"
    if atss.n < len(SEEDS):  # judged at the design's seeds, as (1) is
        return f"(1) yes; (2) not judged: {atss.n} of {len(SEEDS)} seeds"
    if atss.ci_low > 0:
        return "yes"
    if atss.mean <= 0 or stage2 is None:
        return "no: (2)"
    # A positive mean whose 3-seed CI reaches 0: the stage-2 SPEC reads (2) once more, at 5 seeds.
    if stage2.n < len(VERDICT_SEEDS):
        return f"(1) yes; (2) not judged: stage 2, {stage2.n} of {len(VERDICT_SEEDS)} seeds"
    return "yes, at stage 2" if stage2.ci_low > 0 else "no: (2), at stage 2"


def print_verdict() -> None:
    """Each regime's verdict: ΔAP, the HCRA-R + EATSS shortfall, the score-IoU consistency."""
    for regime, cells in VERDICTS.items():
        if not any(verdict_ap(parts) for parts in (cells.hcra_c, cells.hcral, cells.hcra_r, cells.eatss)):
            print(f"verdict at {regime}: not run (pinned in {cells.spec})\n")
            continue
        print(f"verdict at {regime}, paired by seed:\n")
        print(verdict_table(cells))
        shortfall = verdict_interaction(cells)
        if shortfall.n >= 2:
            print(f"\n(HCRAL − HCRA-C) − (HCRA-R − GIoU) − (EATSS − ATSS), per seed: {format_ci(shortfall, scale=100)} ({shortfall.n} seeds)")
        print(f"\nscore-IoU consistency of the verdict cells at {regime} (hcral analyze's numbers at the runs' own settings):\n")
        print(consistency_table(cells) + "\n")
    if check := rerun_ap_check():
        print("\nconsistency reruns against their originals (AP x 100):\n" + "\n".join(check))
    if second := second_draw_table():
        print("\nthe verdict on the reruns that are second draws, against the same baselines:\n\n" + second)


def main(argv: list[str] | None = None) -> int:
    if "--verdict-only" in (sys.argv[1:] if argv is None else argv):
        print_verdict()  # no compute counting, no figure: seconds instead of minutes
        return 0
    base_focal = mean(list(ap_by_seed(POINTS[0].focal).values()))
    header = ["regime", "training PFLOPs", "focal AP", *(f"ΔAP {c} [95% CI]" for c in COMPARISONS), "seeds", "calibrated?"]
    rows, plotted, stage2_lines = [], {c: [] for c in COMPARISONS[:2]}, []
    trend: list[tuple[float, float]] = []  # (PFLOPs, mean GHM-C − focal) of the schedule points
    for p in POINTS:
        pflops = training_pflops(p.spec, p.spec_cell)
        focal = ap_by_seed(p.focal)
        diffs = {label: paired_difference(ap_by_seed(t), ap_by_seed(b)) for label, (t, b) in p.pairs.items()}
        focal_ap = mean(list(focal.values())) if focal else float("nan")
        cells = [format_ci(diffs[c], scale=100) if c in diffs and diffs[c].n else "not run" for c in COMPARISONS]
        n = diffs["GHM-C − focal"].n
        if p.schedule and n >= len(SEEDS):
            trend.append((pflops, 100 * diffs["GHM-C − focal"].mean))
        stage2 = stage2_diff(p)
        if stage2 is not None and stage2.n > diffs["ATSS − RetinaNet"].n:
            interim = "" if stage2.n >= len(VERDICT_SEEDS) else f"; interim, not the reading: (2) is read at {len(VERDICT_SEEDS)}"
            stage2_lines.append(f"criterion (2) at {p.regime}, stage 2: ATSS − RetinaNet {format_ci(stage2, scale=100)} ({stage2.n} seeds{interim})")
        rows.append([p.regime, f"{pflops:.3f}", f"{100 * focal_ap:.1f}" if focal else "–", *cells, str(n), verdict(focal_ap, base_focal, diffs, stage2)])
        for c in plotted:
            if c in diffs and diffs[c].n >= len(SEEDS):
                d = diffs[c]
                plotted[c].append((p.regime, pflops, 100 * d.mean, 100 * d.ci_low, 100 * d.ci_high))
    coco = step_gflops(load_config(COCO_CONFIG, ["model.pretrained=null"])) * COCO_BATCH * COCO_ITERS / 1e6
    rows.append(["COCO 1x, R50-FPN, 1333x800 (the paper's; not run)", f"{coco:.0f}", "–",
                 "≈ 0 (MMDetection's zoo, RetinaNet: +0.5)", "–", "+2.9 (zoo: 39.4 against 36.5)", "+0.5 to +1", "+0.5 to +1", "–", "–"])  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print()
    if stage2_lines:
        print("\n".join(stage2_lines) + "\n")
    print_verdict()
    a, b = log_linear_fit(trend)
    crossing = {y: 10 ** ((y - a) / b) for y in (-LEVEL_AP, 0.0)} if b > 0 else {}
    print(f"\nschedule trend over {len(trend)} points (GHM-C − focal = {a:+.2f} {b:+.2f} log10 PFLOPs): "
          + ", ".join(f"{y:+g} AP at {x:.3f} PFLOPs" for y, x in crossing.items()))  # fmt: skip

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, (label, points) in zip(axes, plotted.items()):
        for i, (regime, x, m, lo, hi) in enumerate(points):
            # matplotlib's colour cycle has 10 colours: a second marker keeps an 11th point apart.
            ax.errorbar([x], [m], yerr=[[m - lo], [hi - m]], fmt="os"[i // 10 % 2], capsize=4, label=regime)
        if label == "GHM-C − focal" and crossing:
            xs = [min(x for x, _ in trend), max(crossing[0.0], max(x for x, _ in trend))]
            ax.plot(xs, [a + b * math.log10(x) for x in xs], "k:", lw=1, label="schedule trend (extrapolated)")
        ax.axhline(0, color="k", lw=0.8)
        ax.axvline(coco, color="grey", ls="--", lw=1, label=f"COCO 1x R50 ({coco:.0f} PFLOPs)")
        ax.axhspan(-LEVEL_AP, LEVEL_AP, color="g", alpha=0.1, label=f"|Δ| ≤ {LEVEL_AP:g} AP")
        ax.set_xscale("log")
        ax.set_xlabel("training compute (PFLOPs: step GFLOPs x batch x iterations)")
        ax.set_ylabel(f"ΔAP, {label} (95% CI)")
        ax.set_title(f"{label}, FCOS+ATSS on Aquarium (3 seeds)", fontsize=10)
        ax.legend(fontsize=7)
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(FIGURE, dpi=120)
    print(f"\nwrote {FIGURE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
