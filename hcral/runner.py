"""Runs: build data and model from a config, train with exact resume, evaluate, predict.

Exact resume rests on three things saved in every checkpoint: the model/optimiser/scheduler state,
every RNG state, and the data position (epoch, batches done). The sample order is a function of
(seed, epoch) and each sample's augmentation a function of (seed, epoch, index), so a resumed run
sees the same batches as one that never stopped, whatever the number of loader workers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from hcral import distributed as D
from hcral.checkpoint import (
    CHECKPOINT,
    LOG,
    RUN_CONFIG,
    check_inference_config,
    check_resume_config,
    ensure_writable_dir,
    eval_dir,
    load_checkpoint,
    load_model_state,
    prepare_train_dir,
)
from hcral.config import Config, ConfigError, config_to_dict, save_config, validate
from hcral.data import (
    CocoDataset, DatasetError, DetectionDataset, SyntheticShapes, VOCDataset, YOLODataset, build_transforms, collate,
)
from hcral.data.base import SubsetDataset, holdout_indices
from hcral.data.check import check_splits, collect_images, raise_if_problems
from hcral.engine import NonFiniteLossError, evaluate, train_one_epoch
from hcral.experiments.analyze import score_iou_metrics
from hcral.models.build import build_model
from hcral.models.detector import Detector
from hcral.precision import autocast, resolve_amp, use_channels_last
from hcral.utils import add_note, append_text, keep_freed_memory, rng_state, seed_everything, set_rng_state, torch_save_atomic, write_json_atomic

# Pad inputs to a multiple of this: the coarsest backbone stride (C5, 32), as MMDetection pads.
SIZE_DIVISOR = 32
# Detections drawn into predict's PNGs: this score or more (predictions.json keeps all).
DRAW_SCORE_THR = 0.3
# Signals that ask a training run to stop: SLURM, Kubernetes and torchrun send SIGTERM before they
# kill (preemption, time limit), a terminal's Ctrl-C sends SIGINT.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def build_dataset(cfg: Config, *, train: bool, class_names: list[str] | None = None) -> DetectionDataset:
    """The training or validation set of ``cfg``, labelled with the run's one class list.

    With ``data.holdout_fraction > 0`` both come from the training split: the training set is its
    images outside the held-out draw and the validation set (with evaluation transforms) the
    held-out images (:func:`~hcral.data.base.holdout_indices`).
    """
    d = cfg.data
    if d.holdout_fraction == 0:
        return _build_split(cfg, train=train, class_names=class_names)
    full = _build_split(cfg, train=train, class_names=class_names, split_of_train=True)
    held_out = holdout_indices(len(full), d.holdout_fraction, seed=d.holdout_seed)
    if not train:
        return SubsetDataset(full, held_out)
    held = set(held_out)
    return SubsetDataset(full, [i for i in range(len(full)) if i not in held])


def _build_split(
    cfg: Config, *, train: bool, class_names: list[str] | None = None, split_of_train: bool = False
) -> DetectionDataset:
    """The training or validation split of ``cfg`` as configured (no held-out part).

    The list is ``class_names`` (the training set's, or a checkpoint's), else ``data.class_names``,
    else, for the training set only, the classes its data holds. A validation set without a list
    is an error: its own list would number the classes differently from the model's.
    """
    d = cfg.data
    from_train = train or split_of_train  # whose images; the transforms follow `train`
    names = class_names if class_names is not None else d.class_names
    transforms = build_transforms(train=train, short_side=d.short_side, max_side=d.max_side, flip_prob=d.flip_prob)
    if d.dataset == "synthetic":
        size = (d.synthetic_size, d.synthetic_size)
        # Validation images come from a seed range the training set never uses.
        seed = d.synthetic_seed if from_train else d.synthetic_seed + 1_000_003
        count = d.synthetic_train if from_train else d.synthetic_val
        dataset = SyntheticShapes(
            count, image_size=size, num_classes=d.synthetic_classes, seed=seed, transforms=transforms
        )
        if names is not None and list(names) != dataset.class_names:
            raise DatasetError(
                f"class list {list(names)} is not the synthetic set's {dataset.class_names} "
                f"(data.synthetic_classes={d.synthetic_classes})"
            )
        return dataset
    if not train and names is None:
        raise ValueError(
            "the validation set needs the run's class list: pass the training set's or the "
            "checkpoint's class_names, or set data.class_names"
        )
    if d.dataset == "voc":
        split = d.train_split if from_train else d.val_split
        return VOCDataset(d.root, split, class_names=names, transforms=transforms)
    if d.dataset == "yolo":
        # Labels are indices into data.yaml's names, so a given list must equal them.
        split = d.train_split if from_train else d.val_split
        return YOLODataset(d.root, split, class_names=names, transforms=transforms)
    ann, images = (d.train_ann, d.train_images) if from_train else (d.val_ann, d.val_images)
    return CocoDataset(ann, images, class_names=names, transforms=transforms)


def build_splits(cfg: Config) -> tuple[DetectionDataset, DetectionDataset]:
    """``(train_set, val_set)``, the validation set labelled with the training set's class list."""
    train_set = build_dataset(cfg, train=True)
    return train_set, build_dataset(cfg, train=False, class_names=train_set.class_names)


class SeededAugmentation(Dataset):
    """Makes each sample's random augmentation a function of (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
            return self.dataset[index]


class ResumableSampler(Sampler[int]):
    """Shuffled (seed, epoch) order, sharded over ranks, able to start mid-epoch.

    With ``pad=True`` (training) the order is padded by repetition so every rank gets as many
    samples; evaluation uses ``pad=False`` so no image is counted twice. With ``groups`` (one id
    per sample, e.g. landscape/portrait) every run of ``batch_size`` samples a rank draws comes
    from one group: each group is shuffled and padded by repetition to whole chunks of
    ``batch_size * world`` samples, and the chunks are shuffled (MMDetection's GroupSampler).
    A single group gives exactly the order without groups.
    """

    def __init__(
        self,
        size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        pad: bool = True,
        groups: Sequence[int] | None = None,
        batch_size: int = 1,
    ) -> None:
        if groups is not None and (len(groups) != size or not (shuffle and pad)):
            raise ValueError("groups need one id per sample, shuffle=True and pad=True")
        self.size, self.shuffle, self.seed, self.pad = size, shuffle, seed, pad
        self.groups, self.batch_size = groups, batch_size
        self.rank, self.world = D.get_rank(), D.get_world_size()
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        # One group (e.g. square synthetic images): the plain shuffled order, as without groups.
        if self.groups is not None and len(set(self.groups)) > 1:
            chunk = self.batch_size * self.world
            chunks: list[list[int]] = []
            for group in sorted(set(self.groups)):
                members = [i for i, k in enumerate(self.groups) if k == group]
                members = [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
                padded = math.ceil(len(members) / chunk) * chunk
                members = [members[j % len(members)] for j in range(padded)]
                chunks += [members[j : j + chunk] for j in range(0, len(members), chunk)]
            order = [i for j in torch.randperm(len(chunks), generator=g).tolist() for i in chunks[j]]
        elif self.shuffle:
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.pad and self.size and len(order) % self.world:
            order += order[: self.world - len(order) % self.world]
        return order[self.rank :: self.world]

    def __iter__(self):
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        return max(len(self._indices()) - self.start, 0)


def aspect_groups(dataset: DetectionDataset) -> list[int]:
    """0 for landscape (w >= h) images, 1 for portrait, from the records' sizes (no decoding)."""
    return [int(h > w) for h, w in (dataset.image_hw(i) for i in range(len(dataset)))]


def _leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """Loader workers ignore SIGTERM and SIGINT: Ctrl-C and SLURM's scancel signal every process of
    the job, and the main process must finish its step and checkpoint before the workers go. A
    worker still exits when the main process does (the loader's watchdog)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def make_loader(dataset: Dataset, sampler: Sampler, batch_size: int, num_workers: int, seed: int = 0) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=BatchSampler(sampler, batch_size, drop_last=False),
        num_workers=num_workers,
        worker_init_fn=_leave_stop_signals_to_the_main_process,
        collate_fn=partial(collate, size_divisor=SIZE_DIVISOR),  # picklable for any worker start method
        persistent_workers=False,  # workers re-read the epoch of SeededAugmentation at each epoch
        # Worker seeds come from this generator, not the global RNG, so building a loader (at a
        # resume, or for evaluation) leaves the training RNG stream untouched.
        generator=torch.Generator().manual_seed(seed),
    )


# ---------------------------------------------------------------------------------------------
# Optimiser and schedule
# ---------------------------------------------------------------------------------------------


def build_optimizer(cfg: Config, model: torch.nn.Module, iters_per_epoch: int):
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)

    def factor(it: int) -> float:
        # Linear warm-up from warmup_ratio (as MMDetection), then ×lr_gamma at each epoch in lr_steps.
        warm = 1.0
        if it < t.warmup_iters:
            warm = t.warmup_ratio + (1 - t.warmup_ratio) * it / t.warmup_iters
        epoch = it // max(iters_per_epoch, 1)
        return warm * t.lr_gamma ** sum(epoch >= s for s in t.lr_steps)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return optimizer, scheduler


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"train.device={name}: CUDA is not available here (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda or 'none'}); use train.device=auto or cpu", key="train.device",
        )
    return device


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def precision_of(cfg: Config, device: torch.device) -> tuple[bool, bool]:
    """``(amp, channels_last)`` as they take effect on ``device`` (hcral/precision.py)."""
    amp = resolve_amp(cfg.train.amp, device, cpu=cfg.train.cpu_amp)
    return amp, use_channels_last(cfg.train.channels_last, device, amp)


def to_memory_format(model: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    return model.to(memory_format=torch.channels_last) if channels_last else model


def unwrap(model: torch.nn.Module) -> Detector:
    return model.module if hasattr(model, "module") else model


def load_model_weights(model: Detector, path: str | Path, ckpt: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load the weights of checkpoint ``path`` (or of ``ckpt``, already loaded from it) into ``model``
    for inference: the loss's state is skipped. Returns the checkpoint."""
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    load_model_state(model, ckpt, path, loss_state=False)
    return ckpt


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------


class JsonlLog:
    """Appends one JSON object per logged step; the file survives crashes line by line."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            append_text(self.path, json.dumps(record) + "\n")


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="it", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Train / evaluate / predict
# ---------------------------------------------------------------------------------------------


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT stopped ``train`` after a step, and the checkpoint of that step is written.
    ``exit_code`` is what a shell reports for a process the signal killed (128 + its number), so a
    scheduler (SLURM's requeue, a Kubernetes restart policy) sees the stop it asked for."""

    def __init__(self, signum: int, iteration: int, checkpoint: Path, config: Path) -> None:
        self.signum, self.iteration = signum, iteration
        self.exit_code = 128 + signum
        super().__init__(
            f"received {signal.Signals(signum).name}; checkpoint written at iteration {iteration}: {checkpoint}; "
            f"continue with: hcral train {config} --resume"
        )


@contextlib.contextmanager
def _stop_requests(enabled: bool) -> Iterator[list[int]]:
    """The STOP_SIGNALS received inside, in order. They are only recorded: the step under way
    finishes, and a second signal cannot cut the checkpoint write short. Python handles signals in
    the main thread only, so elsewhere (or when not ``enabled``) nothing changes."""
    received: list[int] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum)) for signum in STOP_SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python


def train(cfg: Config, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train as the config says; returns the last metrics (or {} if evaluation is off).

    A folder that already holds a run is an error unless ``resume``; a resume continues from its
    checkpoint only with the same config (hcral/checkpoint.py says which settings may change).
    With ``train.signal_checkpoint``, SIGTERM or SIGINT ends the run after the step under way with
    a checkpoint of that step, raising :class:`TrainingInterrupted`.
    """
    with _stop_requests(cfg.train.signal_checkpoint) as stop_signals:
        return _train(cfg, resume=resume, progress=progress, stop_signals=stop_signals)


def _train(cfg: Config, *, resume: bool, progress: bool, stop_signals: list[int]) -> dict[str, Any]:
    validate(cfg)
    device = resolve_device(cfg.train.device)
    if device.type == "cpu" and cfg.train.keep_freed_memory:
        keep_freed_memory()
    D.init_from_env(device)
    main = D.is_main_process()
    out = Path(cfg.out_dir)
    ckpt_path = out / CHECKPOINT
    ckpt = load_checkpoint(ckpt_path) if resume and ckpt_path.is_file() else None
    if ckpt is not None:
        check_resume_config(ckpt, cfg, ckpt_path)
    if main:
        for stale in prepare_train_dir(out, resume=resume, checkpoint_iter=ckpt["global_iter"] if ckpt else None):
            print(f"removed {stale}, left by an interrupted write", file=sys.stderr)
        save_config(cfg, out / RUN_CONFIG)

    seed_everything(cfg.train.seed + D.get_rank())
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    train_set, val_set = build_splits(cfg)
    # Every image header and annotation of both splits now, not when its batch comes.
    raise_if_problems(check_splits(train_set, val_set))
    train_data = SeededAugmentation(train_set, cfg.train.seed)
    sampler = ResumableSampler(
        len(train_set), shuffle=True, seed=cfg.train.seed, batch_size=cfg.data.batch_size,
        groups=aspect_groups(train_set) if cfg.data.group_by_aspect_ratio else None,
    )
    iters_per_epoch = math.ceil(len(sampler) / cfg.data.batch_size)
    if iters_per_epoch == 0:
        raise ValueError(f"the training set is empty ({type(train_set).__name__})")

    model = build_model(cfg, train_set.num_classes).to(device)
    amp, use_cl = precision_of(cfg, device)
    model = to_memory_format(model, use_cl)
    precision = "bf16" if amp else "fp32"  # as it took effect: train.amp is off on CPUs without bf16
    if ckpt is not None and ckpt.get("precision", precision) != precision and main:
        print(f"note: {ckpt_path} was trained in {ckpt['precision']} up to iteration {ckpt['global_iter']}; "
              f"it continues in {precision} (train.amp={cfg.train.amp} on {device.type})", file=sys.stderr)  # fmt: skip
    optimizer, scheduler = build_optimizer(cfg, model, iters_per_epoch)
    epoch, batches_done, global_iter = 0, 0, 0
    if ckpt is not None:
        if ckpt.get("class_names", train_set.class_names) != train_set.class_names:
            raise DatasetError(f"{ckpt_path}: trained on classes {ckpt['class_names']}, the data now has {train_set.class_names}")
        load_model_state(model, ckpt, ckpt_path, loss_state=True)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"][min(D.get_rank(), len(ckpt["rng"]) - 1)])
        epoch, batches_done, global_iter = ckpt["epoch"], ckpt["batches_done"], ckpt["global_iter"]
        if batches_done >= iters_per_epoch:
            epoch, batches_done = epoch + 1, 0
    if D.is_dist():
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    total_iters = iters_per_epoch * cfg.train.epochs
    if cfg.train.max_iters is not None:
        total_iters = min(total_iters, cfg.train.max_iters)
    if ckpt is not None and global_iter >= total_iters and main:
        print(f"{ckpt_path} is at iteration {global_iter} of {total_iters} already: nothing to train "
              f"(hcral eval --checkpoint {ckpt_path} evaluates it)", file=sys.stderr)  # fmt: skip
    log = JsonlLog(out / LOG, main)
    metrics: dict[str, Any] = {}
    position = {"epoch": epoch, "batches_done": batches_done, "global_iter": global_iter}
    saved_iter = global_iter if ckpt is not None else None

    def checkpoint() -> None:
        states = D.all_gather_objects(rng_state())
        if main:
            # Everything a resume needs, written atomically (temp file + rename).
            state = dict(
                model=unwrap(model).state_dict(), optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(), rng=states, config=config_to_dict(cfg),
                class_names=list(train_set.class_names), cat_ids=list(train_set.cat_ids),
                precision=precision, **position,
            )
            torch_save_atomic(state, ckpt_path)
        nonlocal saved_iter
        saved_iter = position["global_iter"]

    grad_share = unwrap(model).head.grad_share  # train.log_grad_share
    bar = _progress(total_iters, global_iter, progress and main)
    started = time.perf_counter()
    steps_this_run = 0

    def on_step(record: dict[str, Any]) -> bool:
        nonlocal steps_this_run
        position["global_iter"] += 1
        position["batches_done"] += 1
        steps_this_run += 1
        it = position["global_iter"]
        rate = (time.perf_counter() - started) / steps_this_run
        record.update(iter=it, epoch=position["epoch"], eta_s=round(rate * (total_iters - it), 1))
        if it % cfg.train.log_interval == 0 or it == total_iters:
            if grad_share is not None:  # sums since the last record; every rank reads (DDP all-reduce)
                record.update(grad_share.pop())
            log.write(record)
        bar.update(1)
        bar.set_postfix({k[5:] if k.startswith("loss_") else k: f"{v:.3f}" for k, v in record.items() if k.startswith("loss")})
        if cfg.train.checkpoint_iters and it % cfg.train.checkpoint_iters == 0:
            checkpoint()
        # Every rank stops at the same step (a signal may reach the ranks at different steps).
        if cfg.train.signal_checkpoint and D.any_rank(bool(stop_signals), device):
            if saved_iter != it:
                checkpoint()
            raise TrainingInterrupted(stop_signals[0] if stop_signals else signal.SIGTERM, it, ckpt_path, out / RUN_CONFIG)
        return it >= total_iters

    try:
        while position["epoch"] < cfg.train.epochs and position["global_iter"] < total_iters:
            e = position["epoch"]
            sampler.set_epoch(e, start=position["batches_done"] * cfg.data.batch_size)
            train_data.epoch = e
            loader = make_loader(train_data, sampler, cfg.data.batch_size, cfg.data.num_workers, seed=cfg.train.seed + e)
            train_one_epoch(
                model, loader, optimizer, scheduler, device, grad_clip=cfg.train.grad_clip,
                amp=amp, channels_last=use_cl, on_step=on_step,
            )
            epoch_done = position["batches_done"] >= iters_per_epoch
            if epoch_done:
                position["epoch"], position["batches_done"] = e + 1, 0
            finished = position["global_iter"] >= total_iters or position["epoch"] >= cfg.train.epochs
            if finished or (epoch_done and cfg.train.checkpoint_interval and (e + 1) % cfg.train.checkpoint_interval == 0):
                checkpoint()
            if finished or (epoch_done and cfg.train.eval_interval and (e + 1) % cfg.train.eval_interval == 0):
                metrics = run_evaluation(cfg, unwrap(model), val_set, device, out)
                if main and metrics:
                    log.write({"iter": position["global_iter"], "epoch": e, **{f"val_{k}": v for k, v in metrics.items()}})
            if finished:
                break
    except TrainingInterrupted:
        raise
    except Exception as e:
        if isinstance(e, NonFiniteLossError):
            e.iteration = position["global_iter"] + 1  # the step that failed was never counted
        add_note(e, _resume_hint(out, position["global_iter"], saved_iter))
        raise
    finally:
        bar.close()
    return metrics


def _resume_hint(out: Path, global_iter: int, saved_iter: int | None) -> str:
    """Where a failed run can continue from."""
    if saved_iter is None:
        return f"stopped after iteration {global_iter}; no checkpoint was written yet"
    return (
        f"stopped after iteration {global_iter}; last good checkpoint: {out / CHECKPOINT} (iteration {saved_iter}); "
        f"continue with: hcral train {out / RUN_CONFIG} --resume"
    )


def run_evaluation(cfg: Config, model: Detector, dataset: Dataset, device: torch.device, out: Path) -> dict[str, float]:
    """Evaluate, write metrics.json (COCO AP and :func:`hcral.experiments.analyze.score_iou_metrics`)
    and detections.json (COCO results) into ``out``."""
    sampler = ResumableSampler(len(dataset), shuffle=False, pad=False)
    loader = make_loader(dataset, sampler, cfg.eval.batch_size, cfg.data.num_workers)
    amp, use_cl = precision_of(cfg, device)
    metrics, detections = evaluate(to_memory_format(model, use_cl), loader, dataset, device, amp=amp, channels_last=use_cl)
    if D.is_main_process() and metrics is not None:
        # What RCI is for (formulation §2), recorded beside AP so that `hcral ablate` tables keep it.
        metrics.update(score_iou_metrics(dataset.coco_gt(), detections))
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "metrics.json", metrics, indent=2)
        write_json_atomic(out / "detections.json", detections)
    return metrics or {}


def evaluate_checkpoint(
    cfg: Config, checkpoint: str | Path, out_dir: str | Path | None = None, *, ckpt: dict[str, Any] | None = None
) -> dict[str, float]:
    """Evaluate a checkpoint into a folder of its own: ``out_dir``, or else ``eval`` (``eval2``, ...)
    beside the checkpoint (:func:`hcral.checkpoint.eval_dir`). It gets config.yaml, log.jsonl,
    metrics.json, detections.json, and ``checkpoint.pt`` as a link to the evaluated file.

    ``cfg`` must be the checkpoint's config up to the settings that may change
    (:data:`hcral.checkpoint.INFERENCE_FREE`); :func:`hcral.checkpoint.inference_config` makes one.
    ``ckpt`` is the checkpoint if the caller has loaded it already.
    """
    validate(cfg)
    ckpt = load_checkpoint(checkpoint) if ckpt is None else ckpt
    check_inference_config(ckpt, cfg, checkpoint)
    out = eval_dir(checkpoint, cfg, out_dir)
    cfg = replace(cfg, out_dir=str(out))
    device = resolve_device(cfg.train.device)
    D.init_from_env(device)
    dataset = build_dataset(cfg, train=False, class_names=ckpt.get("class_names"))
    raise_if_problems(check_splits(None, dataset))
    model = build_model(cfg, dataset.num_classes).to(device)
    load_model_state(model, ckpt, checkpoint, loss_state=False)
    if D.is_main_process():
        ensure_writable_dir(out)
        save_config(cfg, out / RUN_CONFIG)
        link = out / CHECKPOINT
        if not link.exists():
            link.symlink_to(Path(checkpoint).resolve())
    metrics = run_evaluation(cfg, model, dataset, device, out)
    JsonlLog(out / LOG, D.is_main_process()).write(
        {"event": "eval", "checkpoint": str(Path(checkpoint).resolve()), **{f"val_{k}": v for k, v in metrics.items()}}
    )
    return metrics


def predict(
    cfg: Config,
    checkpoint: str | Path,
    images: list[str | Path],
    out_dir: str | Path,
    *,
    score_thr: float = DRAW_SCORE_THR,
    ckpt: dict[str, Any] | None = None,
) -> list[dict]:
    """Detect objects in image files; writes ``predictions.json`` (COCO results, original pixels,
    with ``file_name``) and one PNG per image into ``out_dir``.

    ``images`` are files or folders (every image file in a folder, sorted); all are checked before
    the model is loaded, so a bad path fails the run before anything is written. The PNGs show the
    detections with a score of at least ``score_thr``; ``predictions.json`` holds all of them
    (down to ``eval.score_thr``). ``ckpt`` is the checkpoint if the caller has loaded it already.
    """
    from hcral.data import empty_target, load_image
    from hcral.evaluation import detections_to_coco
    from hcral.visualize import draw_detections, write_png_atomic

    if not 0.0 <= score_thr <= 1.0:
        raise ValueError(f"score_thr must be in [0, 1], got {score_thr}")
    paths = collect_images(images)
    device = resolve_device(cfg.train.device)
    ckpt = load_checkpoint(checkpoint) if ckpt is None else ckpt
    check_inference_config(ckpt, cfg, checkpoint)
    class_names, cat_ids = ckpt.get("class_names"), ckpt.get("cat_ids")
    if not class_names:
        raise RuntimeError(f"{checkpoint}: no class names stored; was it written by 'hcral train'?")
    model = build_model(cfg, len(class_names)).to(device)
    load_model_state(model, ckpt, checkpoint, loss_state=False)
    amp, use_cl = precision_of(cfg, device)
    model = to_memory_format(model, use_cl).eval()
    transforms = build_transforms(train=False, short_side=cfg.data.short_side, max_side=cfg.data.max_side)
    out = ensure_writable_dir(out_dir)
    results: list[dict] = []
    for image_id, path in enumerate(paths):
        image = load_image(path)  # uint8 (3, H, W)
        tensor, info = transforms(image, empty_target(*image.shape[-2:], image_id=image_id))
        batch, _ = collate([(tensor, info)], size_divisor=SIZE_DIVISOR)
        with torch.no_grad(), autocast(device, amp):
            batch = batch.to(device).contiguous(memory_format=torch.channels_last if use_cl else torch.contiguous_format)
            det = model(batch, image_sizes=[info["size"]])[0]
        dets = detections_to_coco(
            image_id, det["boxes"].cpu(), det["scores"].cpu(), det["labels"].cpu(), cat_ids, info["scale_factor"]
        )
        for d in dets:
            d["file_name"] = path.name
        results.extend(dets)
        drawn = draw_detections(image, dets, class_names, cat_ids, score_thr=score_thr)
        write_png_atomic(drawn, out / f"{path.stem}.png")
    write_json_atomic(out / "predictions.json", results)
    return results
