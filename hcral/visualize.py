"""Draw detections on images with ``torchvision.utils.draw_bounding_boxes``.

Images are uint8 ``(3, H, W)`` tensors, as :func:`hcral.data.load_image` returns them. Boxes are
drawn in a colour per class with a ``"name 0.87"`` label (white text on the class colour); the line
width and the font size grow with the image. Labels use matplotlib's DejaVu Sans (the ``plot``
extra) when matplotlib is installed, else PIL's small fixed-size default font.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.io import encode_png
from torchvision.utils import draw_bounding_boxes, make_grid

from hcral.utils import write_bytes_atomic

__all__ = ["PALETTE", "draw_dataset_detections", "draw_detections", "line_width_for", "font_size_for", "write_png_atomic"]

# Distinct colours for up to 10 classes, then they repeat.
PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
]
LABEL_TEXT_COLOUR = (255, 255, 255)
GRID_BACKGROUND = 255
# One pixel of box line per PIXELS_PER_LINE pixels of the image's short side (at least 1), and a
# label font of FONT_FRACTION of the short side (at least MIN_FONT_SIZE): 2 px / 12 px at 480 px.
PIXELS_PER_LINE = 300
FONT_FRACTION = 1 / 40
MIN_FONT_SIZE = 10


def line_width_for(height: int, width: int) -> int:
    """Box line width in pixels for an image of ``(height, width)``."""
    return max(1, round(min(height, width) / PIXELS_PER_LINE))


def font_size_for(height: int, width: int) -> int:
    """Label font size in pixels for an image of ``(height, width)``."""
    return max(MIN_FONT_SIZE, round(min(height, width) * FONT_FRACTION))


@functools.cache
def _label_font() -> str | None:
    """Path of a TrueType font torchvision can scale, or None (PIL's default bitmap font)."""
    try:
        import matplotlib
    except ImportError:
        return None
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    return str(path) if path.is_file() else None


def draw_detections(
    image: Tensor,
    detections: list[dict],
    class_names: list[str],
    cat_ids: list[int],
    *,
    score_thr: float = 0.3,
    width: int | None = None,
) -> Tensor:
    """A copy of ``image`` with the COCO-format ``detections`` (``bbox`` xywh, ``category_id``,
    ``score``) of ``score >= score_thr`` drawn, highest score on top.

    Args:
        image: uint8 ``(3, H, W)``.
        detections: COCO results in the image's pixels.
        class_names, cat_ids: the dataset's classes; ``cat_ids[k]`` is the id of ``class_names[k]``.
        score_thr: detections scoring below it are not drawn.
        width: box line width in pixels; None scales it with the image (:func:`line_width_for`).

    Returns:
        uint8 ``(3, H, W)``.
    """
    label_of = {c: i for i, c in enumerate(cat_ids)}
    shown = sorted((d for d in detections if d["score"] >= score_thr), key=lambda d: d["score"])
    if not shown:
        return image.clone()
    height, width_px = image.shape[-2:]
    boxes = torch.tensor([d["bbox"] for d in shown], dtype=torch.float64).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
    labels = [label_of[d["category_id"]] for d in shown]
    font = _label_font()
    return draw_bounding_boxes(
        image,
        boxes,
        labels=[f"{class_names[k]} {d['score']:.2f}" for k, d in zip(labels, shown)],
        colors=[PALETTE[k % len(PALETTE)] for k in labels],
        width=width if width is not None else line_width_for(height, width_px),
        font=font,
        font_size=font_size_for(height, width_px) if font is not None else None,
        label_colors=LABEL_TEXT_COLOUR,
        fill_labels=True,  # white text on a box of the class colour stays readable anywhere
    )


def draw_dataset_detections(
    dataset, detections: list[dict], path, *, num_images: int = 8, columns: int = 4, score_thr: float = 0.3
) -> Path:
    """A grid of the first ``num_images`` images of ``dataset`` with their detections, saved to ``path``."""
    by_image: dict[int, list[dict]] = {}
    for d in detections:
        by_image.setdefault(d["image_id"], []).append(d)
    tiles = []
    for index in range(min(num_images, len(dataset))):
        image = dataset.load_image(index)
        dets = by_image.get(dataset.image_ids[index], [])
        tiles.append(draw_detections(image, dets, dataset.class_names, dataset.cat_ids, score_thr=score_thr))
    if not tiles:
        raise ValueError("the dataset has no images to draw")
    h = max(t.shape[-2] for t in tiles)
    w = max(t.shape[-1] for t in tiles)
    # Each tile top-left in a cell of the largest size, on white.
    cells = [F.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2]), value=GRID_BACKGROUND) for t in tiles]
    grid = make_grid(cells, nrow=columns, padding=0, pad_value=GRID_BACKGROUND)
    return write_png_atomic(grid, path)


def write_png_atomic(image: Tensor, path: str | Path) -> Path:
    """Save a uint8 (3, H, W) image as a PNG, atomically; a failed write names the file and why."""
    return write_bytes_atomic(path, encode_png(image).numpy().tobytes())
