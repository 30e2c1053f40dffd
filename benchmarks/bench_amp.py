"""Benchmark: bf16 autocast against float32 on the Aquarium FCOS+ATSS configs (issue 22).

One training step of ``configs/aquarium_fcos_atss_baseline.yaml`` and ``..._hcral.yaml`` as
``hcral train`` runs it (the same model, optimiser, gradient clipping and a real batch of 8
Aquarium images at 256x341 px), with ``train.amp`` false and true, interleaved in one process;
and the inference of one batch (``model.eval()``, decoding and NMS). Each contender has its own
model built from the same seed, so the bf16 and fp32 models see the same batch from the same
weights.

    python -m benchmarks.bench_amp --threads 1            # the issue's setting
    python -m benchmarks.bench_amp --threads 1 --profile  # torch.profiler table of each bf16 step
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from benchmarks.common import add_common_args, interleaved, median, paired_ratio, print_table, profile_calls, setup_threads, write_json
from hcral.config import apply_overrides, load_config
from hcral.data import collate
from hcral.models.build import build_model
from hcral.precision import autocast, bf16_supported, use_channels_last
from hcral.runner import SIZE_DIVISOR, build_dataset, build_optimizer, to_memory_format

CONFIGS = {"baseline": "configs/aquarium_fcos_atss_baseline.yaml", "hcral": "configs/aquarium_fcos_atss_hcral.yaml"}
SEED = 0


def make_step(cfg, batch: tuple[torch.Tensor, list[dict]], num_classes: int, amp: bool) -> tuple[Callable[[], None], Callable[[], None]]:
    """(train step, inference) of a fresh model of ``cfg`` on ``batch``, in bf16 when ``amp``."""
    torch.manual_seed(SEED)
    device = torch.device("cpu")
    channels_last = use_channels_last(cfg.train.channels_last, device, amp)  # as hcral train
    model = to_memory_format(build_model(cfg, num_classes), channels_last)
    optimizer, scheduler = build_optimizer(cfg, model, iters_per_epoch=56)
    images, targets = batch
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        model.train()
        with autocast(device, amp):
            terms = model(images, targets)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()

    @torch.no_grad()
    def infer() -> None:
        model.eval()
        with autocast(device, amp):
            model(images, image_sizes=[tuple(t["size"]) for t in targets])

    return step, infer


def run(args: argparse.Namespace) -> dict:
    setup_threads(args.threads)
    if not bf16_supported(torch.device("cpu")):
        raise SystemExit("this CPU has no oneDNN bf16 kernels: nothing to compare")
    repeats = args.repeats or (3 if args.quick else 9)
    result: dict = {"threads": torch.get_num_threads(), "repeats": repeats, "configs": CONFIGS, "rows": {}}
    rows = []
    for name, path in CONFIGS.items():
        cfg = load_config(path)
        cfg = apply_overrides(cfg, ["data.flip_prob=0.0"])  # the same batch in every call
        dataset = build_dataset(cfg, train=True)
        batch = collate([dataset[i] for i in range(cfg.data.batch_size)], size_divisor=SIZE_DIVISOR)
        calls = {}
        for amp in (False, True):
            step, infer = make_step(cfg, batch, dataset.num_classes, amp)
            tag = "bf16" if amp else "fp32"
            calls[f"train_{tag}"], calls[f"infer_{tag}"] = step, infer
        if args.profile:
            profile_calls({f"{name} train_bf16": calls["train_bf16"]}, rows=30)
        times = interleaved(calls, repeats=repeats, warmup=args.warmup)
        entry = {k: median(v) for k, v in times.items()}
        entry["train_ratio"] = paired_ratio(times, "train_bf16", "train_fp32")
        entry["infer_ratio"] = paired_ratio(times, "infer_bf16", "infer_fp32")
        result["rows"][name] = {"times": times, **entry}
        for mode in ("train", "infer"):
            r = entry[f"{mode}_ratio"]
            rows.append([
                name, mode, f"{entry[f'{mode}_fp32']:.3f}", f"{entry[f'{mode}_bf16']:.3f}",
                f"{r['median_of_round_ratios']:.2f}x", f"{r['min_round_ratio']:.2f}-{r['max_round_ratio']:.2f}",
            ])  # fmt: skip
    print_table(
        f"bf16 autocast against fp32, Aquarium FCOS+ATSS, batch 8, {torch.get_num_threads()} thread(s), {repeats} rounds",
        ["config", "step", "fp32 s", "bf16 s", "bf16/fp32 (median of rounds)", "range"], rows,
    )  # fmt: skip
    write_json("bench_amp" + args.tag, result, args.out)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one bf16 train step of each config")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
