"""Before / after: the losses and assigners of an earlier git revision against the working tree, in
one process (interleaved rounds, paired ratios), so the machine's load cannot fake a speed-up.

The old ``hcral/losses`` and ``hcral/assign`` are read with ``git show REV:path`` into a temporary
directory and imported as separate packages (``old_losses``, ``old_assign``); the rest of hcral is
shared. Results must agree (values printed); only the time differs.

    python -m benchmarks.bench_before_after --ref e96bb5c     # the revision before issue 6's work
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import bench_assign, bench_cls_loss
from benchmarks.common import add_common_args, interleaved, median, paired_ratio, print_table, setup_threads, write_json
from hcral import assign as new_assign
from hcral import losses as new_losses

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"losses": "old_losses", "assign": "old_assign"}


def load_old(ref: str, into: Path) -> dict[str, object]:
    """Import ``hcral.losses`` and ``hcral.assign`` as they were at git revision ``ref``."""
    for sub, alias in PACKAGES.items():
        files = subprocess.run(
            ["git", "ls-tree", "--name-only", ref, f"hcral/{sub}/"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
        (into / alias).mkdir()
        for path in files:
            text = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True)
            source = text.stdout.replace(f"hcral.{sub}.", f"{alias}.").replace(f"from hcral.{sub} import", f"from {alias} import")
            (into / alias / Path(path).name).write_text(source)
    sys.path.insert(0, str(into))
    return {sub: importlib.import_module(alias) for sub, alias in PACKAGES.items()}


def run(args: argparse.Namespace) -> dict:
    setup_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 5)
    with tempfile.TemporaryDirectory() as tmp:
        old = load_old(args.ref, Path(tmp))
        results: dict[str, dict] = {}
        rows = []

        # Classification losses at COCO shape (B = 2 with --quick).
        images = 2 if args.quick else 16
        inputs = bench_cls_loss.make_inputs(images, bench_cls_loss.PRIORS_PER_IMAGE)
        x = inputs["logits"].clone().requires_grad_()
        t, u, valid = inputs["targets"], inputs["ious"], inputs["valid"]

        def step(fn):
            def run_once() -> None:
                x.grad = None
                fn().backward()

            return run_once

        modules = {name: lib.HCRAClassificationLoss(bins=30, momentum=0.75, sync_counts=False)
                   for name, lib in (("old", old["losses"]), ("new", new_losses))}  # fmt: skip
        cls = {
            "hcra_c_old": step(lambda: old["losses"].hcra_cls_loss(x, t, u)),
            "hcra_c_new": step(lambda: new_losses.hcra_cls_loss(x, t, u)),
            "hcra_c_module_old": step(lambda: modules["old"](x, t, u, valid)),
            "hcra_c_module_new": step(lambda: modules["new"](x, t, u, valid)),
            "ghmc_old": step(lambda: old["losses"].ghmc_loss(x, t)),
            "ghmc_new": step(lambda: new_losses.ghmc_loss(x, t)),
        }
        with torch.no_grad():
            agree = {
                "hcra_c": float(old["losses"].hcra_cls_loss(x, t, u) - new_losses.hcra_cls_loss(x, t, u)),
                "ghmc": float(old["losses"].ghmc_loss(x, t) - new_losses.ghmc_loss(x, t)),
            }
        times = interleaved(cls, repeats=repeats, warmup=args.warmup)
        for name in ("hcra_c", "hcra_c_module", "ghmc"):
            r = paired_ratio(times, f"{name}_new", f"{name}_old")
            results[name] = {"old_s": median(times[f"{name}_old"]), "new_s": median(times[f"{name}_new"]), "new_over_old": r}
            rows.append([f"{name} (COCO shape, {images} images)", f"{results[name]['old_s'] * 1e3:.1f}",
                         f"{results[name]['new_s'] * 1e3:.1f}", f"{r['median_of_round_ratios']:.2f}"])  # fmt: skip
        del inputs, x, cls

        # Assigners, batch of 8 images of N = 20,044 priors.
        for m in [1, 10, 100] if args.quick else [1, 10, 100, 500]:
            s = bench_assign.scene(20_000, m, 8, seed=1)
            p, sz, g, lab, pb, ps = s["priors"], s["sizes"], s["gts"], s["labels"], s["pred_boxes"], s["pred_scores"]
            fns = {}
            for tag, lib in (("old", old["assign"]), ("new", new_assign)):
                fns[f"atss_{tag}"] = lambda lib=lib: lib.atss_assign_batched(p, sz, g, lab)
                fns[f"eatss_{tag}"] = lambda lib=lib: lib.eatss_assign_batched(
                    p, sz, g, lab, pred_boxes=pb, pred_scores=ps
                )
            same = all(
                torch.equal(getattr(fns[f"{a}_old"](), f), getattr(fns[f"{a}_new"](), f))
                for a in ("atss", "eatss") for f in ("gt_index", "labels", "max_iou", "expanded")
            )  # fmt: skip
            agree[f"assign_M{m}_identical"] = same
            times = bench_assign.time_group(fns, repeats, args.warmup)
            for a in ("atss", "eatss"):
                key = f"{a}_batched_B8_M{m}"
                r = paired_ratio(times, f"{a}_new", f"{a}_old")
                results[key] = {"old_s": median(times[f"{a}_old"]), "new_s": median(times[f"{a}_new"]), "new_over_old": r}
                rows.append([f"{a} batched, B = 8, M = {m}", f"{results[key]['old_s'] * 1e3:.1f}",
                             f"{results[key]['new_s'] * 1e3:.1f}", f"{r['median_of_round_ratios']:.2f}"])  # fmt: skip

    print_table(
        f"before ({args.ref}) / after (working tree), ms, median of rounds; ratio = new / old, paired",
        ["what", "before", "after", "after / before"],
        rows,
    )
    print(f"agreement: {agree}")
    payload = {"ref": args.ref, "repeats": repeats, "warmup": args.warmup, "results": results, "agreement": agree}
    write_json(f"before_after{args.tag}", payload, args.out)
    return payload


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--ref", default="e96bb5c", help="git revision of the 'before' code")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
