"""Training compute of each regime of a calibration SPEC: GFLOPs of one training step x iterations.

Run from the repository root::

    python experiments/calibrate_compute.py experiments/calibrate_axes_fcos_atss_aquarium.yaml

For each cell of the SPEC (its overrides on its base config), hcral's model is built and one
forward in training mode (with a real loss and one ground-truth box) runs on one image of the
config's largest training size (``max_side`` x ``short_side``, padded as the collate pads). Every
convolution and linear layer is counted by a hook: 2 x output elements x (input channels / groups)
x kernel area FLOPs (a multiply-add is 2). A layer with trainable weights costs 3 times its
forward in a step (forward, input gradient, weight gradient: the usual 3x rule), a frozen one its
forward only (frozen stages are a prefix of the network here, so no gradient flows through them).
``torch.utils.flop_counter`` is not used: in torch 2.14 it counts a grouped convolution's backward
as if it were dense (a depthwise 3x3 backward at 66x its forward instead of 2x), which would make
a fine-tuned EfficientNet look 15x costlier than it is. Compute = step GFLOPs per image x batch x
iterations (epochs x ceil(train images / batch)). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from torch import nn

from hcral.config import load_config
from hcral.data.collate import padded_size
from hcral.experiments.ablate import load_spec
from hcral.models.build import build_model
from hcral.runner import SIZE_DIVISOR

# Aquarium's train split (docs/results.md, section 8).
TRAIN_IMAGES = 448
NUM_CLASSES = 7


# A step costs a trainable layer's forward 3 times (forward, input and weight gradients).
TRAINABLE_STEP_FACTOR = 3


def step_gflops(cfg) -> float:
    """GFLOPs of one training step of ``cfg``'s model on one image with one box (module docstring)."""
    d = cfg.data
    h, w = padded_size(d.short_side, d.max_side, SIZE_DIVISOR)
    model = build_model(cfg, NUM_CLASSES).train()
    total = 0.0

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            per_output = module.in_features
        factor = TRAINABLE_STEP_FACTOR if module.weight.requires_grad else 1
        total += 2.0 * output.numel() * per_output * factor

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    images = torch.randn(1, 3, h, w)
    targets = [{"boxes": torch.tensor([[w * 0.25, h * 0.25, w * 0.6, h * 0.7]]), "labels": torch.tensor([0])}]
    with torch.no_grad():
        model(images, targets)
    for hook in hooks:
        hook.remove()
    return total / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="a calibration SPEC (experiments/calibrate_*.yaml)")
    parser.add_argument("--base", action="store_true", help="also count the SPEC's base config alone")
    args = parser.parse_args(argv)
    spec = load_spec(args.spec)
    rows = [("base", list(spec.base_overrides))] if args.base else []
    seen = set()
    for cell in spec.cells():
        regime = cell.values[next(iter(spec.axes))]  # the first axis names the regime
        if regime not in seen:
            seen.add(regime)
            rows.append((regime, [*spec.base_overrides, *cell.overrides]))
    print("| regime | step GFLOPs / image | batch | iterations | training PFLOPs |")
    print("|---|---|---|---|---|")
    for regime, overrides in rows:
        cfg = load_config(spec.base_config, overrides)
        g = step_gflops(cfg)
        iters = cfg.train.epochs * math.ceil(TRAIN_IMAGES / cfg.data.batch_size)
        print(f"| {regime} | {g:.2f} | {cfg.data.batch_size} | {iters} | {g * cfg.data.batch_size * iters / 1e6:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
