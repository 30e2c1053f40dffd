"""Benchmark 1: classification loss, forward + backward, at COCO shape (issue 6).

B = 16 images x 20,000 priors x C = 80 classes (25.6M elements), about 1% of the priors positive.
Contenders, each timed as ``loss = f(x); loss.backward()`` on the same leaf ``x``:

- ``focal``: :func:`hcral.losses.sigmoid_focal_loss` (alpha 0.25, gamma 2, divided by the positives);
- ``hcra_c``: :func:`hcral.losses.hcra_cls_loss` with its defaults (the eager path);
- ``hcra_c_module``: :class:`hcral.losses.HCRAClassificationLoss` as the detector configs use it
  (30 bins, momentum 0.75, a per-prior valid mask);
- ``ghmc``: :func:`hcral.losses.ghmc_loss` (vectorised histogram);
- ``ghmc_looped``: GHM-C the way MMDetection's ``GHMC`` computes it -- a Python loop over the bins
  with a host synchronisation (``.item()``) per bin (:func:`ghmc_looped_reference`, written here);
- ``hcra_c_fused``: the optional ``torch.compile`` path (:mod:`hcral.losses.fused`), when available.

Bytes moved: an element-wise loss must at least read its inputs and write the gradient once, i.e.
12 bytes per element for focal/GHM-C (x, p*, grad) and 16 for HCRA-C (x, p*, u, grad), float32.
The table reports that compulsory traffic per second against ``dst.copy_(src)`` bandwidth.

    python -m benchmarks.bench_cls_loss            # COCO shape
    python -m benchmarks.bench_cls_loss --quick    # B = 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks.common import (
    add_common_args,
    copy_bandwidth,
    interleaved,
    median,
    paired_ratio,
    print_table,
    setup_threads,
    write_json,
)
from hcral import losses as L

NUM_CLASSES = 80
PRIORS_PER_IMAGE = 20_000
POSITIVE_FRACTION = 0.01  # of the priors
CLASSES_PER_IMAGE = 3  # classes present in an image: u is 0 in the other columns (formulation §1)
PRIOR_PROB = 0.01  # the focal-loss bias init: most logits sit near log(0.01/0.99)

# Bytes per element an element-wise loss must move at least (float32): inputs read once, grad written once.
COMPULSORY_BYTES = {"focal": 12, "ghmc": 12, "ghmc_looped": 12}  # x, p*, grad
HCRA_COMPULSORY_BYTES = 16  # x, p*, u, grad


def ghmc_looped_reference(logits: torch.Tensor, targets: torch.Tensor, *, bins: int = 10) -> torch.Tensor:
    """GHM-C computed the way MMDetection's ``GHMC.forward`` does it (no momentum): a Python loop over
    the bins, each with a boolean mask over all elements and a host sync (``.item()``) for its count.

    Written for this benchmark from the published semantics; values equal :func:`hcral.losses.ghmc_loss`.
    """
    edges = [b / bins for b in range(bins + 1)]
    edges[-1] += 1e-6
    g = (logits.detach().sigmoid() - targets).abs()
    weights = torch.zeros_like(logits)
    total = max(float(g.numel()), 1.0)
    nonempty = 0
    for b in range(bins):
        in_bin = (g >= edges[b]) & (g < edges[b + 1])
        count = in_bin.sum().item()  # host sync per bin
        if count > 0:
            weights[in_bin] = total / count
            nonempty += 1
    if nonempty > 0:
        weights = weights / nonempty
    return F.binary_cross_entropy_with_logits(logits, targets, weights, reduction="sum") / total


def make_inputs(images: int, priors: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Logits, one-hot targets, IoUs u and a valid mask for ``images x priors`` rows of C classes."""
    gen = torch.Generator().manual_seed(seed)
    rows = images * priors
    bias = torch.log(torch.tensor(PRIOR_PROB / (1 - PRIOR_PROB))).item()
    logits = torch.randn(rows, NUM_CLASSES, generator=gen).mul_(1.5).add_(bias)
    targets = torch.zeros(rows, NUM_CLASSES)
    num_pos = max(1, int(rows * POSITIVE_FRACTION))
    pos_rows = torch.randperm(rows, generator=gen)[:num_pos]
    pos_cls = torch.randint(0, NUM_CLASSES, (num_pos,), generator=gen)
    targets[pos_rows, pos_cls] = 1.0
    logits[pos_rows, pos_cls] += 3.0  # positives score higher
    # u: the class-wise max IoU of each predicted box, non-zero only for the classes in the image.
    ious = torch.zeros(rows, NUM_CLASSES)
    for i in range(images):
        cls = torch.randperm(NUM_CLASSES, generator=gen)[:CLASSES_PER_IMAGE]
        block = ious[i * priors : (i + 1) * priors]
        block[:, cls] = torch.rand(priors, CLASSES_PER_IMAGE, generator=gen).pow_(2).mul_(0.9)
    ious[pos_rows, pos_cls] = torch.rand(num_pos, generator=gen).mul_(0.5).add_(0.4)
    valid = torch.rand(rows, generator=gen) > 0.001
    return {"logits": logits, "targets": targets, "ious": ious, "valid": valid, "num_pos": torch.tensor(float(num_pos))}


def make_contenders(inputs: dict[str, torch.Tensor], *, fused: bool) -> tuple[dict, dict]:
    """Callables running forward + backward, and setup facts (compile time of the fused path)."""
    x = inputs["logits"].clone().requires_grad_()
    t, u, valid, num_pos = inputs["targets"], inputs["ious"], inputs["valid"], inputs["num_pos"]
    module = L.HCRAClassificationLoss(bins=30, momentum=0.75, sync_counts=False)

    def step(loss_fn):
        def run() -> None:
            x.grad = None
            loss_fn().backward()

        return run

    contenders = {
        "focal": step(lambda: L.sigmoid_focal_loss(x, t, reduction="mean", avg_factor=num_pos)),
        "hcra_c": step(lambda: L.hcra_cls_loss(x, t, u)),
        "hcra_c_module": step(lambda: module(x, t, u, valid)),
        "ghmc": step(lambda: L.ghmc_loss(x, t)),
        "ghmc_looped": step(lambda: ghmc_looped_reference(x, t)),
    }
    facts: dict = {}
    if fused:
        try:
            from hcral.losses import fused as fused_mod
        except ImportError as err:  # the fused module is optional
            facts["fused_unavailable"] = repr(err)
        else:
            reason = fused_mod.compile_unavailable_reason()
            if reason is not None:
                facts["fused_unavailable"] = reason
            else:
                start = time.perf_counter()
                step(lambda: fused_mod.hcra_cls_loss_fused(x, t, u))()  # compiles
                facts["fused_compile_s"] = time.perf_counter() - start
                contenders["hcra_c_fused"] = step(lambda: fused_mod.hcra_cls_loss_fused(x, t, u))
    return contenders, facts


def check_agreement(inputs: dict[str, torch.Tensor], contenders: dict) -> dict[str, float]:
    """Sanity: the looped GHM-C reference and the fused path give the eager values (not timed)."""
    x, t, u = inputs["logits"], inputs["targets"], inputs["ious"]
    out = {"ghmc_looped_minus_ghmc": float(ghmc_looped_reference(x, t) - L.ghmc_loss(x, t))}
    if "hcra_c_fused" in contenders:
        from hcral.losses import fused as fused_mod

        out["fused_minus_eager"] = float(fused_mod.hcra_cls_loss_fused(x, t, u) - L.hcra_cls_loss(x, t, u))
    return out


def run(args: argparse.Namespace) -> dict:
    setup_threads(args.threads)
    images = 2 if args.quick else args.images
    priors = args.priors
    repeats = args.repeats or (3 if args.quick else 5)
    inputs = make_inputs(images, priors)
    elements = images * priors * NUM_CLASSES
    contenders, facts = make_contenders(inputs, fused=not args.no_fused)
    agreement = check_agreement(inputs, contenders)
    bandwidth = copy_bandwidth()
    times = interleaved(contenders, repeats=repeats, warmup=args.warmup)

    rows, results = [], {}
    for name, ts in times.items():
        t = median(ts)
        moved = elements * (HCRA_COMPULSORY_BYTES if name.startswith("hcra") else COMPULSORY_BYTES[name])
        gbps = moved / t / 1e9
        ratio = paired_ratio(times, name, "focal")
        results[name] = {
            "median_s": t,
            "times_s": ts,
            "vs_focal": ratio,
            "compulsory_bytes": moved,
            "compulsory_GBps": gbps,
            "fraction_of_copy_bandwidth": gbps / bandwidth["GBps"],
            "copy_passes_equivalent": t / (elements * 8 / bandwidth["GBps"] / 1e9),
        }
        rows.append([
            name, f"{t * 1e3:.1f}", f"{ratio['median_of_round_ratios']:.2f}", f"{ratio['ratio_of_medians']:.2f}",
            f"{gbps:.2f}", f"{100 * gbps / bandwidth['GBps']:.1f}%",
            f"{results[name]['copy_passes_equivalent']:.0f}",
        ])  # fmt: skip
    print_table(
        f"classification loss fwd+bwd, {images} x {priors} priors x {NUM_CLASSES} classes = {elements / 1e6:.1f}M "
        f"elements, median of {repeats} rounds; copy bandwidth {bandwidth['GBps']:.1f} GB/s",
        ["loss", "ms", "x focal (paired)", "x focal (medians)", "GB/s compulsory", "of copy bw", "copy passes"],
        rows,
    )
    looped = paired_ratio(times, "hcra_c", "ghmc_looped")["median_of_round_ratios"]
    print(f"hcra_c / ghmc_looped = {looped:.2f}; agreement {agreement}; {facts}")
    payload = {
        "shape": {"images": images, "priors": priors, "classes": NUM_CLASSES, "elements": elements},
        "positives": int(inputs["num_pos"]),
        "repeats": repeats,
        "warmup": args.warmup,
        "copy_bandwidth": bandwidth,
        "results": results,
        "hcra_c_vs_ghmc_looped": paired_ratio(times, "hcra_c", "ghmc_looped"),
        "agreement": agreement,
        "facts": facts,
    }
    write_json(f"cls_loss{args.tag}", payload, args.out)
    return payload


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--priors", type=int, default=PRIORS_PER_IMAGE)
    p.add_argument("--no-fused", action="store_true", help="skip the torch.compile path")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
