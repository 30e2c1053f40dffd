"""Benchmark 4: one training step end to end, HCRAL vs FL + GIoU + ATSS (issue 6).

The small FCOS+ATSS config of ``hcral demo`` (:func:`hcral.demo.demo_config`: small backbone,
64-channel FPN and head, synthetic shapes at 160 px padded to 256, batch 8) trained with HCRA-C +
HCRA-R + EATSS, against :func:`hcral.demo.baseline_of` (focal + GIoU + ATSS). Both models start from
the same seed and see the same batch; a step is forward, loss, backward and an SGD step.

Where the time goes: the same step is also timed with the head's convolutions cut out (the head's
``forward`` returns cached outputs as leaf tensors), which leaves exactly what differs between the
two configs -- priors, decoding, assignment, targets, the losses and their backward (the "loss
pipeline"). ``--profile`` prints a torch.profiler table of one step of each.

    python -m benchmarks.bench_train_step
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from benchmarks.common import (
    add_common_args, interleaved, median, paired_ratio, print_table, profile_calls, setup_threads, write_json,
)
from hcral.data import collate
from hcral.demo import baseline_of, demo_config
from hcral.models.build import build_model
from hcral.runner import build_dataset

SEED = 0
LR = 0.01


def make_models(batch_size: int) -> tuple[dict[str, torch.nn.Module], tuple[torch.Tensor, list[dict]]]:
    cfg = demo_config("runs/bench")
    dataset = build_dataset(cfg, train=True)
    images, targets = collate([dataset[i] for i in range(batch_size)])
    models = {}
    for name, c in (("hcral", cfg), ("baseline", baseline_of(cfg))):
        torch.manual_seed(SEED)
        model = build_model(c, dataset.num_classes)
        model.train()
        models[name] = model
    return models, (images, targets)


def train_step(model: torch.nn.Module, batch: tuple[torch.Tensor, list[dict]]) -> Callable[[], None]:
    images, targets = batch
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)

    def step() -> None:
        terms = model(images, targets)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def loss_pipeline_step(model: torch.nn.Module, batch: tuple[torch.Tensor, list[dict]]) -> Callable[[], None]:
    """The head's loss with its convolutions replaced by cached outputs (leaf tensors), + backward."""
    images, targets = batch
    head = model.head
    with torch.no_grad():
        feats = model.neck(model.backbone(images))
        cached = head(feats)
    leaves = [o.detach().clone().requires_grad_() if torch.is_tensor(o) else o for o in cached]

    class CachedHead(type(head)):  # only forward differs
        def forward(self, feats):  # noqa: ARG002 - the cached outputs stand for the towers
            return tuple(leaves)

    twin = object.__new__(CachedHead)
    twin.__dict__ = head.__dict__  # shares the loss modules (and their GHM state) with the real head

    def step() -> None:
        for leaf in leaves:
            if torch.is_tensor(leaf):
                leaf.grad = None
        terms = twin.loss(feats, targets)
        sum(terms.values()).backward()

    return step


def assignment_calls(model: torch.nn.Module, batch: tuple[torch.Tensor, list[dict]]) -> dict[str, Callable[[], object]]:
    """The demo batch's assignment as the head does it (one call per image) and batched (one call),
    for ATSS and EATSS, with the head's own priors and predictions: how much batching would save."""
    from hcral.assign import atss_assign, atss_assign_batched, eatss_assign, eatss_assign_batched

    images, targets = batch
    head = model.head
    with torch.no_grad():
        cls_logits, reg, _, sizes = head(model.neck(model.backbone(images)))
        layout = head.prior_layout(sizes, cls_logits.device)
        boxes, scores = head.decode(layout, reg.float()), cls_logits.float().sigmoid()
    priors, levels = layout.assign_boxes, layout.num_level_priors
    m = max(int(t["boxes"].shape[0]) for t in targets)
    gt_boxes = torch.zeros(len(targets), m, 4)
    gt_labels = torch.zeros(len(targets), m, dtype=torch.long)
    gt_mask = torch.zeros(len(targets), m, dtype=torch.bool)
    for i, t in enumerate(targets):
        k = t["boxes"].shape[0]
        gt_boxes[i, :k], gt_labels[i, :k], gt_mask[i, :k] = t["boxes"], t["labels"], True
    return {
        "atss_per_image": lambda: [atss_assign(priors, levels, t["boxes"], t["labels"]) for t in targets],
        "atss_batched": lambda: atss_assign_batched(priors, levels, gt_boxes, gt_labels, gt_mask),
        "eatss_per_image": lambda: [
            eatss_assign(priors, levels, t["boxes"], t["labels"], pred_boxes=boxes[i], pred_scores=scores[i])
            for i, t in enumerate(targets)
        ],
        "eatss_batched": lambda: eatss_assign_batched(
            priors, levels, gt_boxes, gt_labels, gt_mask, pred_boxes=boxes, pred_scores=scores
        ),
    }


def loss_pipeline_breakdown(
    models: dict[str, torch.nn.Module], batch: tuple[torch.Tensor, list[dict]], repeats: int
) -> dict[str, dict[str, float]]:
    """Milliseconds per loss-pipeline step spent in the parts that differ between the two configs:
    the assigner calls, the class-wise IoU u of §1, and the loss functions. Each is timed by wrapping
    the function the head calls (restored afterwards); the rest is "other" (targets, decoding, ...)."""
    import time
    from collections import defaultdict

    import hcral.models.heads.atss as atss_head
    import hcral.models.heads.dense_head as dense_head

    spent: dict[str, float] = defaultdict(float)
    patched = []

    def wrap(owner, name: str, label: str) -> None:
        real = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = real(*args, **kwargs)
            spent[label] += time.perf_counter() - start
            return out

        patched.append((owner, name, real))
        setattr(owner, name, timed)

    wrap(atss_head, "atss_assign", "ATSS (per image x B)")
    wrap(atss_head, "eatss_assign", "EATSS (per image x B)")
    wrap(dense_head, "classwise_max_iou", "class-wise IoU u (per image x B)")
    for name in ("sigmoid_focal_loss", "giou_loss", "hcra_reg_loss"):
        wrap(dense_head.L, name, name)
    wrap(models["hcral"].head.cls_loss_module, "forward", "HCRA-C (module)")
    out = {}
    try:
        for config, model in models.items():
            step = loss_pipeline_step(model, batch)
            step()
            spent.clear()
            start = time.perf_counter()
            for _ in range(repeats):
                step()
            total = (time.perf_counter() - start) / repeats
            parts = {k: v / repeats * 1e3 for k, v in spent.items()}
            parts["other (targets, decoding, backward, ...)"] = total * 1e3 - sum(parts.values())
            out[config] = {"total_ms": total * 1e3, **parts}
    finally:
        for owner, name, real in reversed(patched):
            if owner is models["hcral"].head.cls_loss_module:
                del owner.forward  # back to the class's method
            else:
                setattr(owner, name, real)
    return out


def run(args: argparse.Namespace) -> dict:
    setup_threads(args.threads)
    torch.manual_seed(SEED)
    repeats = args.repeats or (3 if args.quick else 9)
    models, batch = make_models(args.batch_size)
    steps = {name: train_step(m, batch) for name, m in models.items()}
    pipelines = {f"{name}_loss_pipeline": loss_pipeline_step(m, batch) for name, m in models.items()}
    times = interleaved({**steps, **pipelines}, repeats=repeats, warmup=args.warmup)

    step_ratio = paired_ratio(times, "hcral", "baseline")
    med = {k: median(v) for k, v in times.items()}
    pipeline_extra = med["hcral_loss_pipeline"] - med["baseline_loss_pipeline"]
    rows = [
        ["full step", f"{med['hcral'] * 1e3:.1f}", f"{med['baseline'] * 1e3:.1f}",
         f"{step_ratio['median_of_round_ratios']:.3f}", f"{step_ratio['ratio_of_medians']:.3f}"],
        ["loss pipeline only", f"{med['hcral_loss_pipeline'] * 1e3:.2f}", f"{med['baseline_loss_pipeline'] * 1e3:.2f}",
         f"{paired_ratio(times, 'hcral_loss_pipeline', 'baseline_loss_pipeline')['median_of_round_ratios']:.3f}",
         f"{med['hcral_loss_pipeline'] / med['baseline_loss_pipeline']:.3f}"],
    ]  # fmt: skip
    images = batch[0]
    print_table(
        f"one training step, FCOS+ATSS demo config, batch {images.shape[0]} x {tuple(images.shape[-2:])}, "
        f"median of {repeats} rounds (ms)",
        ["what", "HCRAL", "FL+GIoU+ATSS", "ratio (paired)", "ratio (medians)"],
        rows,
    )
    print(
        f"HCRAL adds {100 * (step_ratio['median_of_round_ratios'] - 1):+.1f}% per step (paired median); "
        f"its loss pipeline costs {pipeline_extra * 1e3:+.2f} ms more = "
        f"{100 * pipeline_extra / med['baseline']:+.2f}% of the baseline step"
    )
    assign_times = interleaved(assignment_calls(models["hcral"], batch), repeats=max(repeats, 15), warmup=args.warmup)
    assign_med = {k: median(v) for k, v in assign_times.items()}
    print_table(
        "assignment of this batch (ms): one call per image, as DenseHead.loss does, vs one batched call",
        ["assigner", "per image x B", "batched", "saved per step", "of baseline step"],
        [[name, f"{assign_med[f'{name}_per_image'] * 1e3:.2f}", f"{assign_med[f'{name}_batched'] * 1e3:.2f}",
          f"{(assign_med[f'{name}_per_image'] - assign_med[f'{name}_batched']) * 1e3:.2f}",
          f"{100 * (assign_med[f'{name}_per_image'] - assign_med[f'{name}_batched']) / med['baseline']:.1f}%"]
         for name in ("atss", "eatss")],
    )  # fmt: skip
    breakdown = loss_pipeline_breakdown(models, batch, repeats=max(repeats, 10))
    for config, parts in breakdown.items():
        print_table(
            f"where the loss pipeline's time goes, {config} (ms per step, mean of {max(repeats, 10)})",
            ["part", "ms"],
            [[k, f"{v:.2f}"] for k, v in parts.items()],
        )
    tables = profile_calls({**steps, **pipelines}) if args.profile else {}
    payload = {
        "config": "hcral.demo.demo_config (FCOS+ATSS, small backbone) vs baseline_of",
        "batch_shape": list(images.shape),
        "gts_per_image": [int(t["boxes"].shape[0]) for t in batch[1]],
        "repeats": repeats,
        "warmup": args.warmup,
        "times_s": times,
        "median_s": med,
        "step_ratio_hcral_over_baseline": step_ratio,
        "loss_pipeline_extra_s": pipeline_extra,
        "loss_pipeline_extra_fraction_of_step": pipeline_extra / med["baseline"],
        "loss_pipeline_breakdown_ms": breakdown,
        "assignment_times_s": assign_times,
        "assignment_median_s": assign_med,
        "profiles": tables,
    }
    write_json(f"train_step{args.tag}", payload, args.out)
    return payload


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step of each")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
