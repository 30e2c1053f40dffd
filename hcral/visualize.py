"""Draw detections on images with PIL (no plotting library needed)."""

from __future__ import annotations

from PIL import Image, ImageDraw

# Distinct colours for up to 10 classes, then they repeat.
PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
]


def draw_detections(
    image: Image.Image,
    detections: list[dict],
    class_names: list[str],
    cat_ids: list[int],
    *,
    score_thr: float = 0.3,
    width: int = 2,
) -> Image.Image:
    """A copy of ``image`` with COCO-format ``detections`` (bbox xywh, category_id, score) drawn."""
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    label_of = {c: i for i, c in enumerate(cat_ids)}
    for d in sorted(detections, key=lambda d: d["score"]):
        if d["score"] < score_thr:
            continue
        label = label_of[d["category_id"]]
        x, y, w, h = d["bbox"]
        colour = PALETTE[label % len(PALETTE)]
        draw.rectangle([x, y, x + w, y + h], outline=colour, width=width)
        text = f"{class_names[label]} {d['score']:.2f}"
        # White text on a box of the class colour stays readable over any background.
        left, top, right, bottom = draw.textbbox((x + 1, y + 1), text)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=colour)
        draw.text((x + 1, y + 1), text, fill=(255, 255, 255))
    return canvas


def draw_dataset_detections(
    dataset, detections: list[dict], path, *, num_images: int = 8, columns: int = 4, score_thr: float = 0.3
):
    """A grid of the first ``num_images`` images of ``dataset`` with their detections, saved to ``path``."""
    from pathlib import Path

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
    w = max(t.width for t in tiles)
    h = max(t.height for t in tiles)
    rows = (len(tiles) + columns - 1) // columns
    grid = Image.new("RGB", (w * min(columns, len(tiles)), h * rows), (255, 255, 255))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % columns) * w, (i // columns) * h))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
