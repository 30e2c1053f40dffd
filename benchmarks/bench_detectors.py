"""hcral's FCOS+ATSS and RetinaNet against torchvision's ``fcos_resnet50_fpn`` / ``retinanet_resnet50_fpn``
(issue 10): training step, inference throughput and peak memory, ResNet-50 FPN on both sides.

hcral's detectors are built the way users build them: ``hcral.config.load_config`` of the COCO configs
in ``configs/`` (baseline losses FL + GIoU, and HCRAL's HCRA-C + HCRA-R, with EATSS for FCOS+ATSS) and
``hcral.models.build.build_model``. torchvision's come from its builders with ``weights=None,
weights_backbone=None``, then get what those builders do when given ImageNet weights (the setting
torchvision trains its detectors in): every backbone BatchNorm becomes a ``FrozenBatchNorm2d`` and only
``layer2..layer4`` train (``trainable_backbone_layers=3``). hcral's configs freeze the same: stem and
``layer1`` (``frozen_stages: 1``), and ``norm_eval: true`` (the default) makes every BatchNorm frozen.
hcral's ResNet is torchvision's, so with the same seed both backbones start from the same weights.
Both: P3-P7 with 256 channels, heads of 4 convs x 256 channels (GroupNorm in FCOS's, none in
RetinaNet's), 80 classes, 9 anchors a location for RetinaNet. torchvision's RetinaNet regresses with
GIoU (``regression_head._loss_type = "giou"``, as its v2 builder sets) to match hcral's baseline.
Differences left as each library defines its detector (``docs/performance.md`` lists them):
torchvision's FCOS assigns with FCOS's centre sampling (hcral: ATSS / EATSS), its RetinaNet builds P6
from P5 (hcral: from C5, as the paper and MMDetection), and FCOS's score is sqrt(cls x centerness)
there (hcral: cls x centerness).

Input: the same ``(2, 3, 512, 512)`` tensor for both; torchvision's ``GeneralizedRCNNTransform`` gets
``min_size = max_size = 512``, mean 0 and std 1, so it neither resizes nor changes a value (it still
copies the batch). Training targets: the same random boxes and labels. A training step is forward,
loss, backward and an SGD step (lr 0.001, momentum 0.9, weight decay 1e-4; no gradient clipping).

Inference (``eval()``, ``torch.no_grad()``, post-processing included) in two regimes:

- ``empty``: score threshold 1 on both sides (a sigmoid is below 1 and the test is strict), so no
  pair reaches NMS: the network plus an empty post-processing. (The thresholds of the fresh models do
  not guarantee that: hcral's RetinaNet, with P6 built from C5, scores some pairs above 0.05 at init,
  and torchvision's FCOS scores sqrt(cls x centerness) ~ sqrt(0.01 x 0.5) = 0.07.)
- ``full``: the same test settings on both sides (score > 0.05, top 1000 pairs per level, NMS IoU 0.6,
  100 detections per image) and the classifiers' bias set to 0 on both, so every level sends its
  1,000 best pairs to NMS: post-processing under its heaviest load, as on a busy image.

Timing as every benchmark here (``benchmarks/common.py``): interleaved rounds (each contender once per
round, rotating order), medians, ratios hcral / torchvision as the median of per-round ratios; each
ratio is also given on CPU time (``time.process_time``), which on one thread leaves out the time spent
waiting for a core that another process held. A last row times the two ResNet-50 bodies alone
(C3-C5, no grad): the part of every row that neither head, loss nor post-processing decides.
``--torchvision-as-built`` leaves torchvision's detectors as ``weights=None`` builds them (every
BatchNorm trained, every layer trainable): not the same network as hcral's, kept to show what that
difference costs.

Peak memory: each contender in a fresh subprocess; after one warm-up step (so lazy state and the SGD
momentum exist) and with the gradients freed, the process's resident-set high-water mark is reset
(``/proc/self/clear_refs``) and one more step runs; the result is ``VmHWM - VmRSS before``: the extra
resident memory the step needs at its peak (activations, gradients, temporaries). The child runs with
glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB so that freed tensors go back to the OS at once
and the high-water mark sees the step's own peak, not memory a previous step left in the heap.
On CUDA (``--device cuda``): ``torch.cuda.max_memory_allocated`` over the step, minus the memory
allocated before it.

    python -m benchmarks.bench_detectors            # ~8 min on a loaded 2-core CPU
    python -m benchmarks.bench_detectors --quick    # 256 px, one round: a smoke run
    python -m benchmarks.bench_detectors --profile  # + torch.profiler tables of one step of each
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import fcos_resnet50_fpn, retinanet_resnet50_fpn
from torchvision.ops.misc import FrozenBatchNorm2d

from benchmarks.common import (
    add_common_args, extra_peak_rss, interleaved, median, paired_ratio, print_table, profile_calls, setup_threads, write_json,
)
from hcral.config import load_config
from hcral.models.build import build_model
from hcral.precision import autocast
from hcral.runner import to_memory_format

ROOT = Path(__file__).resolve().parent.parent
SEED = 0
NUM_CLASSES = 80  # COCO's categories; both heads get 80 sigmoid outputs per prior
BATCH_SIZE = 2
IMAGE_SIZE = 512
QUICK_IMAGE_SIZE = 256
GTS_PER_IMAGE = 8  # COCO averages ~7 objects per training image
GT_SIDES = (16.0, 384.0)  # log-uniform box sides in pixels
# A step costs the same at any learning rate; at the configs' 0.01 the randomly initialised models
# (no ImageNet weights here) diverge within the timed steps (torchvision's RetinaNet reached a loss of
# 3e6), so the benchmark trains at 0.001, where every loss stays finite and decreases.
LR, MOMENTUM, WEIGHT_DECAY = 0.001, 0.9, 1e-4
# torchvision's builders with ImageNet weights train layer2..layer4 of the backbone.
TV_TRAINABLE_LAYERS = ("layer2", "layer3", "layer4")
# Test settings of the inference regimes (module docstring), on both sides, in hcral's EvalConfig
# names; in "empty" the settings other than the threshold play no part. In "full" the classifiers'
# bias is also set to 0.
REGIMES = {
    "empty": {"score_thr": 1.0},
    "full": {"score_thr": 0.05, "nms_pre": 1000, "nms_iou": 0.6, "max_per_img": 100},
}
TV_TEST_NAMES = {
    "score_thr": "score_thresh", "nms_pre": "topk_candidates",
    "nms_iou": "nms_thresh", "max_per_img": "detections_per_img",
}  # fmt: skip
MALLOC_MMAP_THRESHOLD = 64 * 1024
# --bf16: a contender under bf16 autocast is its name with this suffix. hcral's run as `hcral train`
# runs them on a CPU with train.amp (channels_last, hcral/precision.py); torchvision's as a
# torchvision user would add autocast (NCHW).
BF16 = "_bf16"


def base_name(contender: str) -> str:
    return contender.removesuffix(BF16)

DETECTORS = {
    "fcos_atss": {
        "title": "FCOS+ATSS",
        "configs": {
            "hcral_baseline": "configs/coco_fcos_atss_r50_fpn_1x_baseline.yaml",
            "hcral_hcral": "configs/coco_fcos_atss_r50_fpn_1x_hcral.yaml",
        },
        "torchvision": fcos_resnet50_fpn,
    },
    "retinanet": {
        "title": "RetinaNet",
        "configs": {
            "hcral_baseline": "configs/coco_retinanet_r50_fpn_1x_baseline.yaml",
            "hcral_hcral": "configs/coco_retinanet_r50_fpn_1x_hcral.yaml",
        },
        "torchvision": retinanet_resnet50_fpn,
    },
}
LOSSES = {
    ("fcos_atss", "hcral_baseline"): "FL+GIoU+ATSS",
    ("fcos_atss", "hcral_hcral"): "HCRA-C+HCRA-R+EATSS",
    ("retinanet", "hcral_baseline"): "FL+GIoU",
    ("retinanet", "hcral_hcral"): "HCRA-C+HCRA-R",
}


# ---------------------------------------------------------------------------------------------
# models and data
# ---------------------------------------------------------------------------------------------


def make_batch(size: int, device: torch.device, seed: int = SEED) -> tuple[torch.Tensor, list[dict]]:
    """``(B, 3, size, size)`` standard-normal images (already normalised) and per-image GT dicts."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(BATCH_SIZE, 3, size, size, generator=gen)
    lo, hi = torch.log(torch.tensor(GT_SIDES))
    targets = []
    for _ in range(BATCH_SIZE):
        sides = torch.exp(torch.empty(GTS_PER_IMAGE, 2).uniform_(float(lo), float(hi), generator=gen)).clamp(max=size)
        corner = torch.rand(GTS_PER_IMAGE, 2, generator=gen) * (size - sides)
        boxes = torch.cat((corner, corner + sides), 1)
        labels = torch.randint(0, NUM_CLASSES, (GTS_PER_IMAGE,), generator=gen)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images.to(device), targets


def hcral_detector(detector: str, contender: str, regime: str | None = None) -> nn.Module:
    """An hcral detector from its COCO config, with an inference regime's test settings if given."""
    overrides = [f"eval.{k}={v}" for k, v in REGIMES[regime].items()] if regime else []
    cfg = load_config(ROOT / DETECTORS[detector]["configs"][contender], overrides)
    return build_model(cfg, NUM_CLASSES)


def freeze_like_pretrained(body: nn.Module) -> None:
    """What torchvision's detection builders do to the ResNet when given weights: FrozenBatchNorm2d
    everywhere, and only ``layer2..layer4`` trainable (``trainable_backbone_layers=3``)."""
    for module in list(body.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                frozen.weight.copy_(child.weight.detach())
                frozen.bias.copy_(child.bias.detach())
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
                setattr(module, child_name, frozen)
    for name, param in body.named_parameters():
        param.requires_grad_(name.startswith(TV_TRAINABLE_LAYERS))


def torchvision_detector(detector: str, size: int, regime: str | None = None, *, as_built: bool = False) -> nn.Module:
    """torchvision's detector, frozen as its builders freeze it with weights unless ``as_built``
    (then: as ``weights=None`` builds it, every BatchNorm trained and every layer trainable)."""
    test = {TV_TEST_NAMES[k]: v for k, v in REGIMES[regime].items()} if regime else {}
    model = DETECTORS[detector]["torchvision"](
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES,
        min_size=size, max_size=size, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0], **test,
    )  # fmt: skip
    if not as_built:
        freeze_like_pretrained(model.backbone.body)
    if detector == "retinanet":
        model.head.regression_head._loss_type = "giou"  # as retinanet_resnet50_fpn_v2
    return model


def build(
    detector: str, contender: str, size: int, regime: str | None = None, *, tv_as_built: bool = False
) -> nn.Module:
    """A contender's detector; ``regime`` names the inference regime (None: for training)."""
    torch.manual_seed(SEED)
    if contender == "torchvision":
        model = torchvision_detector(detector, size, regime, as_built=tv_as_built)
    else:
        model = hcral_detector(detector, contender, regime)
    if regime == "full":
        classifier = model.head.classification_head.cls_logits if contender == "torchvision" else model.head.cls_out
        with torch.no_grad():
            classifier.bias.zero_()  # every score ~0.5: each level's top pairs all pass the threshold
    return model


def model_inputs(contender: str, images: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
    """torchvision's detectors take a list of (3, H, W) images; hcral's a padded batch."""
    return list(images) if contender == "torchvision" else images


def param_counts(model: nn.Module) -> dict[str, int]:
    params = list(model.parameters())
    return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}


def bf16_inputs(model: nn.Module, contender: str, images: torch.Tensor) -> tuple[nn.Module, torch.Tensor, bool]:
    """``(model, images, amp)`` as the contender runs: under bf16 hcral's also go channels_last."""
    amp = contender.endswith(BF16)
    if amp and not base_name(contender).startswith("torchvision"):
        model = to_memory_format(model, True)
        images = images.contiguous(memory_format=torch.channels_last)
    return model, images, amp


def train_step(model: nn.Module, contender: str, batch: tuple[torch.Tensor, list[dict]]) -> Callable[[], float]:
    images, targets = batch
    model, images, amp = bf16_inputs(model, contender, images)
    device = images.device
    inputs = model_inputs(base_name(contender), images)
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    model.train()

    def step() -> float:
        with autocast(device, amp):
            terms = model(inputs, targets)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    step.optimizer = optimizer
    return step


def inference(model: nn.Module, contender: str, images: torch.Tensor) -> Callable[[], list[dict]]:
    model, images, amp = bf16_inputs(model, contender, images)
    inputs = model_inputs(base_name(contender), images)
    model.eval()

    def infer() -> list[dict]:
        with torch.no_grad(), autocast(images.device, amp):
            return model(inputs)

    return infer


# ---------------------------------------------------------------------------------------------
# peak memory, one fresh subprocess per measurement
# ---------------------------------------------------------------------------------------------


def _memory_child(detector: str, contender: str, mode: str, size: int, args: argparse.Namespace) -> None:
    """Runs in the subprocess: build, one warm-up call, reset the high-water mark, one measured call."""
    device = torch.device(args.device)
    batch = make_batch(size, device)
    regime = "full" if mode == "inference" else None
    model = build(detector, contender, size, regime, tv_as_built=args.torchvision_as_built).to(device)
    fn = train_step(model, contender, batch) if mode == "train" else inference(model, contender, batch[0])
    fn()
    if mode == "train":
        fn.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        extra = torch.cuda.max_memory_allocated(device) - before
        result = {"extra_peak_mib": extra / 2**20, "method": "torch.cuda.max_memory_allocated - allocated before"}
    else:
        result = extra_peak_rss(fn)
    print(json.dumps(result))


def peak_memory(detector: str, contender: str, mode: str, size: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_detectors", "--memory-child", detector, contender, mode, str(size)]
    cmd += ["--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
    cmd += ["--torchvision-as-built"] if args.torchvision_as_built else []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MALLOC_MMAP_THRESHOLD)}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode:
        raise RuntimeError(f"memory child {' '.join(cmd[3:])} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------


def timed(calls: dict[str, Callable[[], object]], repeats: int, args: argparse.Namespace, device: torch.device) -> dict:
    """Interleaved rounds: wall seconds (the primary numbers) and this process's CPU seconds per call."""
    cpu: dict[str, list[float]] = {}
    wall = interleaved(calls, repeats=repeats, warmup=args.warmup, device=device, cpu_times=cpu)
    return {"wall_s": wall, "cpu_s": cpu}


INFERENCE_CONTENDERS = ["hcral_baseline", "torchvision"]


def time_detector(detector: str, args: argparse.Namespace, size: int, device: torch.device) -> dict:
    """Training steps of the two hcral configs and torchvision's, then inference in both regimes."""
    contenders = [*DETECTORS[detector]["configs"], "torchvision"]
    contenders += [c + BF16 for c in contenders] if args.bf16 else []
    batch = make_batch(size, device)
    out: dict = {"inference": {}, "detections": {}}
    models = {c: build(detector, base_name(c), size, tv_as_built=args.torchvision_as_built).to(device) for c in contenders}
    out["params"] = {c: param_counts(m) for c, m in models.items()}
    steps = {c: train_step(m, c, batch) for c, m in models.items()}
    out["train"] = timed(steps, args.repeats, args, device)
    out["final_loss"] = {c: step() for c, step in steps.items()}  # finite: the steps trained
    profiles = profile_calls({f"{detector} train {c}": s for c, s in steps.items()}) if args.profile else {}
    del models, steps
    gc.collect()
    for regime in REGIMES:
        # Inference does not depend on the losses: one hcral model (the baseline config's) per regime.
        models = {
            c: build(detector, base_name(c), size, regime, tv_as_built=args.torchvision_as_built).to(device)
            for c in INFERENCE_CONTENDERS + ([c + BF16 for c in INFERENCE_CONTENDERS] if args.bf16 else [])
        }
        calls = {c: inference(m, c, batch[0]) for c, m in models.items()}
        out["detections"][regime] = {c: [len(d["boxes"]) for d in fn()] for c, fn in calls.items()}
        out["inference"][regime] = timed(calls, args.inference_repeats, args, device)
        if args.profile:
            profiles.update(profile_calls({f"{detector} inference {regime} {c}": fn for c, fn in calls.items()}))
        del models, calls
        gc.collect()
    out["profiles"] = profiles
    return out


def time_backbones(args: argparse.Namespace, size: int, device: torch.device) -> dict:
    """The ResNet-50 (C3-C5) forward without grad, hcral's against torchvision's: the part of every
    row that neither head, loss nor post-processing decides."""
    images = make_batch(size, device)[0]
    bodies = {
        "hcral": build("fcos_atss", "hcral_baseline", size).backbone,
        "torchvision": build("fcos_atss", "torchvision", size, tv_as_built=args.torchvision_as_built).backbone.body,
    }

    def forward(body: nn.Module) -> Callable[[], object]:
        body.to(device).eval()

        def call() -> object:
            with torch.no_grad():
                return body(images)

        return call

    return timed({c: forward(body) for c, body in bodies.items()}, args.inference_repeats, args, device)


def ratio_row(label: str, group: dict, num: str, den: str) -> tuple[list[str], dict]:
    """A table row ``num`` against ``den``: median ms, paired wall ratio and its range, paired CPU-time ratio."""
    wall = paired_ratio(group["wall_s"], num, den)
    cpu = paired_ratio(group["cpu_s"], num, den)
    row = [
        label, f"{median(group['wall_s'][num]) * 1e3:.0f}", f"{median(group['wall_s'][den]) * 1e3:.0f}",
        f"{wall['median_of_round_ratios']:.3f}", f"{wall['min_round_ratio']:.2f}-{wall['max_round_ratio']:.2f}",
        f"{cpu['median_of_round_ratios']:.3f}",
    ]  # fmt: skip
    return row, {"wall": wall, "cpu": cpu}


def run(args: argparse.Namespace) -> dict:
    setup_threads(args.threads)
    device = torch.device(args.device)
    size = args.image_size or (QUICK_IMAGE_SIZE if args.quick else IMAGE_SIZE)
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.inference_repeats = args.inference_repeats or (1 if args.quick else 5)
    results = {d: time_detector(d, args, size, device) for d in args.detectors}
    backbone = time_backbones(args, size, device)

    rows, ratios = [], {}
    for d, r in results.items():
        title = DETECTORS[d]["title"]
        for c in DETECTORS[d]["configs"]:
            label = f"{title} train step, hcral {LOSSES[(d, c)]}"
            row, ratios[f"{d} train {c}"] = ratio_row(label, r["train"], c, "torchvision")
            rows.append(row)
        for regime in REGIMES:
            group = r["inference"][regime]
            ips = [BATCH_SIZE / median(group["wall_s"][c]) for c in ("hcral_baseline", "torchvision")]
            label = f"{title} inference, {regime} ({ips[0]:.2f} vs {ips[1]:.2f} images/s)"
            row, ratios[f"{d} inference {regime}"] = ratio_row(label, group, "hcral_baseline", "torchvision")
            rows.append(row)
        if args.bf16:  # hcral under bf16 against torchvision in float32, and under the same autocast
            for tv in ("torchvision", "torchvision" + BF16):
                against = "tv bf16" if tv.endswith(BF16) else "tv fp32"
                for c in DETECTORS[d]["configs"]:
                    label = f"{title} train step, hcral {LOSSES[(d, c)]} bf16 vs {against}"
                    row, ratios[f"{d} train {c} bf16 vs {against}"] = ratio_row(label, r["train"], c + BF16, tv)
                    rows.append(row)
                for regime in REGIMES:
                    label = f"{title} inference, {regime}, hcral bf16 vs {against}"
                    row, ratios[f"{d} inference {regime} bf16 vs {against}"] = ratio_row(
                        label, r["inference"][regime], "hcral_baseline" + BF16, tv
                    )
                    rows.append(row)
    label = "ResNet-50 C3-C5 forward alone, no grad"
    row, ratios["backbone forward"] = ratio_row(label, backbone, "hcral", "torchvision")
    rows.append(row)
    print_table(
        f"hcral vs torchvision, ResNet-50 FPN, batch {BATCH_SIZE} x {size} px, {torch.get_num_threads()} thread(s), "
        f"ms per batch, medians of {args.repeats} training / {args.inference_repeats} inference rounds",
        ["row", "hcral", "torchvision", "hcral / tv (paired)", "round range", "CPU time, hcral / tv"],
        rows,
    )

    memory: dict = {}
    if not args.no_memory:
        mem_rows = []
        for d in args.detectors:
            for mode, contenders in (("train", [*DETECTORS[d]["configs"], "torchvision"]),
                                     ("inference", ["hcral_baseline", "torchvision"])):  # fmt: skip
                memory[f"{d} {mode}"] = {c: peak_memory(d, c, mode, size, args) for c in contenders}
                tv = memory[f"{d} {mode}"]["torchvision"]["extra_peak_mib"]
                for c in contenders[:-1]:
                    mine = memory[f"{d} {mode}"][c]["extra_peak_mib"]
                    label = LOSSES[(d, c)] if mode == "train" else "full regime"
                    row = [f"{DETECTORS[d]['title']}, {mode}, {label}", f"{mine:.0f}", f"{tv:.0f}", f"{mine / tv:.2f}"]
                    mem_rows.append(row)
        print_table(
            "peak memory of one step / one inference call (extra MiB over the built model; fresh process each)",
            ["row", "hcral", "torchvision", "hcral / tv"],
            mem_rows,
        )
    for d, r in results.items():
        print(f"{d}: detections per image {r['detections']}; loss after the timed steps {r['final_loss']}")

    payload = {
        "setting": {
            "num_classes": NUM_CLASSES, "batch_size": BATCH_SIZE, "image_size": size, "gts_per_image": GTS_PER_IMAGE,
            "gt_sides_px": GT_SIDES, "sgd": {"lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY},
            "inference_regimes": REGIMES, "device": args.device, "torchvision_as_built": args.torchvision_as_built,
            "bf16": args.bf16,
        },  # fmt: skip
        "repeats": {"train": args.repeats, "inference": args.inference_repeats, "warmup": args.warmup},
        "results": results,
        "backbone_forward": backbone,
        "ratios_hcral_over_torchvision": ratios,
        "peak_memory": memory,
        "memory_method": (
            "fresh subprocess per row, MALLOC_MMAP_THRESHOLD_=65536; after one warm-up call and with the "
            "gradients freed: /proc/self/clear_refs, one call, VmHWM - VmRSS before (CUDA: max_memory_allocated)"
        ),
    }
    write_json(f"detectors{args.tag}", payload, args.out)
    return payload


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--inference-repeats", type=int, default=None, help="timed inference rounds (default 5; quick 1)")
    p.add_argument(
        "--image-size", type=int, default=None, help=f"square input side (default {IMAGE_SIZE}; quick {QUICK_IMAGE_SIZE})"
    )
    p.add_argument("--detectors", nargs="+", choices=sorted(DETECTORS), default=list(DETECTORS))
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument(
        "--torchvision-as-built", action="store_true",
        help="torchvision's detectors as weights=None builds them (BatchNorm trained, all layers trainable)",
    )  # fmt: skip
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one call of each")
    p.add_argument(
        "--bf16", action="store_true",
        help="also every contender under bf16 autocast: rows of hcral bf16 against torchvision fp32 and bf16",
    )  # fmt: skip
    p.add_argument("--memory-child", nargs=4, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.memory_child:
        setup_threads(args.threads)
        detector, contender, mode, size = args.memory_child
        _memory_child(detector, contender, mode, int(size), args)
        return None
    return run(args)


if __name__ == "__main__":
    main()
