"""Prior generators: anchor boxes (RetinaNet, ATSS) and points (FCOS), with MMDetection's layout.

Order of priors within a level: row-major over the feature map, then over the base priors at a
location: index ``(y * W + x) * A + a`` (MMDetection's ``grid_priors``). Levels are returned as a
list, finest first. Prior grids are cached per (level, size, device, dtype) in a small LRU cache;
returned tensors are shared with the cache, so treat them as read-only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "ATSS_ANCHORS",
    "AnchorGenerator",
    "POINT_PRIOR_SIDE",
    "PointGenerator",
    "RETINANET_ANCHORS",
    "points_to_boxes",
]

# Entries kept per generator: enough for multi-scale training, bounded for long runs.
_CACHE_SIZE = 64
# §5: "each point's prior box is a square of side 8·stride centred on it".
POINT_PRIOR_SIDE = 8.0


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Grid coordinates up to a few thousand pixels: fp16/bf16 would round them, so build in
    # float32 (float64 stays float64) and cast at the end.
    return torch.float64 if dtype == torch.float64 else torch.float32


class _GridCache:
    def __init__(self, size: int = _CACHE_SIZE) -> None:
        self.size = size
        self._store: OrderedDict[tuple, Tensor] = OrderedDict()

    def get(self, key: tuple) -> Tensor | None:
        value = self._store.get(key)
        if value is not None:
            self._store.move_to_end(key)
        return value

    def put(self, key: tuple, value: Tensor) -> None:
        self._store[key] = value
        if len(self._store) > self.size:
            self._store.popitem(last=False)


def _check_feat_sizes(feat_sizes: Sequence[Sequence[int]], num_levels: int) -> list[tuple[int, int]]:
    if len(feat_sizes) != num_levels:
        raise ValueError(f"expected {num_levels} feature sizes (one per stride), got {len(feat_sizes)}")
    sizes = [(int(h), int(w)) for h, w in feat_sizes]
    if any(h < 0 or w < 0 for h, w in sizes):
        raise ValueError(f"feature sizes must be non-negative (H, W) pairs, got {sizes}")
    return sizes


def _grid_xy(
    height: int, width: int, stride: float, offset: float, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """x and y of every cell, row-major ``(H*W,)``: ``((col + offset) * stride, (row + offset) * stride)``."""
    xs = (torch.arange(width, device=device, dtype=dtype) + offset) * stride
    ys = (torch.arange(height, device=device, dtype=dtype) + offset) * stride
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return xx.reshape(-1), yy.reshape(-1)


class AnchorGenerator:
    """Anchor boxes as MMDetection's ``AnchorGenerator``.

    Per level with stride ``s`` and base size ``b = s`` (or ``base_sizes``): scales
    ``octave_base_scale * 2 ** (i / scales_per_octave)``, ``i < scales_per_octave``; ratios are
    ``h / w``. For ratio ``r`` and scale ``k``: ``w = b * k / sqrt(r)``, ``h = b * k * sqrt(r)``; base
    anchors are ordered ratio-major then scale (``scale_major=True``), centred at
    ``(center_offset * b, center_offset * b)``, and shifted to ``(x * s, y * s)`` for every cell.

    RetinaNet: defaults (9 anchors per location). ATSS: ``octave_base_scale=8, scales_per_octave=1,
    ratios=(1.0,)`` (one square anchor of side ``8 * s``).
    """

    def __init__(
        self,
        strides: Sequence[int] = (8, 16, 32, 64, 128),
        *,
        octave_base_scale: float = 4,
        scales_per_octave: int = 3,
        ratios: Sequence[float] = (0.5, 1.0, 2.0),
        center_offset: float = 0.0,
        base_sizes: Sequence[float] | None = None,
    ) -> None:
        if not strides or any(s <= 0 for s in strides):
            raise ValueError(f"strides must be positive, got {tuple(strides)}")
        if scales_per_octave < 1 or octave_base_scale <= 0:
            raise ValueError(
                f"need scales_per_octave >= 1 and octave_base_scale > 0, got {scales_per_octave}, {octave_base_scale}"
            )
        if not ratios or any(r <= 0 for r in ratios):
            raise ValueError(f"ratios must be positive, got {tuple(ratios)}")
        base_sizes = list(strides) if base_sizes is None else list(base_sizes)
        if len(base_sizes) != len(strides):
            raise ValueError(f"{len(base_sizes)} base_sizes for {len(strides)} strides")
        self.strides = [int(s) for s in strides]
        self.base_sizes = [float(b) for b in base_sizes]
        self.octave_base_scale = float(octave_base_scale)
        self.scales_per_octave = int(scales_per_octave)
        self.ratios = [float(r) for r in ratios]
        self.center_offset = float(center_offset)
        self.scales = [
            self.octave_base_scale * 2 ** (i / self.scales_per_octave) for i in range(self.scales_per_octave)
        ]
        self.base_anchors: list[Tensor] = [self._base_anchors(b) for b in self.base_sizes]
        self._cache = _GridCache()

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def num_base_priors(self) -> int:
        """Anchors per location (the same on every level): ``len(ratios) * scales_per_octave``."""
        return len(self.ratios) * self.scales_per_octave

    def _base_anchors(self, base_size: float) -> Tensor:
        """``(A, 4)`` float64 anchors of one cell at the origin, ratio-major then scale."""
        ratios = torch.tensor(self.ratios, dtype=torch.float64)
        scales = torch.tensor(self.scales, dtype=torch.float64)
        h_ratios = ratios.sqrt()
        w_ratios = 1 / h_ratios
        ws = (base_size * w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (base_size * h_ratios[:, None] * scales[None, :]).reshape(-1)
        c = self.center_offset * base_size
        return torch.stack((c - ws / 2, c - hs / 2, c + ws / 2, c + hs / 2), dim=-1)

    def single_level_grid_priors(
        self, feat_size: tuple[int, int], level: int, device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Anchors of one level, ``(H * W * A, 4)`` in order (y, x, anchor)."""
        height, width = int(feat_size[0]), int(feat_size[1])
        device = torch.device(device)
        key = (level, height, width, device, dtype)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        cdtype = _compute_dtype(dtype)
        xx, yy = _grid_xy(height, width, self.strides[level], 0.0, device, cdtype)
        shifts = torch.stack((xx, yy, xx, yy), dim=-1)  # (H*W, 4)
        base = self.base_anchors[level].to(device=device, dtype=cdtype)  # (A, 4)
        anchors = (shifts[:, None, :] + base[None, :, :]).reshape(-1, 4).to(dtype)
        self._cache.put(key, anchors)
        return anchors

    def grid_priors(
        self, feat_sizes: Sequence[Sequence[int]], device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> list[Tensor]:
        """Anchors of every level, ``[(H_l * W_l * A, 4)]``, xyxy in input-image pixels."""
        sizes = _check_feat_sizes(feat_sizes, self.num_levels)
        return [self.single_level_grid_priors(s, i, device, dtype) for i, s in enumerate(sizes)]


def points_to_boxes(points: Tensor, strides: Tensor | float, side: float = POINT_PRIOR_SIDE) -> Tensor:
    """Square prior boxes of side ``side * stride`` centred on ``points`` (§5, point-based heads).

    ``points (..., 2)``; ``strides`` a number or a tensor broadcastable to ``points.shape[:-1]``
    (e.g. ``(N,)`` per point). Returns ``(..., 4)`` xyxy.
    """
    if points.shape[-1] != 2:
        raise ValueError(f"points must have shape (..., 2), got {tuple(points.shape)}")
    half = torch.as_tensor(strides, dtype=points.dtype, device=points.device) * (side / 2)
    half = half[..., None]  # broadcast over x and y
    return torch.cat((points - half, points + half), dim=-1)


class PointGenerator:
    """Points at cell centres for anchor-free heads, as MMDetection's ``MlvlPointGenerator``.

    Level with stride ``s``: points ``((x + offset) * s, (y + offset) * s)``, row-major, ``(H*W, 2)``.
    ``offset=0.5`` is MMDetection's default, used by its FCOS head (``AnchorFreeHead`` builds
    ``MlvlPointGenerator(strides)``; the older FCOS code added ``stride // 2``, the same point for
    even strides). ``offset=0.0`` puts points on cell corners, as the anchors of
    :class:`AnchorGenerator` with ``center_offset=0``.
    """

    num_base_priors = 1

    def __init__(self, strides: Sequence[int] = (8, 16, 32, 64, 128), *, offset: float = 0.5) -> None:
        if not strides or any(s <= 0 for s in strides):
            raise ValueError(f"strides must be positive, got {tuple(strides)}")
        self.strides = [int(s) for s in strides]
        self.offset = float(offset)
        self._cache = _GridCache()

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    def single_level_grid_priors(
        self, feat_size: tuple[int, int], level: int, device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Points of one level, ``(H * W, 2)`` as (x, y), row-major."""
        height, width = int(feat_size[0]), int(feat_size[1])
        device = torch.device(device)
        key = (level, height, width, device, dtype)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        xx, yy = _grid_xy(height, width, self.strides[level], self.offset, device, _compute_dtype(dtype))
        points = torch.stack((xx, yy), dim=-1).to(dtype)
        self._cache.put(key, points)
        return points

    def grid_priors(
        self, feat_sizes: Sequence[Sequence[int]], device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> list[Tensor]:
        """Points of every level, ``[(H_l * W_l, 2)]``."""
        sizes = _check_feat_sizes(feat_sizes, self.num_levels)
        return [self.single_level_grid_priors(s, i, device, dtype) for i, s in enumerate(sizes)]

    def grid_strides(
        self, feat_sizes: Sequence[Sequence[int]], device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> list[Tensor]:
        """The stride of every point, ``[(H_l * W_l,)]`` (for :func:`points_to_boxes` and l-t-r-b scaling)."""
        sizes = _check_feat_sizes(feat_sizes, self.num_levels)
        return [torch.full((h * w,), float(s), device=device, dtype=dtype) for (h, w), s in zip(sizes, self.strides)]

    def grid_prior_boxes(
        self, feat_sizes: Sequence[Sequence[int]], device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32, *, side: float = POINT_PRIOR_SIDE,
    ) -> list[Tensor]:
        """Each point's square prior box (side ``side * stride``, §5), ``[(H_l * W_l, 4)]``."""
        points = self.grid_priors(feat_sizes, device, dtype)
        return [points_to_boxes(p, float(s), side) for p, s in zip(points, self.strides)]

    points_to_boxes = staticmethod(points_to_boxes)


# Anchor settings of MMDetection's configs, as keyword arguments of AnchorGenerator.
RETINANET_ANCHORS = dict(octave_base_scale=4, scales_per_octave=3, ratios=(0.5, 1.0, 2.0))
# One square anchor of side 8 * stride: the same box §5 gives a point of a point-based head.
ATSS_ANCHORS = dict(octave_base_scale=8, scales_per_octave=1, ratios=(1.0,))
