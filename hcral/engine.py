"""Train one epoch and evaluate: the model-agnostic loop, as in DETR's engine.py.

Neither function knows which detector or loss it runs; both take a model whose forward returns a
dict of weighted loss terms in training mode and detections in eval mode.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from hcral.distributed import all_gather_objects, is_main_process, reduce_mean
from hcral.evaluation import coco_evaluate, detections_to_coco
from hcral.precision import autocast


def _to_device(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


class NonFiniteLossError(FloatingPointError):
    """The loss of a training step is NaN or infinite: names the terms that are, with the others'
    values. ``iteration`` (1-based) is filled in by the caller that counts iterations."""

    def __init__(self, terms: dict[str, float], bad_weight: str | None = None, iteration: int | None = None) -> None:
        super().__init__(terms)
        self.terms, self.bad_weight, self.iteration = terms, bad_weight, iteration

    def __str__(self) -> str:
        bad = ", ".join(f"{k}={v}" for k, v in self.terms.items() if not math.isfinite(v))
        good = ", ".join(f"{k}={v:.4g}" for k, v in self.terms.items() if math.isfinite(v))
        where = "" if self.iteration is None else f" at iteration {self.iteration}"
        # Non-finite weights make every term non-finite: the update before this step diverged.
        weights = f"; the weights were non-finite already (first: {self.bad_weight})" if self.bad_weight else ""
        return (
            f"non-finite loss{where}: {bad}" + (f" (finite: {good})" if good else "") + weights
            + "; lower train.lr or set train.grad_clip"
        )


def first_non_finite_parameter(model: nn.Module) -> str | None:
    """The name of the first parameter holding a NaN or an infinity, or None."""
    return next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)


def train_one_epoch(
    model: nn.Module,
    batches: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    *,
    grad_clip: float | None = None,
    amp: bool = False,
    channels_last: bool = False,
    on_step: Callable[[dict[str, Any]], bool] | None = None,
) -> None:
    """One pass over ``batches``. After each step ``on_step(record)`` is called with the loss terms,
    learning rate and step time; it returns True to stop early (iteration budget, checkpointing).
    ``amp``: bf16 autocast over the forward (hcral/precision.py; pass ``resolve_amp``'s answer)."""
    model.train()
    for images, targets in batches:
        start = time.perf_counter()
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = _to_device(targets, device)
        with autocast(device, amp):
            terms = model(images, targets)
        loss = sum(terms.values())
        if not torch.isfinite(loss):
            raise NonFiniteLossError({k: float(v.detach()) for k, v in terms.items()}, first_non_finite_parameter(model))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = None
        if grad_clip is not None:
            grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
        optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        record: dict[str, Any] = {k: float(reduce_mean(v.detach())) for k, v in terms.items()}
        record["loss"] = sum(record.values())
        record["lr"] = lr
        if grad_norm is not None:
            record["grad_norm"] = grad_norm if math.isfinite(grad_norm) else None
        record["step_time"] = time.perf_counter() - start
        if on_step is not None and on_step(record):
            return


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable,
    dataset: Any,
    device: torch.device,
    *,
    amp: bool = False,
    channels_last: bool = False,
) -> tuple[dict[str, float] | None, list[dict]]:
    """COCO box metrics over ``batches``; detections of every rank are gathered to the main one.

    ``dataset`` gives ``coco_gt()`` and ``cat_ids``. Returns (metrics or None off the main process,
    detections in COCO result format in original-image pixels).
    """
    model.eval()
    detections: list[dict] = []
    for images, targets in batches:
        images = images.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        sizes = [tuple(t["size"]) for t in targets]
        with autocast(device, amp):
            outputs = model(images, image_sizes=sizes)
        for out, t in zip(outputs, targets):
            detections.extend(
                detections_to_coco(
                    t["image_id"], out["boxes"].float().cpu(), out["scores"].float().cpu(),
                    out["labels"].cpu(), dataset.cat_ids, t["scale_factor"],
                )
            )
    gathered = [d for part in all_gather_objects(detections) for d in part]
    if not is_main_process():
        return None, gathered
    return coco_evaluate(dataset.coco_gt(), gathered), gathered
