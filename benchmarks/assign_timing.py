"""Per-image timings of the assigners (issue 3): ATSS and EATSS for N ~ 20,000 priors and
M in {1, 10, 100, 500} GTs, median of repeats; the batched form against a per-image loop; and,
with ``--memory``, the peak memory of a crowded image (M = 1000 GTs, N ~ 200,000 priors).

    OMP_NUM_THREADS=1 python benchmarks/assign_timing.py --threads 1
    python benchmarks/assign_timing.py --device cuda --memory

Priors: the ATSS layout (one square anchor of side 8·s per location, s = 8..128, centres (x·s, y·s))
of a 960x1000 image (N = 20,044). GTs: random boxes inside the image, sides log-uniform in
[16, 512] px. EATSS predictions: each prior's box pulled a random fraction toward a random GT,
scores uniform over 80 classes (many priors pass the IoU gate, a pessimistic load).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from hcral.assign import atss_assign, atss_assign_batched, eatss_assign, eatss_assign_batched

STRIDES = (8, 16, 32, 64, 128)
NUM_CLASSES = 80


def atss_layout(height: int, width: int, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    boxes, sizes = [], []
    for s in STRIDES:
        h, w = math.ceil(height / s), math.ceil(width / s)
        ys, xs = torch.meshgrid(torch.arange(h) * float(s), torch.arange(w) * float(s), indexing="ij")
        c = torch.stack((xs.reshape(-1), ys.reshape(-1)), -1)
        boxes.append(torch.cat((c - 4 * s, c + 4 * s), -1))
        sizes.append(h * w)
    return torch.cat(boxes).to(device), sizes


def random_gts(m: int, height: int, width: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    side = torch.exp(torch.empty(m, 2).uniform_(math.log(16), math.log(512), generator=gen))
    side = torch.minimum(side, torch.tensor([width - 1.0, height - 1.0]))
    x1 = torch.rand(m, generator=gen) * (width - side[:, 0])
    y1 = torch.rand(m, generator=gen) * (height - side[:, 1])
    return torch.stack((x1, y1, x1 + side[:, 0], y1 + side[:, 1]), -1).to(device)


def predictions(priors: torch.Tensor, gts: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    n = priors.shape[0]
    target = gts.cpu()[torch.randint(0, gts.shape[0], (n,), generator=gen)].to(priors.device)
    t = torch.rand(n, 1, generator=gen).to(priors.device)
    boxes = priors + t * (target - priors)
    scores = torch.rand(n, NUM_CLASSES, generator=gen).to(priors.device)
    return boxes, scores


def median_ms(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def per_image(args, device: torch.device) -> None:
    gen = torch.Generator().manual_seed(0)
    priors, sizes = atss_layout(960, 1000, device)
    n = priors.shape[0]
    print(f"per image, N = {n} priors, {args.repeats} repeats (median ms), device {device}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'M':>5} {'ATSS':>10} {'EATSS':>10} {'ATSS pos':>9} {'extras':>7}")
    for m in args.gts:
        gts = random_gts(m, 960, 1000, gen, device)
        labels = torch.randint(0, NUM_CLASSES, (m,), generator=gen).to(device)
        boxes, scores = predictions(priors, gts, gen)
        t_atss = median_ms(lambda: atss_assign(priors, sizes, gts, labels), device, args.repeats)
        t_eatss = median_ms(
            lambda: eatss_assign(priors, sizes, gts, labels, pred_boxes=boxes, pred_scores=scores), device, args.repeats
        )
        a = eatss_assign(priors, sizes, gts, labels, pred_boxes=boxes, pred_scores=scores)
        extras = int(a.expanded.sum())
        print(f"{m:>5} {t_atss:>10.2f} {t_eatss:>10.2f} {a.num_pos - extras:>9} {extras:>7}")


def batched(args, device: torch.device) -> None:
    gen = torch.Generator().manual_seed(1)
    priors, sizes = atss_layout(960, 1000, device)
    b, m = args.batch, args.batch_gts
    gts = torch.stack([random_gts(m, 960, 1000, gen, device) for _ in range(b)])
    labels = torch.randint(0, NUM_CLASSES, (b, m), generator=gen).to(device)
    preds = [predictions(priors, gts[i], gen) for i in range(b)]
    pboxes, pscores = torch.stack([p[0] for p in preds]), torch.stack([p[1] for p in preds])
    print(f"batch B = {b}, M = {m} per image, N = {priors.shape[0]}: median ms per batch")
    for name, single, many, kw in [
        ("ATSS", atss_assign, atss_assign_batched, [{} for _ in range(b)]),
        ("EATSS", eatss_assign, eatss_assign_batched,
         [{"pred_boxes": pboxes[i], "pred_scores": pscores[i]} for i in range(b)]),
    ]:
        loop = median_ms(
            lambda: [single(priors, sizes, gts[i], labels[i], **kw[i]) for i in range(b)], device, args.repeats
        )
        bkw = {} if name == "ATSS" else {"pred_boxes": pboxes, "pred_scores": pscores}
        one = median_ms(lambda: many(priors, sizes, gts, labels, **bkw), device, args.repeats)
        print(f"  {name:<6} per-image loop {loop:9.2f}   batched {one:9.2f}   speed-up x{loop / one:.2f}")


def _vm_hwm_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def memory(args, device: torch.device) -> None:
    """Peak memory of one crowded image: M = 1000 GTs against N ~ 200k priors (issue 6's target)."""
    gen = torch.Generator().manual_seed(2)
    priors, sizes = atss_layout(3000, 3200, device)
    gts = random_gts(1000, 3000, 3200, gen, device)
    labels = torch.randint(0, NUM_CLASSES, (1000,), generator=gen).to(device)
    boxes, scores = predictions(priors, gts, gen)
    mp = args.max_pairs
    for name, fn in [
        ("ATSS", lambda: atss_assign(priors, sizes, gts, labels, max_pairs=mp)),
        ("EATSS", lambda: eatss_assign(priors, sizes, gts, labels, pred_boxes=boxes, pred_scores=scores, max_pairs=mp)),
    ]:
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
                f.write("5")
            base = _vm_hwm_kb()
            t0 = time.perf_counter()
            fn()
            peak = (_vm_hwm_kb() - base) / 1024
        dt = time.perf_counter() - t0
        print(f"crowded image N = {priors.shape[0]}, M = 1000, max_pairs {mp or 'default'}: "
              f"{name} peak +{peak:.0f} MiB over inputs, {dt:.2f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--gts", type=int, nargs="+", default=[1, 10, 100, 500])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batch-gts", type=int, default=20)
    p.add_argument("--no-batched", action="store_true")
    p.add_argument("--memory", action="store_true", help="measure a crowded image (N ~ 200k, M = 1000) first")
    p.add_argument("--max-pairs", type=int, default=None, help="pair budget for --memory (default: the device's)")
    p.add_argument("--memory-only", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory or args.memory_only:  # first, before other runs leave freed memory in the allocator
        memory(args, device)
    if args.memory_only:
        return
    per_image(args, device)
    if not args.no_batched:
        batched(args, device)


if __name__ == "__main__":
    main()
