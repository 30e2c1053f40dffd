"""Diagnosis (issue 23): does a run repeat bit for bit, and does the CPU's kernel choice move it?

The same config, seed and thread count, trained for ``--iters`` iterations in fresh processes:
twice as is, then with the kernels a CPU without AVX-512 would run. ATen's vectorised kernels
(reductions, elementwise ops) are capped with ``ATEN_CPU_CAPABILITY=avx2``, oneDNN's convolutions
with ``ONEDNN_MAX_CPU_ISA=AVX2``. Per setting it prints the first iteration whose logged loss or
gradient norm differs from the first run's, and the largest relative difference over the
iterations. A rerun of a verdict run that does not repeat its AP (docs/results.md, the
consistency reruns) is explained by this if the second run repeats and the capped ones do not.

    python experiments/cpu_dispatch.py --iters 20 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from hcral.experiments.ablate import load_spec

# The verdict's HCRA-R cell at seed 0, whose rerun missed its original's AP.
SPEC, CELL = "experiments/verdict5_6x_batch16_fcos_atss_aquarium.yaml", "6x_batch16/hcra_r"

SETTINGS: dict[str, dict[str, str]] = {
    "as is": {},
    "as is, again": {},
    "ATen AVX2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "oneDNN AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "both AVX2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}
KEYS = ("loss", "grad_norm")  # grad_norm is logged where train.grad_clip is set


def train_log(config: str, sets: list[str], iters: int, threads: int, env: dict[str, str], out: Path) -> list[dict]:
    """Train ``iters`` iterations into ``out`` under ``env``; its log.jsonl's per-iteration records."""
    args = [sys.executable, "-m", "hcral", "train", config, "--out", str(out), "--no-progress"]
    for s in [*sets, f"train.max_iters={iters}", "train.log_interval=1", "train.eval_interval=0"]:
        args += ["--set", s]
    full_env = {**os.environ, "OMP_NUM_THREADS": str(threads), **env}
    subprocess.run(args, env=full_env, check=True, stdout=subprocess.DEVNULL)
    lines = (out / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "iter" in r and "loss" in r]


def compare(ref: list[dict], other: list[dict]) -> tuple[int | None, float]:
    """(first iteration whose KEYS differ, largest relative difference of KEYS over the iterations)."""
    first, worst = None, 0.0
    for a, b in zip(ref, other, strict=True):
        for k in (k for k in KEYS if k in a):
            if a[k] != b[k]:
                first = a["iter"] if first is None else first
                worst = max(worst, abs(a[k] - b[k]) / abs(a[k]))
    return first, worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=SPEC, help="an hcral ablate SPEC")
    p.add_argument("--cell", default=CELL, help="one of its cells")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="run folders (default: a temporary folder)")
    a = p.parse_args()
    spec = load_spec(a.spec)
    try:
        cell = spec.cell(a.cell)
    except ValueError as e:
        p.error(f"--cell: {e}")
    sets = [*spec.base_overrides, *cell.overrides, f"train.seed={a.seed}"]
    out = a.out or Path(tempfile.mkdtemp(prefix="hcral_cpu_dispatch_"))
    print(f"{a.spec} {a.cell} seed {a.seed}, {a.iters} iterations, {a.threads} thread(s), ATen here (uncapped) {torch.backends.cpu.get_cpu_capability()}")
    print("\n| setting | first differing iteration | max relative difference (loss, grad norm) |\n|---|---|---|")
    ref = None
    for i, (name, env) in enumerate(SETTINGS.items()):
        log = train_log(spec.base_config, sets, a.iters, a.threads, env, out / f"run{i}")
        if ref is None:
            ref = log
            continue
        first, worst = compare(ref, log)
        print(f"| {name} | {'none' if first is None else first} | {worst:.1e} |", flush=True)


if __name__ == "__main__":
    main()
