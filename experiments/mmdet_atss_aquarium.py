"""MMDetection's ATSS on Aquarium through the HCRAL plugin: focal loss vs HCRA-C, paired by seed.

Run from the repository root, with hcral and the mmdet extras installed (``docs/mmdet.md``)::

    python experiments/mmdet_atss_aquarium.py                   # every run not done yet, 2 at a time, + summary
    python experiments/mmdet_atss_aquarium.py --seeds 0 --cfg-options train_cfg.max_epochs=1 \\
        --results /tmp/mmdet_smoke                              # smoke test

What runs. Each arm is one config of ``configs/mmdet/``, trained and evaluated by MMDetection
(``python -m hcral.integrations.mmdet_train``: mmengine's Runner, MMDetection's data pipeline,
ATSS head, assigner, sampler, schedule, post-processing and ``CocoMetric``), with
``randomness.seed=<seed>``: ``focal`` is ``atss_lite0_fpn_aquarium_cpu.py`` (MMDetection's own
``ATSSHead`` and ``FocalLoss``), ``hcra_c`` is ``atss_lite0_fpn_aquarium_cpu_hcra_c.py``
(``HCRAATSSHead`` and ``HCRACLoss``, weight 2). Both are hcral's §10e setting (docs/results.md).
The two heads build the same layers in the same order, so a seed gives both arms the same
initialisation and the same data order.

Output. One JSON per run, ``<results>/<arm>_seed<k>.json`` (the COCO metrics of the last
evaluation, seconds, the command), written atomically when the run has finished; a run whose JSON
exists with the same ``--cfg-options`` is skipped, so an interrupted study continues with the next
missing run (a run itself restarts from the beginning). MMDetection's work folders (logs,
checkpoints) go to ``--work-root``. Then ``summary.md``: per arm mean ± std over seeds and the
paired difference hcra_c - focal with its 95% Student-t interval (hcral.experiments.stats).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hcral.experiments.stats import format_ci, mean, paired_difference, std
from hcral.utils import write_json_atomic, write_text_atomic

ARMS = {
    "focal": "configs/mmdet/atss_lite0_fpn_aquarium_cpu.py",
    "hcra_c": "configs/mmdet/atss_lite0_fpn_aquarium_cpu_hcra_c.py",
}
BASELINE, TREATMENT = "focal", "hcra_c"
# CocoMetric's keys (prefix "coco/") and the names hcral's tables use.
METRICS = {"bbox_mAP": "AP", "bbox_mAP_50": "AP50", "bbox_mAP_75": "AP75"}
DEFAULT_RESULTS = "experiments/results/mmdet_atss_aquarium"
DEFAULT_WORK_ROOT = "runs/mmdet_atss_aquarium"


def last_metrics(work_dir: Path) -> dict[str, float]:
    """The COCO metrics of the last evaluation in ``work_dir``'s newest mmengine log
    (``<timestamp>/vis_data/scalars.json``, one JSON record per logged step)."""
    logs = sorted(work_dir.glob("*/vis_data/scalars.json"))
    if not logs:
        raise FileNotFoundError(f"{work_dir}: no */vis_data/scalars.json (did the run finish?)")
    found: dict[str, float] = {}
    for line in logs[-1].read_text().splitlines():
        record = json.loads(line)
        if "coco/bbox_mAP" in record:
            found = {name: float(record[f"coco/{key}"]) for key, name in METRICS.items()}
    if not found:
        raise ValueError(f"{logs[-1]}: no coco/bbox_mAP record (the run did not evaluate)")
    return found


def run_one(arm: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    work_dir = Path(args.work_root) / f"{arm}_seed{seed}"
    command = [
        sys.executable, "-m", "hcral.integrations.mmdet_train", ARMS[arm], "--work-dir", str(work_dir),
        "--cfg-options", f"randomness.seed={seed}", *args.cfg_options,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(work_dir / "stdout.log", "w") as log:
        rc = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"{arm} seed {seed}: exit status {rc}; see {work_dir / 'stdout.log'}")
    return {
        "arm": arm, "seed": seed, **last_metrics(work_dir), "config": ARMS[arm], "cfg_options": args.cfg_options,
        "seconds": round(time.perf_counter() - started, 1), "threads": args.threads,
        "command": " ".join(command), "machine": platform.machine(), "processor": platform.processor(),
    }  # fmt: skip


def finished(path: Path, cfg_options: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    run = json.loads(path.read_text())
    return run if run.get("cfg_options") == cfg_options else None


def summary_markdown(runs: dict[str, dict[int, dict[str, Any]]], seeds: list[int], command: str) -> str:
    lines = [
        "# MMDetection ATSS on Aquarium (plugin): focal loss vs HCRA-C",
        "",
        f"Command: `{command}`. Seeds {seeds}; AP in %; paired difference hcra_c - focal with its 95% "
        "Student-t interval (* when it excludes 0).",
        "",
        "| metric | focal (mean ± std) | hcra_c (mean ± std) | hcra_c - focal [95% CI] | pairs |",
        "|---|---|---|---|---|",
    ]
    for name in METRICS.values():
        cells = []
        for arm in (BASELINE, TREATMENT):
            values = [100 * r[name] for r in runs[arm].values()]
            cells.append(f"{mean(values):.1f} ± {std(values):.1f}")
        diff = paired_difference(
            {s: r[name] for s, r in runs[TREATMENT].items()}, {s: r[name] for s, r in runs[BASELINE].items()}
        )
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {format_ci(diff, scale=100)} | {diff.n} |")
    lines += ["", "| seed | " + " | ".join(f"{arm} AP" for arm in ARMS) + " | s/run |", "|---|---|---|---|"]
    for seed in seeds:
        got = [runs[arm].get(seed) for arm in ARMS]
        aps = " | ".join("n/a" if r is None else f"{100 * r['AP']:.1f}" for r in got)
        secs = "/".join(str(r["seconds"]) for r in got if r is not None)
        lines.append(f"| {seed} | {aps} | {secs} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--results", default=DEFAULT_RESULTS, help="folder of the run JSONs and the summary")
    parser.add_argument("--work-root", default=DEFAULT_WORK_ROOT, help="MMDetection's work folders")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default: %(default)s)")
    parser.add_argument("--cfg-options", nargs="*", default=[], metavar="KEY=VALUE", help="passed to every run")
    args = parser.parse_args(argv)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    todo = [
        (arm, seed) for seed in args.seeds for arm in args.arms
        if finished(results / f"{arm}_seed{seed}.json", args.cfg_options) is None
    ]  # fmt: skip

    def job(arm_seed: tuple[str, int]) -> None:
        arm, seed = arm_seed
        print(f"run {arm} seed {seed}", file=sys.stderr, flush=True)
        record = run_one(arm, seed, args)
        write_json_atomic(results / f"{arm}_seed{seed}.json", record, indent=2)
        print(f"  {arm} seed {seed}: AP {100 * record['AP']:.1f} ({record['seconds']} s)", file=sys.stderr, flush=True)

    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        for future in [pool.submit(job, t) for t in todo]:
            future.result()
    runs = {arm: {} for arm in ARMS}
    for arm in ARMS:
        for seed in args.seeds:
            run = finished(results / f"{arm}_seed{seed}.json", args.cfg_options)
            if run is not None:
                runs[arm][seed] = run
    command = "python experiments/mmdet_atss_aquarium.py " + " ".join(sys.argv[1:] if argv is None else argv)
    markdown = summary_markdown(runs, args.seeds, command.strip())
    write_text_atomic(results / "summary.md", markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
