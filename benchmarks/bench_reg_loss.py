"""Benchmark 2: regression loss, forward + backward, 3,000 positives (issue 6).

Contenders, each timed as ``loss = f(pred); loss.backward()`` on the same leaf ``pred (P, 4)``:

- ``giou``: :func:`hcral.losses.giou_loss` weighted by the centerness target h and divided by Σh,
  the way the ATSS / FCOS+ATSS heads call it;
- ``hcra_r``: :func:`hcral.losses.hcra_reg_loss` with h (γ = 0, the ATSS setting);
- ``hcra_r_gamma``: the same with γ = 0.5 (the RetinaNet setting: t = (1 - q + R)^γ is computed).

One call takes well under a millisecond, so every timed sample runs ``--inner`` calls in a loop.

    python -m benchmarks.bench_reg_loss
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import add_common_args, interleaved, median, paired_ratio, print_table, setup_threads, write_json
from hcral import losses as L

NUM_POSITIVES = 3_000
IMAGE_SIDE = 1000.0


def make_inputs(num: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """GT boxes, predictions around them (most overlapping, some far), scores and centerness weights."""
    gen = torch.Generator().manual_seed(seed)
    wh = torch.exp(torch.empty(num, 2).uniform_(2.5, 6.0, generator=gen))
    xy = torch.rand(num, 2, generator=gen) * (IMAGE_SIDE - wh)
    target = torch.cat((xy, xy + wh), dim=1)
    jitter = torch.randn(num, 4, generator=gen) * wh.repeat(1, 2) * 0.2
    pred = target + jitter
    pred = torch.cat((torch.minimum(pred[:, :2], pred[:, 2:]), torch.maximum(pred[:, :2], pred[:, 2:])), dim=1)
    scores = torch.rand(num, generator=gen)
    h = torch.rand(num, generator=gen)
    return {"pred": pred, "target": target, "scores": scores, "h": h}


def run(args: argparse.Namespace) -> dict:
    setup_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 15)
    inner = 10 if args.quick else args.inner
    inputs = make_inputs(args.positives)
    pred = inputs["pred"].clone().requires_grad_()
    target, scores, h = inputs["target"], inputs["scores"], inputs["h"]

    def looped(loss_fn):
        def run_inner() -> None:
            for _ in range(inner):
                pred.grad = None
                loss_fn().backward()

        return run_inner

    contenders = {
        "giou": looped(lambda: L.giou_loss(pred, target, weight=h, avg_factor=h.sum().clamp(min=1e-6))),
        "hcra_r": looped(lambda: L.hcra_reg_loss(pred, target, scores, h)),
        "hcra_r_gamma": looped(lambda: L.hcra_reg_loss(pred, target, scores, h, gamma=0.5)),
    }
    times = interleaved(contenders, repeats=repeats, warmup=args.warmup)
    rows, results = [], {}
    for name, ts in times.items():
        per_call = [t / inner for t in ts]
        ratio = paired_ratio(times, name, "giou")
        results[name] = {"median_s_per_call": median(per_call), "times_s_per_call": per_call, "vs_giou": ratio}
        rows.append([
            name, f"{median(per_call) * 1e6:.0f}", f"{ratio['median_of_round_ratios']:.2f}",
            f"{ratio['ratio_of_medians']:.2f}",
        ])  # fmt: skip
    print_table(
        f"regression loss fwd+bwd, P = {args.positives} positives, median of {repeats} rounds x {inner} calls",
        ["loss", "us/call", "x giou (paired)", "x giou (medians)"],
        rows,
    )
    payload = {
        "positives": args.positives, "repeats": repeats, "inner": inner, "warmup": args.warmup, "results": results,
    }  # fmt: skip
    write_json(f"reg_loss{args.tag}", payload, args.out)
    return payload


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--positives", type=int, default=NUM_POSITIVES)
    p.add_argument("--inner", type=int, default=50, help="calls per timed sample")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
