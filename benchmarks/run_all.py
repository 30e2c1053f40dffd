"""Run every benchmark of issues 6, 10 and 22, each in its own process, and write their JSON to benchmarks/results/.

    python -m benchmarks.run_all                 # the documented full run (about 18 min on 2 cores)
    python -m benchmarks.run_all --quick         # smoke run, about 4 min
    python -m benchmarks.run_all --only cls_loss assign

Threads: 1 by default (``--threads``). On this shared 2-core machine a second OpenMP thread that
waits for a core another job holds makes timings erratic; one thread gives stable ratios. Pass
``--threads 2`` to use both cores.

Each benchmark also runs alone: ``python -m benchmarks.bench_cls_loss --help`` and so on.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = {
    "cls_loss": "benchmarks.bench_cls_loss",
    "reg_loss": "benchmarks.bench_reg_loss",
    "assign": "benchmarks.bench_assign",
    "train_step": "benchmarks.bench_train_step",
    "scaling": "benchmarks.bench_scaling",
    "before_after": "benchmarks.bench_before_after",
    "detectors": "benchmarks.bench_detectors",
    "cpu_allocator": "benchmarks.bench_cpu_allocator",
    "amp": "benchmarks.bench_amp",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=None)
    p.add_argument("--tag", default="", help="suffix of every JSON name, e.g. _before")
    p.add_argument(
        "--no-extras", action="store_true",
        help="skip the two extra classification-loss runs (THP_MEM_ALLOC_ENABLE=1 huge-page allocations; 2 threads)",
    )  # fmt: skip
    args = p.parse_args(argv)

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    common = ["--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    runs = [(name, BENCHMARKS[name], args.tag, {}, common) for name in (args.only or BENCHMARKS)]
    if not args.no_extras and (args.only is None or "cls_loss" in args.only):
        # The same benchmark with huge-page allocations (PyTorch's THP_MEM_ALLOC_ENABLE), and on 2 threads.
        runs.append(("cls_loss", BENCHMARKS["cls_loss"], f"{args.tag}_thp", {"THP_MEM_ALLOC_ENABLE": "1"}, common))
        two = ["--threads", "2"] + (["--quick"] if args.quick else [])
        runs.append(("cls_loss", BENCHMARKS["cls_loss"], f"{args.tag}_2threads", {"OMP_NUM_THREADS": "2"}, two))
    start = time.perf_counter()
    failed = []
    for name, module, tag, extra_env, flags in runs:
        cmd = [sys.executable, "-m", module, *flags] + (["--tag", tag] if tag else [])
        print(f"\n=== {name}: {' '.join(cmd[1:])} {extra_env or ''}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call(cmd, cwd=ROOT, env={**env, **extra_env})
        print(f"=== {name} done in {time.perf_counter() - t0:.0f} s (exit {code})", flush=True)
        if code:
            failed.append(name)
    print(f"\nall benchmarks: {time.perf_counter() - start:.0f} s; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
