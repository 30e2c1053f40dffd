"""Benchmark 3: label assignment, ATSS and EATSS, per image and batched, time and peak memory (issue 6).

Replaces the assigner author's ``benchmarks/assign_timing.py`` (same prior layout and scenes).

Scenes: the ATSS prior layout (one square anchor of side 8·s per location, strides 8..128, centres
``(x·s, y·s)``) of an image sized to give N priors (960x1000 -> N = 20,044; 2200x2200 -> 100,979;
3000x3200 -> 199,950). GTs: random boxes inside the image, sides log-uniform in [16, 512] px,
classes uniform over 80. EATSS predictions: every prior's box pulled a random fraction toward a
random GT and uniform scores (many priors pass the IoU gate: a pessimistic load).

Contenders:

- ``atss`` / ``eatss``: :func:`hcral.assign.atss_assign` / ``eatss_assign``, one image;
- ``atss_batched`` / ``eatss_batched``: the batched forms on B images at once;
- ``*_loop``: the per-image functions in a Python loop over the B images;
- ``mmdet_ref``: :func:`benchmarks.mmdet_style.mmdet_style_atss`, a straightforward per-image
  ATSS in MMDetection's style (dense (N, M) IoU and distances), looped over the B images;
- ``mmdet_ref_eatss``: :func:`benchmarks.mmdet_style.mmdet_style_eatss`, the same dense style for
  EATSS (which MMDetection does not have). EATSS is also compared with the ATSS reference, which does
  less work (the conservative ratio).

Peak memory: each measured call runs alone in a fresh subprocess (so no earlier allocation is
reused); after its inputs are built the process resets its resident-set high-water mark
(``/proc/self/clear_refs``), runs the call once, and reports ``VmHWM - VmRSS_before``: the extra
resident memory the call needed at its peak. Where ``clear_refs`` is unavailable it falls back to
``resource.getrusage`` max RSS minus the RSS before the call (the same quantity, as long as building
the inputs did not peak higher).

    python -m benchmarks.bench_assign            # the issue's grid (a few minutes)
    python -m benchmarks.bench_assign --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from benchmarks.common import (
    add_common_args, extra_peak_rss, interleaved, median, paired_ratio, print_table, setup_threads, write_json,
)
from benchmarks.mmdet_style import mmdet_style_atss, mmdet_style_eatss
from hcral.assign import atss_assign, atss_assign_batched, eatss_assign, eatss_assign_batched

STRIDES = (8, 16, 32, 64, 128)
NUM_CLASSES = 80
GT_SIDE_RANGE = (16.0, 512.0)
# Image sizes (height, width) giving about N priors in the ATSS layout.
IMAGE_FOR_PRIORS = {
    5_000: (480, 500),
    20_000: (960, 1000),
    50_000: (1500, 1600),
    100_000: (2200, 2200),
    200_000: (3000, 3200),
}
# A round (every contender once) slower than this is timed once after its warm-up (far above timer
# noise); faster rounds are repeated for about FAST_ROUNDS_BUDGET_S, at most MAX_ROUNDS times.
SLOW_CALL_S = 2.0
FAST_ROUNDS_BUDGET_S = 0.5
MAX_ROUNDS = 25


# ---------------------------------------------------------------------------------------------
# scenes
# ---------------------------------------------------------------------------------------------


def atss_layout(height: int, width: int) -> tuple[torch.Tensor, list[int]]:
    """ATSS anchors ``(N, 4)`` (side 8·stride, centred on ``(x·s, y·s)``) and the per-level counts."""
    boxes, sizes = [], []
    for s in STRIDES:
        h, w = math.ceil(height / s), math.ceil(width / s)
        ys, xs = torch.meshgrid(torch.arange(h) * float(s), torch.arange(w) * float(s), indexing="ij")
        c = torch.stack((xs.reshape(-1), ys.reshape(-1)), -1)
        boxes.append(torch.cat((c - 4 * s, c + 4 * s), -1))
        sizes.append(h * w)
    return torch.cat(boxes), sizes


def random_gts(m: int, height: int, width: int, gen: torch.Generator) -> torch.Tensor:
    lo, hi = GT_SIDE_RANGE
    side = torch.exp(torch.empty(m, 2).uniform_(math.log(lo), math.log(hi), generator=gen))
    side = torch.minimum(side, torch.tensor([width - 1.0, height - 1.0]))
    x1 = torch.rand(m, generator=gen) * (width - side[:, 0])
    y1 = torch.rand(m, generator=gen) * (height - side[:, 1])
    return torch.stack((x1, y1, x1 + side[:, 0], y1 + side[:, 1]), -1)


def predictions(priors: torch.Tensor, gts: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted boxes (each prior pulled a random fraction toward a random GT) and uniform scores."""
    n = priors.shape[0]
    target = gts[torch.randint(0, gts.shape[0], (n,), generator=gen)]
    frac = torch.rand(n, 1, generator=gen)
    return priors + frac * (target - priors), torch.rand(n, NUM_CLASSES, generator=gen)


def scene(priors_target: int, m: int, images: int, *, seed: int) -> dict:
    """``images`` images of M GTs each on the layout of about ``priors_target`` priors."""
    gen = torch.Generator().manual_seed(seed)
    height, width = IMAGE_FOR_PRIORS[priors_target]
    priors, sizes = atss_layout(height, width)
    gts = torch.stack([random_gts(m, height, width, gen) for _ in range(images)])  # (B, M, 4)
    labels = torch.randint(0, NUM_CLASSES, (images, m), generator=gen)
    preds = [predictions(priors, gts[i], gen) for i in range(images)]
    return {
        "priors": priors,
        "sizes": sizes,
        "gts": gts,
        "labels": labels,
        "pred_boxes": torch.stack([p[0] for p in preds]),
        "pred_scores": torch.stack([p[1] for p in preds]),
    }


def calls(s: dict) -> dict[str, Callable[[], object]]:
    """Every contender on scene ``s`` (per-image ones on image 0, loops and batched on all B)."""
    p, sz, g, lab, pb, ps = s["priors"], s["sizes"], s["gts"], s["labels"], s["pred_boxes"], s["pred_scores"]
    b = g.shape[0]
    return {
        "atss": lambda: atss_assign(p, sz, g[0], lab[0]),
        "eatss": lambda: eatss_assign(p, sz, g[0], lab[0], pred_boxes=pb[0], pred_scores=ps[0]),
        "mmdet_ref": lambda: mmdet_style_atss(p, sz, g[0]),
        "mmdet_ref_eatss": lambda: mmdet_style_eatss(p, sz, g[0], lab[0], pb[0], ps[0]),
        "atss_batched": lambda: atss_assign_batched(p, sz, g, lab),
        "eatss_batched": lambda: eatss_assign_batched(p, sz, g, lab, pred_boxes=pb, pred_scores=ps),
        "atss_loop": lambda: [atss_assign(p, sz, g[i], lab[i]) for i in range(b)],
        "eatss_loop": lambda: [
            eatss_assign(p, sz, g[i], lab[i], pred_boxes=pb[i], pred_scores=ps[i]) for i in range(b)
        ],
        "mmdet_ref_loop": lambda: [mmdet_style_atss(p, sz, g[i]) for i in range(b)],
        "mmdet_ref_eatss_loop": lambda: [mmdet_style_eatss(p, sz, g[i], lab[i], pb[i], ps[i]) for i in range(b)],
    }


# ---------------------------------------------------------------------------------------------
# peak memory, one call per fresh subprocess
# ---------------------------------------------------------------------------------------------


def _memory_child(name: str, priors: int, m: int, images: int, threads: int | None) -> None:
    """Runs in the subprocess: build the scene, reset the high-water mark, run ``name`` once."""
    setup_threads(threads)
    fn = calls(scene(priors, m, images, seed=7))[name]
    print(json.dumps(extra_peak_rss(fn)))


def peak_memory(name: str, priors: int, m: int, images: int = 1, threads: int | None = None) -> dict:
    """Extra peak resident memory (MiB) of one call of contender ``name``, in a fresh process."""
    cmd = [sys.executable, "-m", "benchmarks.bench_assign", "--memory-child", name, str(priors), str(m), str(images)]
    if threads:
        cmd += ["--threads", str(threads)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------


def time_group(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Interleaved times after ``warmup`` calls of each. A group whose round takes over SLOW_CALL_S is
    timed once; a fast one gets more rounds (up to FAST_ROUNDS_BUDGET_S of rounds, at most MAX_ROUNDS),
    since millisecond calls are at the mercy of the shared machine's scheduler."""
    start = time.perf_counter()
    for fn in fns.values():
        for _ in range(max(warmup, 1)):
            fn()
    round_s = (time.perf_counter() - start) / max(warmup, 1)
    if round_s > SLOW_CALL_S:
        rounds = 1
    else:
        rounds = max(repeats, min(MAX_ROUNDS, int(FAST_ROUNDS_BUDGET_S / max(round_s, 1e-6))))
    return interleaved(fns, repeats=rounds, warmup=0)


def run(args: argparse.Namespace) -> dict:
    setup_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 3)
    priors_grid = [20_000] if args.quick else args.priors
    gts_grid = [1, 10, 100] if args.quick else args.gts

    # Per image: time of one call, N x M grid.
    per_image, rows = [], []
    for n in priors_grid:
        for m in gts_grid:
            s = scene(n, m, 1, seed=0)
            c = calls(s)
            fns = {k: c[k] for k in ("atss", "eatss")}
            if n * m <= args.max_ref_pairs:
                fns["mmdet_ref"] = c["mmdet_ref"]
                fns["mmdet_ref_eatss"] = c["mmdet_ref_eatss"]
            times = time_group(fns, repeats, args.warmup)
            med = {k: median(v) for k, v in times.items()}
            per_image.append({"priors": s["priors"].shape[0], "gts": m, "times_s": times, "median_s": med})
            ref, ref_e = med.get("mmdet_ref"), med.get("mmdet_ref_eatss")
            rows.append([
                s["priors"].shape[0], m, f"{med['atss'] * 1e3:.1f}", f"{med['eatss'] * 1e3:.1f}",
                f"{ref * 1e3:.1f}" if ref else "skipped", f"{ref_e * 1e3:.1f}" if ref_e else "skipped",
                f"{ref / med['atss']:.1f}" if ref else "-", f"{ref_e / med['eatss']:.1f}" if ref_e else "-",
            ])  # fmt: skip
    print_table(
        f"assignment per image (ms, median of up to {repeats} rounds, more for fast calls; references "
        f"skipped above {args.max_ref_pairs:.0e} pairs)",
        ["N", "M", "ATSS", "EATSS", "ref ATSS", "ref EATSS", "ref/ATSS", "ref/EATSS"],
        rows,
    )

    # Batched, B images: batched forms vs the per-image reference and vs our own per-image loop.
    batched, rows = [], []
    b = args.batch
    for m in args.batch_gts if not args.quick else gts_grid:
        s = scene(args.batch_priors, m, b, seed=1)
        c = calls(s)
        names = ["atss_batched", "eatss_batched", "atss_loop", "eatss_loop", "mmdet_ref_loop", "mmdet_ref_eatss_loop"]
        times = time_group({k: c[k] for k in names}, repeats, args.warmup)

        def speedup(fast: str, slow: str) -> float:
            return 1 / paired_ratio(times, fast, slow)["median_of_round_ratios"]

        entry = {
            "priors": s["priors"].shape[0], "gts_per_image": m, "images": b, "times_s": times,
            "median_s": {k: median(v) for k, v in times.items()},
            "speedup_vs_mmdet_ref": {
                "atss_batched": speedup("atss_batched", "mmdet_ref_loop"),
                "eatss_batched": speedup("eatss_batched", "mmdet_ref_eatss_loop"),
                "eatss_batched_vs_atss_ref": speedup("eatss_batched", "mmdet_ref_loop"),
            },
            "speedup_vs_own_loop": {
                "atss": speedup("atss_batched", "atss_loop"), "eatss": speedup("eatss_batched", "eatss_loop"),
            },
        }  # fmt: skip
        batched.append(entry)
        med, up = entry["median_s"], entry["speedup_vs_mmdet_ref"]
        rows.append([
            m, *(f"{med[k] * 1e3:.1f}" for k in names), f"{up['atss_batched']:.1f}x", f"{up['eatss_batched']:.1f}x",
            f"{up['eatss_batched_vs_atss_ref']:.1f}x",
            f"{entry['speedup_vs_own_loop']['atss']:.2f}x", f"{entry['speedup_vs_own_loop']['eatss']:.2f}x",
        ])  # fmt: skip
    print_table(
        f"assignment, batch of B = {b} images, N = {batched[0]['priors']} (ms per batch, median of up to {repeats})",
        ["M/img", "ATSS batched", "EATSS batched", "ATSS loop", "EATSS loop", "ref ATSS loop", "ref EATSS loop",
         "ATSS b./ref", "EATSS b./ref", "EATSS b./ref ATSS", "ATSS b./loop", "EATSS b./loop"],
        rows,
    )  # fmt: skip

    # Peak memory, fresh subprocess per call.
    memory, rows = [], []
    mem_grid = [(20_000, 100), (20_000, 1000)] if args.quick else args.memory_grid
    for n, m in mem_grid:
        for name in ("atss", "eatss", "mmdet_ref", "mmdet_ref_eatss"):
            if name.startswith("mmdet_ref") and n * m > args.max_ref_memory_pairs:
                continue
            r = peak_memory(name, n, m, threads=args.threads)
            memory.append({"name": name, "priors_target": n, "gts": m, **r})
            rows.append([name, n, m, f"{r['extra_peak_mib']:.0f}", f"{r['seconds']:.2f}"])
    print_table(
        "peak memory of one call (extra resident MiB over the inputs, fresh process each)",
        ["assigner", "N", "M", "peak MiB", "s"],
        rows,
    )
    payload = {
        "repeats": repeats,
        "warmup": args.warmup,
        "per_image": per_image,
        "batched": batched,
        "memory": memory,
        "memory_method": "fresh subprocess per call; /proc/self/clear_refs then VmHWM - VmRSS before the call",
    }
    write_json(f"assign{args.tag}", payload, args.out)
    return payload


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--priors", type=int, nargs="+", default=[20_000, 100_000], choices=sorted(IMAGE_FOR_PRIORS))
    p.add_argument("--gts", type=int, nargs="+", default=[1, 10, 100, 500, 1000])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batch-priors", type=int, default=20_000, choices=sorted(IMAGE_FOR_PRIORS))
    p.add_argument("--batch-gts", type=int, nargs="+", default=[1, 10, 100, 500], help="M per image, batched runs")
    p.add_argument(
        "--max-ref-pairs", type=float, default=2e7,
        help="skip the dense reference in the per-image grid above N·M pairs (it takes ~20 s at 1e8)",
    )  # fmt: skip
    p.add_argument("--max-ref-memory-pairs", type=float, default=2.1e7, help="same, for the memory runs")
    p.add_argument(
        "--memory-grid", type=lambda s: tuple(int(v) for v in s.split("x")), nargs="+",
        default=[(20_000, 100), (20_000, 1000), (100_000, 100), (100_000, 1000), (200_000, 1000)],
        help="NxM pairs for the peak-memory runs, e.g. 200000x1000",
    )  # fmt: skip
    p.add_argument("--memory-child", nargs=4, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.memory_child:
        name, n, m, images = args.memory_child
        _memory_child(name, int(n), int(m), int(images), args.threads)
        return None
    return run(args)


if __name__ == "__main__":
    main()
