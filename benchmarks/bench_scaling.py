"""Benchmark 5: how the time of benchmarks 1 and 3 grows with N and M, on a log-log plot (issue 6).

Three sweeps, each contender timed as in the other benchmarks (interleaved, median of repeats):

- classification loss fwd+bwd against the number of elements (B = 16 images, C = 80, priors per
  image from 1,250 to 20,000): focal, HCRA-C (eager) and the fused path when available;
- assignment of one image against M (N = 20,000 priors, M from 1 to 1,000 GTs): ATSS, EATSS and
  the MMDetection-style dense reference;
- assignment of one image against N (M = 100 GTs, N from 5,000 to 200,000 priors): the same three.

A least-squares line through ``log t = a + s log x`` gives the growth exponent s (s = 1: linear).
It is fitted on the upper half of each sweep, where fixed per-call costs no longer dominate, and on
all points. The plot goes to ``docs/img/scaling.png``.

    python -m benchmarks.bench_scaling
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from benchmarks import bench_assign, bench_cls_loss
from benchmarks.common import add_common_args, interleaved, median, print_table, setup_threads, write_json

PLOT_PATH = Path(__file__).resolve().parent.parent / "docs" / "img" / "scaling.png"


def fit_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    var = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / var if var > 0 else float("nan")


def slopes(xs: list[float], series: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    half = len(xs) // 2
    return {
        name: {"all_points": fit_slope(xs, ys), "upper_half": fit_slope(xs[half:], ys[half:])}
        for name, ys in series.items()
    }


def cls_sweep(priors_grid: list[int], repeats: int, warmup: int, fused: bool) -> dict:
    images = 16
    xs, series = [], {}
    for priors in priors_grid:
        inputs = bench_cls_loss.make_inputs(images, priors)
        contenders, _ = bench_cls_loss.make_contenders(inputs, fused=fused)
        keep = {k: v for k, v in contenders.items() if k in ("focal", "hcra_c", "hcra_c_fused")}
        times = interleaved(keep, repeats=repeats, warmup=warmup)
        xs.append(images * priors * bench_cls_loss.NUM_CLASSES)
        for name, ts in times.items():
            series.setdefault(name, []).append(median(ts))
        del inputs, contenders, keep
    return {"x": xs, "x_name": "elements (B x N x C)", "median_s": series, "slopes": slopes(xs, series)}


def assign_sweep(points: list[tuple[int, int]], x_of: str, repeats: int, warmup: int, max_ref_pairs: float) -> dict:
    xs, series = [], {}
    for n, m in points:
        s = bench_assign.scene(n, m, 1, seed=0)
        c = bench_assign.calls(s)
        fns = {k: c[k] for k in ("atss", "eatss")}
        if s["priors"].shape[0] * m <= max_ref_pairs:
            fns["mmdet_ref"] = c["mmdet_ref"]
        times = bench_assign.time_group(fns, repeats, warmup)
        xs.append(s["priors"].shape[0] if x_of == "N" else m)
        for name in ("atss", "eatss", "mmdet_ref"):
            series.setdefault(name, []).append(median(times[name]) if name in times else float("nan"))
    fits = {}
    for name, ys in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if not math.isnan(y)]
        fits[name] = slopes([p[0] for p in pts], {name: [p[1] for p in pts]})[name] if len(pts) > 1 else {}
    return {"x": xs, "x_name": x_of, "median_s": series, "slopes": fits}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    panels = [
        ("cls_loss", "classification loss fwd+bwd\n(B=16, C=80)", "elements"),
        ("assign_vs_m", "assignment, one image\n(N = 20,044 priors)", "M (GTs)"),
        ("assign_vs_n", "assignment, one image\n(M = 100 GTs)", "N (priors)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for ax, (key, title, xlabel) in zip(axes, panels):
        sweep = results[key]
        xs = sweep["x"]
        for name, ys in sweep["median_s"].items():
            pts = [(x, y) for x, y in zip(xs, ys) if not math.isnan(y)]
            if not pts:
                continue
            s = sweep["slopes"].get(name, {}).get("upper_half", float("nan"))
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{name} (slope {s:.2f})")
        # A slope-1 guide through the first point of the first series.
        first = next(iter(sweep["median_s"].values()))
        ax.loglog([xs[0], xs[-1]], [first[0], first[0] * xs[-1] / xs[0]], "k:", lw=1, label="linear (slope 1)")
        ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: minor ones overlap
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds (median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    machine = results.get("machine", {})  # present when redrawn from a JSON
    threads = machine.get("torch_threads", torch.get_num_threads())
    fig.suptitle(f"hcral scaling on CPU ({threads} thread(s), torch {machine.get('torch_version', torch.__version__)})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def run(args: argparse.Namespace) -> dict:
    if args.replot:  # redraw the plot from a saved JSON, measuring nothing
        plot(json.loads(args.replot.read_text()), args.plot)
        return {}
    setup_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 3)
    cls_grid = [1_250, 5_000] if args.quick else [1_250, 2_500, 5_000, 10_000, 20_000]
    m_grid = [1, 10, 100] if args.quick else [1, 3, 10, 30, 100, 300, 1000]
    n_grid = [5_000, 20_000] if args.quick else [5_000, 20_000, 50_000, 100_000, 200_000]
    results = {
        "cls_loss": cls_sweep(cls_grid, repeats, args.warmup, fused=not args.no_fused),
        "assign_vs_m": assign_sweep([(20_000, m) for m in m_grid], "M", repeats, args.warmup, args.max_ref_pairs),
        "assign_vs_n": assign_sweep([(n, 100) for n in n_grid], "N", repeats, args.warmup, args.max_ref_pairs),
    }
    for key, sweep in results.items():
        names = list(sweep["median_s"])
        rows = [[x, *(f"{sweep['median_s'][k][i] * 1e3:.2f}" for k in names)] for i, x in enumerate(sweep["x"])]
        for fit in ("upper_half", "all_points"):
            rows.append([f"slope ({fit})", *(f"{sweep['slopes'][k].get(fit, float('nan')):.2f}" for k in names)])
        print_table(f"{key}: ms against {sweep['x_name']}", [sweep["x_name"], *names], rows)
    if not args.no_plot:
        plot(results, args.plot)
    payload = {"repeats": repeats, "warmup": args.warmup, **results, "plot": str(args.plot)}
    write_json(f"scaling{args.tag}", payload, args.out)
    return payload


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--plot", type=Path, default=PLOT_PATH)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-fused", action="store_true", help="skip the torch.compile path")
    p.add_argument("--max-ref-pairs", type=float, default=2.1e7, help="skip the dense reference above N·M pairs")
    p.add_argument("--replot", type=Path, default=None, help="only redraw the plot from this scaling JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
