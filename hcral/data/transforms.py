"""Detection transforms acting on ``(image, target)`` pairs.

Conventions shared by every transform here and every dataset in :mod:`hcral.data`:

* ``image`` is a uint8 tensor ``(3, H, W)`` as :func:`hcral.data.base.load_image` returns it
  (before :class:`ToTensor`) or a float tensor ``(3, H, W)`` (after it); a PIL image is accepted
  too (inference on an image in memory). The geometric transforms are
  ``torchvision.transforms.v2.functional`` applied to the image, plus the box bookkeeping.
* ``target`` is a dict with ``boxes`` float32 ``(M, 4)`` xyxy in continuous pixel coordinates of
  the current image (pixel ``(x, y)`` covers ``[x, x+1) x [y, y+1)``, so a box spanning the whole
  image is ``(0, 0, W, H)``), ``labels`` int64 ``(M,)``, ``ignore_boxes`` float32 ``(K, 4)``,
  ``orig_size`` ``(h, w)`` of the file image, ``size`` ``(h, w)`` of the current image,
  ``scale_factor`` (current / original, the same in x and y), ``flipped`` and bookkeeping fields
  (``image_id``, ``file_name``) that transforms pass through.
* Geometric transforms clip boxes to the image and drop the boxes (with their labels) whose width
  or height is <= 0 after clipping; see :func:`clip_and_drop_boxes`.
* Randomness comes from torch's RNG (optionally a given ``torch.Generator``), so a pipeline is
  reproducible under ``torch.manual_seed`` and per DataLoader worker.
* A transform may be called with ``target=None`` (inference on a bare image); it then only
  transforms the image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from hcral.ops.boxes import clip_boxes as ops_clip_boxes

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Compose",
    "ResizeKeepRatio",
    "RandomHorizontalFlip",
    "ToTensor",
    "Normalize",
    "build_transforms",
    "clip_and_drop_boxes",
    "clip_boxes",
    "empty_target",
    "horizontal_flip",
    "image_size",
]

# ImageNet statistics, 0..1 scale (what torchvision/timm ResNet weights were trained with).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Target = dict[str, Any]
ImageLike = Image.Image | torch.Tensor


def image_size(image: ImageLike) -> tuple[int, int]:
    """``(height, width)`` of a PIL image or of a ``(..., H, W)`` tensor."""
    if not isinstance(image, (Image.Image, torch.Tensor)):
        raise TypeError(f"expected a PIL image or a torch.Tensor, got {type(image).__name__}")
    height, width = TF.get_size(image)
    return height, width


def empty_target(height: int, width: int, *, image_id: int = 0, file_name: str = "") -> Target:
    """A target without objects for an image of ``(height, width)`` pixels (negatives, predict)."""
    return {
        "boxes": torch.zeros((0, 4), dtype=torch.float32),
        "labels": torch.zeros((0,), dtype=torch.int64),
        "ignore_boxes": torch.zeros((0, 4), dtype=torch.float32),
        "image_id": int(image_id),
        "orig_size": (int(height), int(width)),
        "size": (int(height), int(width)),
        "scale_factor": 1.0,
        "flipped": False,
        "file_name": str(file_name),
    }


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip ``boxes (M, 4)`` to ``[0, width] x [0, height]``; also return the mask ``(M,)`` of the
    boxes whose width and height stay > 0."""
    clipped = ops_clip_boxes(boxes, (height, width))  # (M, 4)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])  # (M,)
    return clipped, keep


def clip_and_drop_boxes(target: Target, height: int, width: int) -> Target:
    """Clip ``boxes`` and ``ignore_boxes`` to ``[0, width] x [0, height]`` and drop the ones whose
    width or height is <= 0 afterwards (``labels`` are dropped with their boxes).

    Returns a new dict; the input is not modified.
    """
    out = dict(target)
    for key, label_key in (("boxes", "labels"), ("ignore_boxes", None)):
        if key not in out:
            continue
        clipped, keep = clip_boxes(out[key], height, width)
        out[key] = clipped[keep]
        if label_key is not None and label_key in out:
            out[label_key] = out[label_key][keep]
    return out


class Compose:
    """Apply transforms in order: ``image, target = t(image, target)`` for each ``t``."""

    def __init__(self, transforms: Sequence[Callable[..., tuple[Any, Any]]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: ImageLike, target: Target | None = None) -> tuple[Any, Target | None]:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class ResizeKeepRatio:
    """Resize keeping the aspect ratio so the short side becomes ``short_side`` unless the long
    side would exceed ``max_side``, as MMDetection's
    ``Resize(scale=(max_side, short_side), keep_ratio=True)``.

    ``scale = min(short_side / min(h, w), max_side / max(h, w))``, new size
    ``(int(h * scale + 0.5), int(w * scale + 0.5))``, at least 1; images are upscaled as well as
    downscaled. Boxes are multiplied by ``scale`` in both axes (MMDetection uses the per-axis
    ratio of the rounded sizes instead, which differs by under half a pixel) so that dividing by
    ``target["scale_factor"]`` maps predictions back to original pixels exactly; they are then
    clipped to the new image. Bilinear interpolation, antialiased when shrinking
    (``torchvision.transforms.v2.functional.resize``).

    Args:
        short_side: target length of the shorter image side, pixels.
        max_side: upper bound on the longer side, pixels; ``None`` for no bound.
    """

    def __init__(self, short_side: int, max_side: int | None) -> None:
        if short_side <= 0:
            raise ValueError(f"short_side must be positive, got {short_side}")
        if max_side is not None and max_side <= 0:
            raise ValueError(f"max_side must be positive or None, got {max_side}")
        self.short_side = int(short_side)
        self.max_side = None if max_side is None else int(max_side)

    def get_scale(self, height: int, width: int) -> float:
        """The keep-ratio scale for an image of ``(height, width)``."""
        scale = self.short_side / min(height, width)
        if self.max_side is not None:
            scale = min(scale, self.max_side / max(height, width))
        return scale

    def __call__(self, image: ImageLike, target: Target | None = None) -> tuple[Any, Target | None]:
        height, width = image_size(image)
        scale = self.get_scale(height, width)
        # Round half up, as MMDetection's rescale_size does; keep at least one pixel for extreme
        # aspect ratios.
        new_h = max(1, int(height * scale + 0.5))
        new_w = max(1, int(width * scale + 0.5))
        # torchvision's bilinear with antialiasing when shrinking: PIL's filter for PIL images,
        # its uint8 port of it for uint8 tensors.
        image = TF.resize(image, [new_h, new_w], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        if target is None:
            return image, None
        target = dict(target)
        target["boxes"] = target["boxes"] * scale
        target["ignore_boxes"] = target["ignore_boxes"] * scale
        target["size"] = (new_h, new_w)
        target["scale_factor"] = float(target.get("scale_factor", 1.0)) * scale
        return image, clip_and_drop_boxes(target, new_h, new_w)

    def __repr__(self) -> str:
        return f"ResizeKeepRatio(short_side={self.short_side}, max_side={self.max_side})"


class RandomHorizontalFlip:
    """Mirror the image left-right with probability ``p``; boxes map as
    ``(x1, y1, x2, y2) -> (W - x2, y1, W - x1, y2)`` (continuous coordinates) and
    ``target["flipped"]`` is toggled.

    Args:
        p: flip probability in [0, 1].
        generator: optional ``torch.Generator``; by default torch's global RNG, so the draw is
            reproducible under ``torch.manual_seed``.
    """

    def __init__(self, p: float = 0.5, *, generator: torch.Generator | None = None) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = float(p)
        self.generator = generator

    def __call__(self, image: ImageLike, target: Target | None = None) -> tuple[Any, Target | None]:
        # Always draw, so the RNG stream does not depend on p.
        draw = torch.rand((), generator=self.generator).item()
        if draw >= self.p:
            return image, target
        return horizontal_flip(image, target)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def horizontal_flip(image: ImageLike, target: Target | None) -> tuple[Any, Target | None]:
    """Left-right mirror of ``image`` and ``target`` (see :class:`RandomHorizontalFlip`)."""
    _, width = image_size(image)
    image = TF.horizontal_flip(image)
    if target is None:
        return image, None
    target = dict(target)
    for key in ("boxes", "ignore_boxes"):
        boxes = target[key]  # (M, 4)
        target[key] = torch.stack(
            [width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1
        )
    target["flipped"] = not bool(target.get("flipped", False))
    return image, target


class ToTensor:
    """Image -> float32 ``(3, H, W)`` in 0..1.

    A uint8 tensor is divided by 255; a float tensor is kept as is. Tensors with 1 channel are
    repeated to 3, 2 channels (grey + alpha) use the grey one, 4 channels drop the alpha one. A PIL
    image goes through PIL's ``convert("RGB")`` (which clips 16-bit grey at 255: read files with
    :func:`hcral.data.base.load_image`, which scales them).
    """

    def __call__(
        self, image: ImageLike, target: Target | None = None
    ) -> tuple[torch.Tensor, Target | None]:
        if isinstance(image, Image.Image):
            image = TF.pil_to_tensor(image.convert("RGB"))
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"ToTensor expects a PIL image or a tensor, got {type(image).__name__}")
        tensor = image.unsqueeze(0) if image.dim() == 2 else image
        if tensor.dim() != 3:
            raise ValueError(f"expected an image tensor (C, H, W), got shape {tuple(image.shape)}")
        tensor = TF.to_dtype(tensor, torch.float32, scale=True)
        channels = tensor.shape[0]
        if channels in (1, 2):
            tensor = tensor[:1].expand(3, -1, -1)
        elif channels == 4:
            tensor = tensor[:3]
        elif channels != 3:
            raise ValueError(f"expected 1, 2, 3 or 4 channels, got {channels}")
        return tensor.contiguous(), target

    def __repr__(self) -> str:
        return "ToTensor()"


class Normalize:
    """``(image - mean) / std`` per channel on a float tensor in the 0..1 scale.

    Args:
        mean: per-channel mean, 0..1 scale (ImageNet by default).
        std: per-channel standard deviation, 0..1 scale, all > 0.
    """

    def __init__(
        self,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values each, got {list(mean)} and {list(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(
        self, image: torch.Tensor, target: Target | None = None
    ) -> tuple[torch.Tensor, Target | None]:
        if not isinstance(image, torch.Tensor) or not image.dtype.is_floating_point:
            raise TypeError("Normalize expects a float tensor (3, H, W); apply ToTensor first")
        return (image - self.mean.to(image.dtype)) / self.std.to(image.dtype), target

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def build_transforms(
    train: bool,
    short_side: int,
    max_side: int | None,
    flip_prob: float = 0.5,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    generator: torch.Generator | None = None,
) -> Compose:
    """The standard pipeline: keep-ratio resize, (train only) random horizontal flip, to tensor,
    normalise. Padding happens in :func:`hcral.data.collate.collate`.
    """
    transforms: list[Callable[..., tuple[Any, Any]]] = [ResizeKeepRatio(short_side, max_side)]
    if train and flip_prob > 0:
        transforms.append(RandomHorizontalFlip(flip_prob, generator=generator))
    transforms += [ToTensor(), Normalize(mean, std)]
    return Compose(transforms)
