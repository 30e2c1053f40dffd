"""Training steps on the CPU with glibc's default allocator and with ``train.keep_freed_memory``.

mallopt is process-wide and one-way, so each setting runs in a fresh process (this module with
``--child``). Each child trains ``--steps`` steps of a config on the same first batches
(aspect-ratio grouped, as the runner batches them), after ``--warmup`` steps, and reports per-step
wall time, user and system CPU time, minor page faults and peak resident memory. The parent
alternates the two settings ``--repeats`` times (ABAB) and gives medians and the paired ratio.

    python -m benchmarks.bench_cpu_allocator --config configs/aquarium_fcos_atss_baseline.yaml --threads 1
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from benchmarks.common import add_common_args, write_json


def child(config: str, steps: int, warmup: int, keep: bool, threads: int | None) -> dict[str, float]:
    import torch

    from hcral.config import load_config
    from hcral.models.build import build_model
    from hcral.runner import ResumableSampler, SeededAugmentation, aspect_groups, build_splits, make_loader
    from hcral.utils import keep_freed_memory

    if threads:
        torch.set_num_threads(threads)
    if keep:
        keep_freed_memory()
    torch.manual_seed(0)
    cfg = load_config(config, ["data.num_workers=0"])
    train_set, _ = build_splits(cfg)
    model = build_model(cfg, train_set.num_classes).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    sampler = ResumableSampler(
        len(train_set), shuffle=True, groups=aspect_groups(train_set), batch_size=cfg.data.batch_size
    )
    batches = iter(make_loader(SeededAugmentation(train_set, 0), sampler, cfg.data.batch_size, 0))
    batches = [next(batches) for _ in range(warmup + steps)]

    def step(images, targets) -> None:
        loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for images, targets in batches[:warmup]:
        step(images, targets)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for images, targets in batches[warmup:]:
        step(images, targets)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {
        "wall_s": wall / steps,
        "user_s": (after.ru_utime - before.ru_utime) / steps,
        "sys_s": (after.ru_stime - before.ru_stime) / steps,
        "minor_faults": (after.ru_minflt - before.ru_minflt) / steps,
        "max_rss_mb": after.ru_maxrss / 1024,  # kilobytes on Linux
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--config", default="configs/aquarium_fcos_atss_baseline.yaml")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per process (default 8; --quick 2)")
    parser.add_argument("--child", choices=("default", "keep"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (2 if args.quick else 8)
    if args.child:
        print(json.dumps(child(args.config, steps, args.warmup, args.child == "keep", args.threads)))
        return
    repeats = args.repeats or (1 if args.quick else 3)
    rounds = []
    for _ in range(repeats):
        row = {}
        for setting in ("default", "keep"):
            cmd = [sys.executable, "-m", "benchmarks.bench_cpu_allocator", "--child", setting, "--config", args.config,
                   "--steps", str(steps), "--warmup", str(args.warmup)] + (["--threads", str(args.threads)] if args.threads else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            row[setting] = json.loads(out.strip().splitlines()[-1])
        rounds.append(row)
    summary = {
        setting: {k: statistics.median(r[setting][k] for r in rounds) for k in rounds[0][setting]}
        for setting in ("default", "keep")
    }
    summary["step_ratio_keep_over_default"] = statistics.median(r["keep"]["wall_s"] / r["default"]["wall_s"] for r in rounds)
    for setting in ("default", "keep"):
        s = summary[setting]
        print(f"{setting:8s} step {s['wall_s']:.3f} s (user {s['user_s']:.3f}, sys {s['sys_s']:.3f}), "
              f"{s['minor_faults']:.0f} minor faults/step, peak RSS {s['max_rss_mb']:.0f} MB")
    print(f"keep / default step time: {summary['step_ratio_keep_over_default']:.2f}x (median of {repeats} paired rounds)")
    write_json("cpu_allocator" + args.tag, {"config": args.config, "steps": steps, "rounds": rounds, "summary": summary}, args.out)


if __name__ == "__main__":
    main()
