"""The schedule study's table: 1x, 2x and 3x side by side (docs/results.md section 10g).

Run from the repository root after ``hcral ablate experiments/schedule_fcos_atss_aquarium.yaml``::

    python experiments/schedule_fcos_atss_aquarium_table.py > experiments/results/schedule_fcos_atss_aquarium_1x2x3x.md

The 2x and 3x runs are that SPEC's (cells ``<schedule>/<loss>``). The 1x runs are the module
ablation's seeds 0-2 (``experiments/module_ablation_fcos_atss_aquarium.yaml``, cells ``baseline``,
``hcra_c`` and ``rcicf_focal``), whose configs equal the schedule SPEC's at 8 epochs but for
``out_dir``. Each loss is compared with focal loss at the same schedule, paired by seed; the gap's
change with the schedule is the paired difference of the per-seed gaps (gap at 2x or 3x minus gap
at 1x), so a positive value means the loss came closer to focal loss.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from hcral.experiments.stats import format_ci, mean, paired_difference, std

SCHEDULE_RUNS = Path("experiments/results/schedule_fcos_atss_aquarium_runs.csv")
MODULE_ABLATION_RUNS = Path("experiments/results/module_ablation_fcos_atss_aquarium_runs.csv")
ONE_X_CELLS = {"baseline": "focal", "hcra_c": "hcra_c", "rcicf_focal": "rcicf_focal"}  # module ablation -> loss
SEEDS = (0, 1, 2)
SCHEDULES = ("1x", "2x", "3x")
LOSSES = ("focal", "hcra_c", "rcicf_focal")
BASELINE = "focal"


def read_ap(schedule_runs: Path, module_ablation_runs: Path) -> dict[tuple[str, str], dict[int, float]]:
    """AP x 100 of each finished run, as {(schedule, loss): {seed: AP}}."""
    ap: dict[tuple[str, str], dict[int, float]] = {}
    with module_ablation_runs.open() as f:
        for row in csv.DictReader(f):
            loss = ONE_X_CELLS.get(row["cell"])
            if loss and row["status"] == "ok" and int(row["seed"]) in SEEDS:
                ap.setdefault(("1x", loss), {})[int(row["seed"])] = 100 * float(row["AP"])
    with schedule_runs.open() as f:
        for row in csv.DictReader(f):
            if row["status"] == "ok":
                schedule, loss = row["cell"].split("/")
                ap.setdefault((schedule, loss), {})[int(row["seed"])] = 100 * float(row["AP"])
    return ap


def _gaps(ap: dict, schedule: str, loss: str) -> dict[int, float]:
    treated, base = ap.get((schedule, loss), {}), ap.get((schedule, BASELINE), {})
    return {seed: treated[seed] - base[seed] for seed in treated if seed in base}


def table(ap: dict[tuple[str, str], dict[int, float]]) -> str:
    lines = [
        "| schedule | loss | n | AP | AP / focal loss's | ΔAP vs focal loss, same schedule | per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for schedule in SCHEDULES:
        for loss in LOSSES:
            values = list(ap.get((schedule, loss), {}).values())
            if not values:
                lines.append(f"| {schedule} | `{loss}` | 0 | | | | |")
                continue
            spread = f" ± {std(values):.1f}" if len(values) > 1 else ""
            if loss == BASELINE:
                lines.append(f"| {schedule} | `{loss}` | {len(values)} | {mean(values):.1f}{spread} | 1 | (baseline) | |")
                continue
            ratio = mean(values) / mean(list(ap[(schedule, BASELINE)].values()))
            d = paired_difference(ap[(schedule, loss)], ap[(schedule, BASELINE)])
            per_seed = ", ".join(f"{g:+.1f}" for g in d.diffs.values())
            lines.append(
                f"| {schedule} | `{loss}` | {len(values)} | {mean(values):.1f}{spread} | {ratio:.2f} | {format_ci(d)} | {per_seed} |"
            )
    lines += ["", "| change of the gap to focal loss (positive: closer) | Δ gap [95% CI] | per seed |", "|---|---|---|"]
    for loss in LOSSES[1:]:
        for schedule in SCHEDULES[1:]:
            now, before = _gaps(ap, schedule, loss), _gaps(ap, "1x", loss)
            d = paired_difference(now, before)
            per_seed = ", ".join(f"{x:+.1f}" for x in d.diffs.values())
            lines.append(f"| `{loss}`: gap at {schedule} - gap at 1x | {format_ci(d)} | {per_seed} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--schedule-runs", type=Path, default=SCHEDULE_RUNS)
    parser.add_argument("--module-ablation-runs", type=Path, default=MODULE_ABLATION_RUNS)
    args = parser.parse_args()
    print("# Schedule 1x / 2x / 3x, FCOS+ATSS, Aquarium (pretrained Lite0): focal loss, HCRA-C, §3b\n")
    print(
        f"From `{args.schedule_runs}` (2x, 3x) and `{args.module_ablation_runs}` (1x, seeds 0-2), written by "
        "`python experiments/schedule_fcos_atss_aquarium_table.py`. AP x 100 on `valid`, mean ± standard "
        "deviation over seeds; Δ paired by seed, mean [95% t-interval], `*` when it excludes 0.\n"
    )
    print(table(read_ap(args.schedule_runs, args.module_ablation_runs)))


if __name__ == "__main__":
    main()
