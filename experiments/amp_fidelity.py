"""Diagnosis (issue 22): which part of HCRAL moves under bf16 autocast on the CPU.

The same weights and the same batches, one float32 pass and one bf16 pass (as ``hcral train
--set train.cpu_amp=true`` runs it: channels_last, stem and first stage in float32), for each
loss and assigner swap of the Aquarium FCOS+ATSS baseline config. Only forward and backward: no
optimiser step, and the float32 model's state (the GHM momentum histogram) is copied into the bf16
model before every batch, so both passes see one state. Per variant, the median over batches of

- each loss term's relative difference, |bf16 - fp32| / |fp32|;
- the Jaccard overlap of the two passes' positive priors (ATSS reads no prediction, EATSS does);
- the relative L2 error and the cosine of the trainable parameters' gradients, bf16 against fp32;
  and, for scale, the float32 gradient's relative L2 distance from the previous batch's (the
  minibatch noise that SGD already lives with).

The backbone's bf16 error is the same in every variant, so a variant whose errors exceed the
baseline's names the part that amplifies it.

    python experiments/amp_fidelity.py --checkpoint RUN/checkpoint.pt --batches 8 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

from hcral.checkpoint import load_checkpoint, load_model_state
from hcral.config import apply_overrides, load_config
from hcral.data import collate
from hcral.models.build import build_model
from hcral.precision import autocast, bf16_supported
from hcral.runner import SIZE_DIVISOR, build_dataset, to_memory_format

BASE = "configs/aquarium_fcos_atss_baseline.yaml"
# Each HCRAL part on its own, then together; the cls weights are the held-out ones of the configs
# (docs/results.md 10a): GHM-C 4, HCRA-C 2.
VARIANTS: dict[str, list[str]] = {
    "focal (baseline)": [],
    "ghmc": ["loss.cls=ghmc", "loss.cls_weight=4"],
    "hcra_c": ["loss.cls=hcra_c", "loss.cls_weight=2"],
    "hcra_r": ["loss.reg=hcra_r"],
    "eatss": ["loss.assigner=eatss"],
    "hcral (all three)": ["loss.cls=hcra_c", "loss.cls_weight=2", "loss.reg=hcra_r", "loss.assigner=eatss"],
}


def _record_positives(model: torch.nn.Module, store: list[torch.Tensor]) -> None:
    """Wrap ``model.head.assign`` so that each image's positive mask is appended to ``store``."""
    head = model.head
    assign = head.assign

    def recording(*args, **kwargs):
        a = assign(*args, **kwargs)
        store.append(a.pos_mask.clone())
        return a

    head.assign = recording


def _pass(model: torch.nn.Module, images: torch.Tensor, targets: list[dict], amp: bool) -> tuple[dict, torch.Tensor]:
    """Loss terms (floats) and the flat gradient of the trainable parameters of one pass."""
    model.train()
    model.zero_grad(set_to_none=True)
    with autocast(torch.device("cpu"), amp):
        terms = model(images, targets)
    sum(terms.values()).backward()
    grads = [p.grad.reshape(-1) for p in model.parameters() if p.requires_grad and p.grad is not None]
    return {k: float(v.detach()) for k, v in terms.items()}, torch.cat(grads).double()


def run_variant(name: str, overrides: list[str], args: argparse.Namespace) -> dict:
    cfg = apply_overrides(load_config(BASE), ["data.flip_prob=0.0", f"train.seed={args.seed}", *overrides])
    dataset = build_dataset(cfg, train=True)
    torch.manual_seed(args.seed)
    fp32 = build_model(cfg, dataset.num_classes)
    if args.checkpoint:
        load_model_state(fp32, load_checkpoint(args.checkpoint), args.checkpoint, loss_state=False)
    bf16 = to_memory_format(copy.deepcopy(fp32), True)  # channels_last, as hcral train under bf16 on a CPU
    pos32: list[torch.Tensor] = []
    pos16: list[torch.Tensor] = []
    _record_positives(fp32, pos32)
    _record_positives(bf16, pos16)
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(dataset), generator=g).tolist()
    bs = cfg.data.batch_size
    rows = []
    previous: torch.Tensor | None = None  # the float32 gradient of the batch before
    for b in range(args.warmup + args.batches):
        images, targets = collate([dataset[i] for i in order[b * bs:(b + 1) * bs]], size_divisor=SIZE_DIVISOR)
        bf16.load_state_dict(fp32.state_dict())  # one GHM histogram for both passes
        pos32.clear()
        pos16.clear()
        t32, g32 = _pass(fp32, images, targets, amp=False)
        t16, g16 = _pass(bf16, images.contiguous(memory_format=torch.channels_last), targets, amp=True)
        g_prev, previous = previous, g32
        if b < args.warmup:  # fills the momentum histogram from zero before anything is measured
            continue
        p32, p16 = torch.cat(pos32), torch.cat(pos16)
        union = (p32 | p16).sum().item()
        rows.append({
            **{f"rel_{k}": abs(t16[k] - t32[k]) / max(abs(t32[k]), 1e-12) for k in t32},
            "pos_jaccard": (p32 & p16).sum().item() / union if union else 1.0,
            "pos_fp32": int(p32.sum()),
            "grad_rel_l2": float((g16 - g32).norm() / g32.norm()),
            "grad_cosine": float(torch.nn.functional.cosine_similarity(g16, g32, dim=0)),
            "batch_to_batch_rel_l2": float((g32 - g_prev).norm() / g32.norm()) if g_prev is not None else float("nan"),
        })  # fmt: skip
    summary = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"{name:<20} " + "  ".join(f"{k} {v:.4f}" for k, v in summary.items()), flush=True)
    return {"overrides": overrides, "median": summary, "batches": rows}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="model weights to start from (default: the initialisation)")
    p.add_argument("--batches", type=int, default=8, help="measured batches per variant")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured float32-state batches first (the GHM histogram)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not bf16_supported(torch.device("cpu")):
        sys.exit("this CPU has no oneDNN bf16 kernels: nothing to compare")
    result = {
        "checkpoint": args.checkpoint, "batches": args.batches, "warmup": args.warmup, "seed": args.seed,
        "variants": {name: run_variant(name, ov, args) for name, ov in VARIANTS.items()},
    }  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
