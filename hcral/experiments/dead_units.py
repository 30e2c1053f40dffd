"""Dead ReLUs in a trained head: how a classification tower without normalisation collapses.

``python -m hcral.experiments.dead_units RUN [RUN ...] [--images N]`` loads each run's checkpoint
(as ``hcral analyze`` does), feeds the first N validation images through the model, and reports:

- **dead fraction** of each tower (classification, box regression): the share of the outputs of
  the tower's *last* ReLU that are exactly 0, over every FPN level, image, channel and position.
  At 1.0 the classifier's input is all zeros, so every prior of every image gets the same logit
  (the classifier's bias) and the detector ranks nothing;
- **FPN mean |x|** per level: the magnitude of what the towers receive.

One Markdown row per run; for an ablation's ``<cell>/seed<k>`` folders, a second table with the
mean ± standard deviation per cell. It measures what docs/results.md section 10f reports for
RetinaNet, whose head has no GroupNorm (MMDetection's RetinaNet head has none either).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from hcral.experiments import stats
from hcral.experiments.analyze import cells_and_seeds, load_run
from hcral.models.detector import Detector

__all__ = ["dead_fractions", "dead_units_run", "main"]

DEFAULT_IMAGES = 16  # enough for a stable share: every image adds ~10^5-10^6 tower outputs


def _last_relu(tower: nn.Sequential) -> nn.ReLU:
    relus = [m for m in tower if isinstance(m, nn.ReLU)]
    if not relus:
        raise ValueError("the tower has no ReLU")
    return relus[-1]


@torch.no_grad()
def dead_fractions(model: Detector, images: Tensor) -> dict[str, float | list[float]]:
    """Dead fraction of each tower's last ReLU and the FPN's mean |x| per level on ``images``
    (N, 3, H, W), in eval mode."""
    counts = {"cls": [0, 0], "reg": [0, 0]}  # [zeros, elements]

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            counts[name][0] += int((output == 0).sum())
            counts[name][1] += output.numel()

        return record

    handles = [
        _last_relu(model.head.cls_tower).register_forward_hook(hook("cls")),
        _last_relu(model.head.reg_tower).register_forward_hook(hook("reg")),
    ]
    was_training = model.training
    model.eval()
    try:
        feats = model.neck(model.backbone(images))
        model.head(feats)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {
        "cls_dead": counts["cls"][0] / counts["cls"][1],
        "reg_dead": counts["reg"][0] / counts["reg"][1],
        "fpn_abs_mean": [float(f.abs().mean()) for f in feats],
    }


def dead_units_run(run_dir: str | Path, *, images: int = DEFAULT_IMAGES, overrides: Sequence[str] = ()) -> dict:
    """:func:`dead_fractions` of the run in ``run_dir`` (``config.yaml`` + ``checkpoint.pt``) on the
    first ``images`` images of its validation set (:func:`hcral.experiments.analyze.load_run`)."""
    from hcral.data import collate
    from hcral.runner import SIZE_DIVISOR

    _, dataset, model = load_run(run_dir, overrides)
    batch, _ = collate([dataset[i] for i in range(min(images, len(dataset)))], size_divisor=SIZE_DIVISOR)
    return {"run": str(run_dir), "images": batch.shape[0], **dead_fractions(model, batch)}


def _mean_sd(values: list[float]) -> str:
    return f"{stats.mean(values):.2f}" + (f" ± {stats.std(values):.2f}" if len(values) > 1 else "")


def _row(name: str, r: dict) -> str:
    fpn = ", ".join(f"{x:.2f}" for x in r["fpn_abs_mean"])
    return f"| `{name}` | {r['cls_dead']:.2f} | {r['reg_dead']:.2f} | {fpn} |"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hcral.experiments.dead_units", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (config.yaml + checkpoint.pt)")
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES, help="validation images to feed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override an inference setting, as hcral eval (repeatable)")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error(f"--images {args.images}: feed at least one image")
    results = [dead_units_run(run, images=args.images, overrides=args.overrides) for run in args.runs]
    header = "| {} | cls tower dead | reg tower dead | FPN mean abs per level (P3 first) |\n|---|---|---|---|"
    print(header.format("run"))
    for r in results:
        print(_row(r["run"], r))
    try:
        cells = cells_and_seeds(args.runs)
    except ValueError:
        return  # not an ablation's <cell>/seed<k> folders
    by_cell: dict[str, list[dict]] = defaultdict(list)
    for (cell, _), r in zip(cells, results):
        by_cell[cell].append(r)
    print(f"\n{header.format('cell')}")
    for cell, rs in by_cell.items():
        fpn = ", ".join(f"{stats.mean(level):.1f}" for level in zip(*(r["fpn_abs_mean"] for r in rs)))
        print(f"| `{cell}` (n={len(rs)}) | {_mean_sd([r['cls_dead'] for r in rs])} | {_mean_sd([r['reg_dead'] for r in rs])} | {fpn} |")


if __name__ == "__main__":
    main()
