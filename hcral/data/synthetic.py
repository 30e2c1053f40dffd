"""A procedurally generated detection set of coloured shapes: needs no files, learnable on a CPU."""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw

from hcral.data.base import DetectionDataset, ImageRecord, Transform

__all__ = ["SHAPE_NAMES", "SyntheticShapes"]

# Class k draws SHAPE_NAMES[k]; the class is the shape, the colour is random.
SHAPE_NAMES: tuple[str, ...] = ("rectangle", "ellipse", "triangle", "cross", "ring")

_UINT8_MAX = 255
# Background: grey level range, per-channel tint, texture waves (count, amplitude, period range).
_BACKGROUND_LEVEL = (70.0, 180.0)
_BACKGROUND_TINT = 20.0
_TEXTURE_WAVES = 2
_TEXTURE_AMPLITUDE = 15.0
_TEXTURE_PERIOD = (8.0, 64.0)
# Shape colours: saturated and bright enough to stand out from the grey background.
_SATURATION = (0.5, 1.0)
_VALUE = (0.6, 1.0)
# Cross arms and ring walls are this fraction of the shape's (shorter) side.
_CROSS_ARM_FRACTION = 1.0 / 3.0
_RING_WALL_FRACTION = 1.0 / 4.0
_LINE_WIDTH = (1, 2)


class SyntheticShapes(DetectionDataset):
    """Filled rectangles, ellipses, triangles, crosses and rings on a cluttered background.

    Image ``i`` is generated on the fly from ``numpy.random.default_rng([seed, i])``, so it is the
    same whatever the order of access, worker or process. Each image holds between
    ``min_objects`` and ``max_objects`` shapes; class ``k`` is the shape ``SHAPE_NAMES[k]`` (the
    first ``num_classes`` of them), its colour is random. The longer side of a shape is drawn
    log-uniformly from ``[min_size, max_size]`` (so small shapes are common), the shorter side is
    ``min_aspect..1`` times it; positions are uniform inside the image.

    Clutter: a grey, tinted background with sinusoidal texture, up to ``max_distractor_lines``
    random thin lines under the shapes, and Gaussian pixel noise over everything.

    Occlusion: shapes are painted in order, later ones over earlier ones. An object whose hidden
    fraction of pixels exceeds ``max_occluded_fraction`` is dropped from the annotations (the
    visible part stays in the image). The box of a kept object is the tight box of its VISIBLE
    pixels, in continuous coordinates (pixels ``x0..x1`` give ``[x0, x1 + 1)``).

    Image ids are ``index + 1``, file names ``f"{image_id:06d}.png"``; ``cat_ids = 1..C``.

    Args:
        num_images: dataset length.
        image_size: ``(height, width)`` in pixels.
        num_classes: 1..5, the first classes of ``SHAPE_NAMES``.
        seed: generator seed; datasets with different seeds are different.
        min_objects, max_objects: objects painted per image (before occlusion dropping).
        min_size, max_size: range of the longer side of a shape, pixels (capped to the image).
        max_occluded_fraction: drop objects with more than this fraction of pixels hidden.
        min_aspect: shorter side / longer side is uniform in ``[min_aspect, 1]``.
        max_distractor_lines: up to this many random lines per image.
        noise_std: standard deviation of the pixel noise, in 0..255 units.
        transforms: ``(image, target) -> (image, target)``; ``None`` = ``ToTensor()`` only.
    """

    def __init__(
        self,
        num_images: int,
        *,
        image_size: tuple[int, int] = (160, 160),
        num_classes: int = 3,
        seed: int = 0,
        min_objects: int = 1,
        max_objects: int = 6,
        min_size: int = 8,
        max_size: int = 96,
        max_occluded_fraction: float = 0.7,
        min_aspect: float = 0.6,
        max_distractor_lines: int = 4,
        noise_std: float = 6.0,
        transforms: Transform | None = None,
    ) -> None:
        super().__init__(transforms)
        height, width = (int(v) for v in image_size)
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        if height <= 0 or width <= 0:
            raise ValueError(f"image_size must be positive (height, width), got {image_size}")
        if not 1 <= num_classes <= len(SHAPE_NAMES):
            raise ValueError(f"num_classes must be in 1..{len(SHAPE_NAMES)}, got {num_classes}")
        if not 0 <= min_objects <= max_objects:
            raise ValueError(
                f"need 0 <= min_objects <= max_objects, got {min_objects}, {max_objects}"
            )
        if not 1 <= min_size <= max_size:
            raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
        if min_size > min(height, width):
            raise ValueError(f"min_size {min_size} does not fit in image_size {image_size}")
        if not 0.0 <= max_occluded_fraction <= 1.0:
            raise ValueError(
                f"max_occluded_fraction must be in [0, 1], got {max_occluded_fraction}"
            )
        if not 0.0 < min_aspect <= 1.0:
            raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}")
        if max_distractor_lines < 0 or noise_std < 0:
            raise ValueError("max_distractor_lines and noise_std must be >= 0")
        self.num_images = int(num_images)
        self.height, self.width = height, width
        self.seed = int(seed)
        self.min_objects, self.max_objects = int(min_objects), int(max_objects)
        self.min_size = int(min_size)
        self.max_size = min(int(max_size), height, width)
        self.max_occluded_fraction = float(max_occluded_fraction)
        self.min_aspect = float(min_aspect)
        self.max_distractor_lines = int(max_distractor_lines)
        self.noise_std = float(noise_std)
        self.class_names = list(SHAPE_NAMES[:num_classes])
        self.cat_ids = list(range(1, num_classes + 1))
        self._records: dict[int, ImageRecord] = {}

    def __len__(self) -> int:
        return self.num_images

    @property
    def image_ids(self) -> list[int]:
        return [index + 1 for index in range(self.num_images)]

    def get_record(self, index: int) -> ImageRecord:
        if index not in self._records:
            self._render(index)
        return self._records[index]

    def image_hw(self, index: int) -> tuple[int, int]:
        return self.height, self.width  # every image has one size; no need to render it

    def load_image(self, index: int) -> torch.Tensor:
        return self._render(index)[0]

    def _load(self, index: int) -> tuple[torch.Tensor, ImageRecord]:
        return self._render(index)

    def write_coco(self, out_dir: str | Path) -> Path:
        """Write every image as ``out_dir/images/<id>.png`` and the annotations as
        ``out_dir/annotations.json`` (reload with ``CocoDataset(json, out_dir / "images")``).

        Returns the JSON path.
        """
        from hcral.evaluation import write_json_atomic

        out_dir = Path(out_dir)
        image_dir = out_dir / "images"
        image_dir.mkdir(parents=True, exist_ok=True)
        for index in range(len(self)):
            image, record = self._render(index)
            TF.to_pil_image(image).save(image_dir / record.file_name)
        json_path = out_dir / "annotations.json"
        write_json_atomic(json_path, self.coco_gt())
        return json_path

    # --- generation ---------------------------------------------------------------------------
    def _render(self, index: int) -> tuple[torch.Tensor, ImageRecord]:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        rng = np.random.default_rng([self.seed, index])
        height, width = self.height, self.width

        canvas = Image.fromarray(self._background(rng), mode="RGB")
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(0, self.max_distractor_lines + 1))):
            x = rng.uniform(0, width, size=2)
            y = rng.uniform(0, height, size=2)
            colour = tuple(int(c) for c in rng.integers(0, _UINT8_MAX + 1, size=3))
            line_width = int(rng.integers(_LINE_WIDTH[0], _LINE_WIDTH[1] + 1))
            draw.line([(x[0], y[0]), (x[1], y[1])], fill=colour, width=line_width)

        pixels = np.asarray(canvas, dtype=np.float32).copy()  # (H, W, 3)
        owner = np.full((height, width), -1, dtype=np.int32)  # which object each pixel shows
        masks: list[np.ndarray] = []
        classes: list[int] = []
        for k in range(int(rng.integers(self.min_objects, self.max_objects + 1))):
            label = int(rng.integers(0, self.num_classes))
            mask = self._shape_mask(rng, label)  # (H, W) bool
            hue = rng.uniform(0.0, 1.0)
            colour = colorsys.hsv_to_rgb(hue, rng.uniform(*_SATURATION), rng.uniform(*_VALUE))
            pixels[mask] = np.asarray(colour, dtype=np.float32) * _UINT8_MAX
            owner[mask] = k
            masks.append(mask)
            classes.append(label)

        if self.noise_std > 0:
            pixels += rng.normal(0.0, self.noise_std, size=pixels.shape).astype(np.float32)
        # uint8 (3, H, W), the layout load_image gives for files.
        pixels = np.clip(np.rint(pixels), 0, _UINT8_MAX).astype(np.uint8)
        image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()

        boxes: list[list[float]] = []
        labels: list[int] = []
        for k, (mask, label) in enumerate(zip(masks, classes)):
            visible = owner == k
            drawn, shown = int(mask.sum()), int(visible.sum())
            if shown == 0 or 1.0 - shown / drawn > self.max_occluded_fraction:
                continue
            ys, xs = np.nonzero(visible)
            boxes.append(
                [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
            )
            labels.append(label)

        image_id = index + 1
        record = ImageRecord.make(
            image_id=image_id,
            file_name=f"{image_id:06d}.png",
            path=None,
            height=height,
            width=width,
            boxes=boxes,
            labels=labels,
        )
        self._records[index] = record
        return image, record

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        height, width = self.height, self.width
        level = rng.uniform(*_BACKGROUND_LEVEL)
        tint = rng.uniform(-_BACKGROUND_TINT, _BACKGROUND_TINT, size=3)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        texture = np.zeros((height, width), dtype=np.float32)
        for _ in range(_TEXTURE_WAVES):
            angle = rng.uniform(0.0, math.pi)
            period = rng.uniform(*_TEXTURE_PERIOD)
            phase = rng.uniform(0.0, 2.0 * math.pi)
            along = xx * math.cos(angle) + yy * math.sin(angle)
            texture += _TEXTURE_AMPLITUDE * np.sin(2.0 * math.pi * along / period + phase)
        background = level + tint[None, None, :] + texture[:, :, None]  # (H, W, 3)
        return np.clip(np.rint(background), 0, _UINT8_MAX).astype(np.uint8)

    def _shape_mask(self, rng: np.random.Generator, label: int) -> np.ndarray:
        """A boolean ``(H, W)`` mask of one shape of class ``label`` at a random place."""
        long_side = math.exp(rng.uniform(math.log(self.min_size), math.log(self.max_size)))
        short_side = long_side * rng.uniform(self.min_aspect, 1.0)
        if rng.uniform() < 0.5:
            w, h = long_side, short_side
        else:
            w, h = short_side, long_side
        w = min(max(int(round(w)), 1), self.width)
        h = min(max(int(round(h)), 1), self.height)
        x0 = int(rng.integers(0, self.width - w + 1))
        y0 = int(rng.integers(0, self.height - h + 1))
        x1, y1 = x0 + w - 1, y0 + h - 1  # inclusive corners, as PIL draws them
        orientation = int(rng.integers(0, 4))  # triangles point up/right/down/left

        mask_image = Image.new("L", (self.width, self.height), 0)
        draw = ImageDraw.Draw(mask_image)
        shape = SHAPE_NAMES[label]
        if shape == "rectangle":
            draw.rectangle([x0, y0, x1, y1], fill=1)
        elif shape == "ellipse":
            draw.ellipse([x0, y0, x1, y1], fill=1)
        elif shape == "triangle":
            cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
            points = [
                [(x0, y1), (x1, y1), (cx, y0)],  # up
                [(x0, y0), (x0, y1), (x1, cy)],  # right
                [(x0, y0), (x1, y0), (cx, y1)],  # down
                [(x1, y0), (x1, y1), (x0, cy)],  # left
            ][orientation]
            draw.polygon(points, fill=1)
        elif shape == "cross":
            arm_w = max(1, int(round(w * _CROSS_ARM_FRACTION)))
            arm_h = max(1, int(round(h * _CROSS_ARM_FRACTION)))
            left = x0 + (w - arm_w) // 2
            top = y0 + (h - arm_h) // 2
            draw.rectangle([left, y0, left + arm_w - 1, y1], fill=1)
            draw.rectangle([x0, top, x1, top + arm_h - 1], fill=1)
        else:  # ring
            wall = max(1, int(round(min(w, h) * _RING_WALL_FRACTION)))
            draw.ellipse([x0, y0, x1, y1], fill=1)
            if x1 - x0 > 2 * wall and y1 - y0 > 2 * wall:
                draw.ellipse([x0 + wall, y0 + wall, x1 - wall, y1 - wall], fill=0)
        return np.asarray(mask_image, dtype=bool)

    def __repr__(self) -> str:
        return (
            f"SyntheticShapes(num_images={self.num_images}, "
            f"image_size=({self.height}, {self.width}), num_classes={self.num_classes}, "
            f"seed={self.seed})"
        )
