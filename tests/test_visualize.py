"""Drawing detections (torchvision's draw_bounding_boxes behind hcral.visualize)."""

from __future__ import annotations

import torch
from PIL import Image

from hcral.data import SyntheticShapes
from hcral.visualize import PALETTE, draw_dataset_detections, draw_detections, font_size_for, line_width_for

NAMES, CAT_IDS = ["cat", "dog"], [7, 9]


def _det(bbox, cat_id=9, score=0.9, image_id=1):
    return {"image_id": image_id, "bbox": bbox, "category_id": cat_id, "score": score}


def _is(image, y, x, colour):
    return image[:, y, x].tolist() == list(colour)


def test_box_lands_on_its_pixels_in_its_class_colour():
    image = torch.zeros(3, 100, 200, dtype=torch.uint8)
    # xywh (20, 30, 50, 40) -> corners x 20..70, y 30..70 (PIL's rectangle includes both ends)
    out = draw_detections(image, [_det([20, 30, 50, 40])], NAMES, CAT_IDS, width=1)
    dog = PALETTE[1]
    assert out.dtype == torch.uint8 and out.shape == image.shape
    for y, x in [(50, 20), (50, 70), (70, 45), (60, 20)]:  # left, right, bottom edges
        assert _is(out, y, x, dog), (y, x)
    for y, x in [(50, 19), (50, 21), (50, 69), (50, 71), (71, 45), (69, 45), (65, 60), (10, 10)]:
        assert _is(out, y, x, (0, 0, 0)), (y, x)
    # The label "dog 0.90": white text on the class colour, inside the box's top-left corner.
    label = out[:, 31:45, 21:69]
    white = (label == 255).all(0)
    coloured = (label == torch.tensor(dog, dtype=torch.uint8)[:, None, None]).all(0)
    assert white.any() and coloured.sum() > white.sum()
    assert torch.equal(image, torch.zeros_like(image))  # the input is not drawn on


def test_threshold_filters_and_no_detections_leave_the_image_unchanged():
    image = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    low = [_det([10, 10, 30, 30], cat_id=7, score=0.2)]
    assert torch.equal(draw_detections(image, low, NAMES, CAT_IDS), image)  # default score_thr 0.3
    assert torch.equal(draw_detections(image, [], NAMES, CAT_IDS), image)
    drawn = draw_detections(image, low, NAMES, CAT_IDS, score_thr=0.1, width=1)
    assert _is(drawn, 35, 10, PALETTE[0]) and _is(drawn, 35, 40, PALETTE[0])  # below the label
    # score_thr is inclusive
    assert not torch.equal(draw_detections(image, low, NAMES, CAT_IDS, score_thr=0.2), image)


def test_line_width_and_font_scale_with_the_image():
    assert [line_width_for(h, w) for h, w in [(100, 100), (480, 640), (1080, 1920), (3000, 4000)]] == [1, 2, 4, 10]
    assert [font_size_for(h, w) for h, w in [(100, 100), (480, 640), (1080, 1920)]] == [10, 12, 27]
    image = torch.zeros(3, 900, 1200, dtype=torch.uint8)  # width 3 px
    out = draw_detections(image, [_det([100, 200, 400, 500])], NAMES, CAT_IDS)
    row = 500  # left edge at x = 100, drawn inwards
    assert [_is(out, row, x, PALETTE[1]) for x in range(98, 105)] == [False, False, True, True, True, False, False]


def test_dataset_grid_is_saved(tmp_path):
    dataset = SyntheticShapes(3, image_size=(40, 60), seed=0)
    dets = [_det([5, 5, 20, 20], cat_id=dataset.cat_ids[0], image_id=dataset.image_ids[0])]
    path = draw_dataset_detections(dataset, dets, tmp_path / "grid" / "g.png", columns=2)
    with Image.open(path) as grid:
        assert grid.size == (120, 80) and grid.mode == "RGB"
        assert grid.getpixel((119, 79)) == (255, 255, 255)  # the empty fourth cell
        assert grid.getpixel((5, 12)) == PALETTE[0]  # the box's left edge in the first tile
