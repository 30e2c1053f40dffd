"""Box coders: targets the regression branch predicts, and back to boxes.

Both work on any leading shape ``(..., 4)`` and are fully vectorised. Boxes are xyxy pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["DeltaXYWHCoder", "DistancePointCoder"]

# MMDetection's wh_ratio_clip = 16/1000: a decoded side is at most 1000/16 times the prior's.
DEFAULT_CLIP_RATIO = math.log(1000.0 / 16.0)


def _check_last_dim(name: str, t: Tensor, size: int) -> None:
    if t.shape[-1] != size:
        raise ValueError(f"{name} must have shape (..., {size}), got {tuple(t.shape)}")


def _clamp_to_image(boxes: Tensor, max_shape: tuple[int, int] | None) -> Tensor:
    """Clamp xyxy boxes to ``[0, width] x [0, height]``; ``max_shape = (height, width)``."""
    if max_shape is None:
        return boxes
    height, width = float(max_shape[0]), float(max_shape[1])
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height)), dim=-1)


class DeltaXYWHCoder:
    """Centre/size deltas of R-CNN, as MMDetection's ``DeltaXYWHBBoxCoder``.

    For a prior ``(px, py, pw, ph)`` (centre, size) and a box ``(gx, gy, gw, gh)``:
    ``d = ((gx - px) / pw, (gy - py) / ph, log(gw / pw), log(gh / ph))``, then normalised
    ``(d - means) / stds``. Decoding undoes it, clamping the log-size deltas to
    ``[-clip_ratio, clip_ratio]`` (a side grows or shrinks at most ``exp(clip_ratio)`` times) and,
    with ``max_shape = (height, width)``, clamping the box to the image.

    RetinaNet uses ``stds=(1, 1, 1, 1)``; ATSS ``stds=(0.1, 0.1, 0.2, 0.2)``.
    """

    def __init__(
        self,
        means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        *,
        clip_ratio: float = DEFAULT_CLIP_RATIO,
    ) -> None:
        if len(means) != 4 or len(stds) != 4:
            raise ValueError(f"means and stds need 4 values each, got {tuple(means)} and {tuple(stds)}")
        if any(s <= 0 for s in stds):
            raise ValueError(f"stds must be positive, got {tuple(stds)}")
        if clip_ratio <= 0:
            raise ValueError(f"clip_ratio must be positive, got {clip_ratio}")
        self.means = tuple(float(m) for m in means)
        self.stds = tuple(float(s) for s in stds)
        self.clip_ratio = float(clip_ratio)

    def encode(self, priors: Tensor, boxes: Tensor) -> Tensor:
        """``priors (..., 4)``, ``boxes (..., 4)`` -> normalised deltas ``(..., 4)``."""
        _check_last_dim("priors", priors, 4)
        _check_last_dim("boxes", boxes, 4)
        pw = priors[..., 2] - priors[..., 0]
        ph = priors[..., 3] - priors[..., 1]
        px = (priors[..., 0] + priors[..., 2]) * 0.5
        py = (priors[..., 1] + priors[..., 3]) * 0.5
        gw = boxes[..., 2] - boxes[..., 0]
        gh = boxes[..., 3] - boxes[..., 1]
        gx = (boxes[..., 0] + boxes[..., 2]) * 0.5
        gy = (boxes[..., 1] + boxes[..., 3]) * 0.5
        deltas = torch.stack(((gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)), dim=-1)
        means = deltas.new_tensor(self.means)
        stds = deltas.new_tensor(self.stds)
        return (deltas - means) / stds

    def decode(self, priors: Tensor, deltas: Tensor, *, max_shape: tuple[int, int] | None = None) -> Tensor:
        """``priors (..., 4)``, ``deltas (..., 4)`` -> boxes ``(..., 4)``; ``max_shape = (height, width)``."""
        _check_last_dim("priors", priors, 4)
        _check_last_dim("deltas", deltas, 4)
        d = deltas * deltas.new_tensor(self.stds) + deltas.new_tensor(self.means)
        pw = priors[..., 2] - priors[..., 0]
        ph = priors[..., 3] - priors[..., 1]
        px = (priors[..., 0] + priors[..., 2]) * 0.5
        py = (priors[..., 1] + priors[..., 3]) * 0.5
        dw = d[..., 2].clamp(-self.clip_ratio, self.clip_ratio)
        dh = d[..., 3].clamp(-self.clip_ratio, self.clip_ratio)
        gx = px + pw * d[..., 0]
        gy = py + ph * d[..., 1]
        gw = pw * dw.exp()
        gh = ph * dh.exp()
        boxes = torch.stack((gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5), dim=-1)
        return _clamp_to_image(boxes, max_shape)


class DistancePointCoder:
    """Distances from a point to the four box edges (FCOS), as MMDetection's ``DistancePointBBoxCoder``.

    ``encode``: ``(l, t, r, b) = (x - x1, y - y1, x2 - x, y2 - y)``, non-negative for a point inside
    the box; with ``max_dis`` they are clamped to ``[0, max_dis - eps]``. ``decode``:
    ``(x - l, y - t, x + r, y + b)``, clamped to the image with ``max_shape = (height, width)``.

    Distances are in pixels. Stride normalisation (the head predicts ``distance / stride`` and
    multiplies by the stride before decoding, FCOS's ``norm_on_bbox``) is the head's business.
    """

    def encode(
        self, points: Tensor, boxes: Tensor, *, max_dis: float | None = None, eps: float = 0.1
    ) -> Tensor:
        """``points (..., 2)``, ``boxes (..., 4)`` -> distances ``(..., 4)`` as (l, t, r, b)."""
        _check_last_dim("points", points, 2)
        _check_last_dim("boxes", boxes, 4)
        x, y = points[..., 0], points[..., 1]
        dist = torch.stack((x - boxes[..., 0], y - boxes[..., 1], boxes[..., 2] - x, boxes[..., 3] - y), dim=-1)
        if max_dis is not None:
            dist = dist.clamp(min=0, max=max_dis - eps)
        return dist

    def decode(self, points: Tensor, distances: Tensor, *, max_shape: tuple[int, int] | None = None) -> Tensor:
        """``points (..., 2)``, ``distances (..., 4)`` -> boxes ``(..., 4)``."""
        _check_last_dim("points", points, 2)
        _check_last_dim("distances", distances, 4)
        x, y = points[..., 0], points[..., 1]
        boxes = torch.stack(
            (x - distances[..., 0], y - distances[..., 1], x + distances[..., 2], y + distances[..., 3]), dim=-1
        )
        return _clamp_to_image(boxes, max_shape)
