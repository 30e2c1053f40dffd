"""Datasets (VOC, COCO, synthetic), transforms and collate of hcral.data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from hcral.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CocoDataset,
    DatasetError,
    Normalize,
    RandomHorizontalFlip,
    ResizeKeepRatio,
    SyntheticShapes,
    ToTensor,
    VOCDataset,
    build_transforms,
    clip_and_drop_boxes,
    collate,
    empty_target,
)
from hcral.evaluation import write_json_atomic

RACCOON = Path(
    os.environ.get("HCRAL_RACCOON", Path(__file__).resolve().parents[2] / "shared/datasets/raccoon")
)
needs_raccoon = pytest.mark.skipif(not RACCOON.is_dir(), reason=f"raccoon dataset not at {RACCOON}")


# --- helpers ---------------------------------------------------------------------------------
def _voc_xml(
    objects: list[dict], *, width: int = 64, height: int = 48, filename: str = "a.jpg"
) -> str:
    parts = [
        "<annotation>",
        f"<filename>{filename}</filename>",
        f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>",
    ]
    for obj in objects:
        fields = "".join(
            f"<{key}>{obj[key]}</{key}>" for key in ("xmin", "ymin", "xmax", "ymax") if key in obj
        )
        parts.append(
            f"<object><name>{obj.get('name', 'cat')}</name>"
            f"<difficult>{obj.get('difficult', 0)}</difficult><bndbox>{fields}</bndbox></object>"
        )
    parts.append("</annotation>")
    return "".join(parts)


def _make_voc(
    root: Path,
    objects: list[dict] | None = None,
    *,
    xml: str | None = None,
    image: Image.Image | None = None,
    image_bytes: bytes | None = None,
    name: str = "a.jpg",
) -> Path:
    """A one-image flat VOC set in ``root`` (layout of shared/datasets/raccoon)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    if image_bytes is not None:
        (root / "images" / name).write_bytes(image_bytes)
    else:
        (image or Image.new("RGB", (64, 48), (10, 20, 30))).save(root / "images" / name)
    if xml is None:
        xml = _voc_xml(
            objects if objects is not None else [dict(xmin=11, ymin=6, xmax=30, ymax=25)]
        )
    (root / "annotations" / (Path(name).stem + ".xml")).write_text(xml)
    (root / "train.txt").write_text(name + "\n")
    return root


def _coco_json(path: Path, *, annotations: list[dict], images: list[dict] | None = None) -> Path:
    data = {
        "images": images
        if images is not None
        else [{"id": 7, "file_name": "a.png", "width": 64, "height": 48}],
        "annotations": annotations,
        "categories": [{"id": 3, "name": "cat"}, {"id": 90, "name": "dog"}],
    }
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def coco_dir(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    Image.new("RGB", (64, 48), (1, 2, 3)).save(tmp_path / "img" / "a.png")
    return tmp_path


# --- raccoon (real VOC data) -------------------------------------------------------------------
@needs_raccoon
def test_raccoon_splits_classes_and_box_count() -> None:
    train = VOCDataset(RACCOON, "train")
    val = VOCDataset(RACCOON, "val", class_names=train.class_names)
    assert (len(train), len(val)) == (160, 40)
    assert train.class_names == ["raccoon"] and train.num_classes == 1 and train.cat_ids == [1]
    assert train.image_ids == list(range(1, 161))
    records = train.records + val.records
    assert sum(len(r.boxes) for r in records) == 217
    assert sum(len(r.ignore_boxes) for r in records) == 0
    assert sum(len(r.boxes) > 1 for r in records) == 16  # README: 16 images hold several raccoons


@needs_raccoon
def test_raccoon_known_box_and_resize() -> None:
    train = VOCDataset(RACCOON, "train")
    index = [r.file_name for r in train.records].index("raccoon-1.jpg")
    image, target = train[index]
    # VOC (81, 88, 522, 408), 1-based inclusive -> (xmin - 1, ymin - 1, xmax, ymax).
    assert target["boxes"].tolist() == [[80.0, 87.0, 522.0, 408.0]]
    assert target["labels"].tolist() == [0]
    assert target["orig_size"] == (417, 650) and image.shape == (3, 417, 650)
    assert target["file_name"] == "raccoon-1.jpg" and target["image_id"] == train.image_ids[index]

    resized = VOCDataset(RACCOON, "train", transforms=build_transforms(False, 200, 333))
    image_r, target_r = resized[index]
    scale = min(200 / 417, 333 / 650)
    assert target_r["scale_factor"] == pytest.approx(scale)
    assert target_r["size"] == (int(417 * scale + 0.5), int(650 * scale + 0.5)) == (200, 312)
    assert image_r.shape == (3, 200, 312)
    torch.testing.assert_close(
        target_r["boxes"], torch.tensor([[80.0, 87.0, 522.0, 408.0]]) * scale
    )


@needs_raccoon
def test_raccoon_grayscale_becomes_rgb() -> None:
    grey_name = "raccoon-152.jpg"
    assert Image.open(RACCOON / "images" / grey_name).mode == "L"
    for split in ("train", "val"):
        dataset = VOCDataset(RACCOON, split, class_names=["raccoon"])
        names = [r.file_name for r in dataset.records]
        if grey_name in names:
            image, _ = dataset[names.index(grey_name)]
            break
    assert image.shape[0] == 3
    torch.testing.assert_close(image[0], image[1])
    torch.testing.assert_close(image[0], image[2])


@needs_raccoon
def test_raccoon_coco_gt_round_trip(tmp_path: Path) -> None:
    val = VOCDataset(RACCOON, "val", class_names=["raccoon"])
    gt = val.coco_gt()
    assert gt["categories"] == [{"id": 1, "name": "raccoon"}]
    assert len(gt["images"]) == 40 and [a["id"] for a in gt["annotations"]][0] == 1
    json_path = write_json_atomic(tmp_path / "val.json", gt)
    reloaded = CocoDataset(json_path, RACCOON / "images")
    assert reloaded.class_names == val.class_names and reloaded.image_ids == val.image_ids
    for a, b in zip(val.records, reloaded.records):
        assert (a.file_name, a.height, a.width) == (b.file_name, b.height, b.width)
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.labels, b.labels)
    assert reloaded.coco_gt()["annotations"] == gt["annotations"]
    image_a, target_a = val[3]
    image_b, target_b = reloaded[3]
    torch.testing.assert_close(image_a, image_b)
    torch.testing.assert_close(target_a["boxes"], target_b["boxes"])


# --- VOC behaviour on small files ---------------------------------------------------------
def test_voc_difficult_goes_to_ignore_and_crowd(tmp_path: Path) -> None:
    root = _make_voc(
        tmp_path,
        [
            dict(name="cat", xmin=1, ymin=1, xmax=64, ymax=48),
            dict(name="dog", xmin=5, ymin=6, xmax=20, ymax=30, difficult=1),
        ],
    )
    dataset = VOCDataset(root, "train")
    assert dataset.class_names == ["cat", "dog"]
    _, target = dataset[0]
    assert target["boxes"].tolist() == [[0.0, 0.0, 64.0, 48.0]]  # full image: (0, 0, W, H)
    assert target["labels"].tolist() == [0]
    assert target["ignore_boxes"].tolist() == [[4.0, 5.0, 20.0, 30.0]]
    annotations = dataset.coco_gt()["annotations"]
    assert [(a["category_id"], a["iscrowd"], a["bbox"]) for a in annotations] == [
        (1, 0, [0.0, 0.0, 64.0, 48.0]),
        (2, 1, [4.0, 5.0, 16.0, 25.0]),
    ]


def test_voc_image_without_objects_is_kept(tmp_path: Path) -> None:
    root = _make_voc(tmp_path, [])
    dataset = VOCDataset(
        root, "train", class_names=["cat"], transforms=build_transforms(True, 32, 64)
    )
    assert len(dataset) == 1
    image, target = dataset[0]
    assert image.shape == (3, 32, 43)
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    assert target["ignore_boxes"].shape == (0, 4)
    assert dataset.coco_gt()["annotations"] == []


def test_voc_vocdevkit_layout_and_split_path(tmp_path: Path) -> None:
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    Image.new("RGB", (64, 48)).save(tmp_path / "JPEGImages" / "000005.jpg")
    (tmp_path / "Annotations" / "000005.xml").write_text(
        _voc_xml([dict(xmin=2, ymin=3, xmax=10, ymax=12)], filename="000005.jpg")
    )
    (tmp_path / "ImageSets" / "Main" / "trainval.txt").write_text("000005\n\n")
    dataset = VOCDataset(tmp_path, "trainval")
    assert dataset.records[0].file_name == "000005.jpg"
    assert dataset[0][1]["boxes"].tolist() == [[1.0, 2.0, 10.0, 12.0]]
    by_path = VOCDataset(tmp_path, tmp_path / "ImageSets" / "Main" / "trainval.txt")
    assert by_path.records[0].file_name == "000005.jpg"


def test_voc_size_read_from_image_when_xml_has_none(tmp_path: Path) -> None:
    xml = "<annotation><object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
    xml += "<xmax>70</xmax><ymax>9</ymax></bndbox></object></annotation>"
    root = _make_voc(tmp_path, xml=xml, image=Image.new("RGB", (33, 21)))
    record = VOCDataset(root, "train").records[0]
    assert (record.height, record.width) == (21, 33)
    assert record.boxes.tolist() == [[0.0, 0.0, 33.0, 9.0]]  # clipped to the image


# --- every bad input raises DatasetError naming the file ------------------------------------------
def test_error_missing_image(tmp_path: Path) -> None:
    root = _make_voc(tmp_path)
    (root / "images" / "a.jpg").unlink()
    with pytest.raises(DatasetError, match=r"images/a\.jpg: image file not found"):
        VOCDataset(root, "train")


def test_error_image_removed_after_construction(tmp_path: Path) -> None:
    root = _make_voc(tmp_path)
    dataset = VOCDataset(root, "train")
    (root / "images" / "a.jpg").unlink()
    with pytest.raises(DatasetError, match=r"images/a\.jpg: image file not found"):
        dataset[0]


def test_error_unreadable_image_bytes(tmp_path: Path) -> None:
    root = _make_voc(tmp_path, image_bytes=b"this is not a jpeg")
    dataset = VOCDataset(root, "train")  # decoding is lazy
    with pytest.raises(DatasetError, match=r"images/a\.jpg: cannot read image"):
        dataset[0]


def test_error_truncated_image(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
        good
    )
    root = _make_voc(tmp_path / "voc", image_bytes=good.read_bytes()[:300], name="a.png")
    with pytest.raises(DatasetError, match=r"images/a\.png: cannot read image"):
        VOCDataset(root, "train")[0]


def test_error_image_size_disagrees_with_annotation(tmp_path: Path) -> None:
    root = _make_voc(tmp_path, image=Image.new("RGB", (50, 48)))
    with pytest.raises(
        DatasetError, match=r"a\.jpg: image is 50x48 pixels but its annotation says 64x48"
    ):
        VOCDataset(root, "train")[0]


def test_error_missing_annotation_file(tmp_path: Path) -> None:
    root = _make_voc(tmp_path)
    (root / "annotations" / "a.xml").unlink()
    with pytest.raises(DatasetError, match=r"annotations/a\.xml: annotation file not found"):
        VOCDataset(root, "train")


def test_error_missing_split(tmp_path: Path) -> None:
    root = _make_voc(tmp_path)
    with pytest.raises(DatasetError, match=r"val\.txt: split file not found"):
        VOCDataset(root, "val")


def test_error_malformed_xml(tmp_path: Path) -> None:
    root = _make_voc(tmp_path, xml="<annotation><object><name>cat</name>")
    with pytest.raises(DatasetError, match=r"annotations/a\.xml: malformed XML"):
        VOCDataset(root, "train")


def test_error_missing_bndbox_field(tmp_path: Path) -> None:
    root = _make_voc(tmp_path, [dict(xmin=1, ymin=1, xmax=5, ymax=5), dict(ymin=1, xmax=5, ymax=5)])
    with pytest.raises(DatasetError, match=r"a\.xml: object 1: missing field 'bndbox/xmin'"):
        VOCDataset(root, "train")


def test_error_non_numeric_coordinate(tmp_path: Path) -> None:
    root = _make_voc(tmp_path, [dict(xmin=1, ymin="ten", xmax=5, ymax=5)])
    with pytest.raises(
        DatasetError, match=r"a\.xml: object 0: field 'bndbox/ymin' is not a number: 'ten'"
    ):
        VOCDataset(root, "train")


def test_error_unknown_class(tmp_path: Path) -> None:
    root = _make_voc(tmp_path, [dict(name="dog", xmin=1, ymin=1, xmax=5, ymax=5)])
    with pytest.raises(
        DatasetError,
        match=r"a\.xml: object 0: unknown class 'dog'; valid classes: \['cat', 'raccoon'\]",
    ):
        VOCDataset(root, "train", class_names=["cat", "raccoon"])


def test_error_inverted_box(tmp_path: Path) -> None:
    root = _make_voc(
        tmp_path, [dict(xmin=1, ymin=1, xmax=5, ymax=5), dict(xmin=30, ymin=2, xmax=20, ymax=9)]
    )
    with pytest.raises(
        DatasetError, match=r"a\.xml: object 1: box has x2 < x1 .*xmin=30, ymin=2, xmax=20, ymax=9"
    ):
        VOCDataset(root, "train")


def test_error_coco_unknown_category(coco_dir: Path) -> None:
    path = _coco_json(
        coco_dir / "ann.json",
        annotations=[{"id": 1, "image_id": 7, "category_id": 4, "bbox": [1, 2, 3, 4]}],
    )
    with pytest.raises(
        DatasetError,
        match=r"ann\.json: annotations\[0\]: unknown category_id 4; valid category ids: \[3, 90\]",
    ):
        CocoDataset(path, coco_dir / "img")


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        ({"image_id": 8, "category_id": 3, "bbox": [1, 2, 3, 4]}, r"unknown image_id 8"),
        ({"image_id": 7, "category_id": 3}, r"missing field 'bbox'"),
        (
            {"image_id": 7, "category_id": 3, "bbox": [1, "a", 3, 4]},
            r"field 'bbox' has a non-numeric value",
        ),
        (
            {"image_id": 7, "category_id": 3, "bbox": [1, 2, -3, 4]},
            r"box has x2 < x1 .*\[1, 2, -3, 4\]",
        ),
    ],
)
def test_error_coco_bad_annotation(coco_dir: Path, annotation: dict, message: str) -> None:
    path = _coco_json(coco_dir / "ann.json", annotations=[annotation])
    with pytest.raises(DatasetError, match=r"ann\.json: annotations\[0\]: " + message):
        CocoDataset(path, coco_dir / "img")


def test_error_coco_malformed_json_and_missing_files(coco_dir: Path) -> None:
    (coco_dir / "bad.json").write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"bad\.json: malformed JSON"):
        CocoDataset(coco_dir / "bad.json", coco_dir / "img")
    with pytest.raises(DatasetError, match=r"nothere\.json: annotation file not found"):
        CocoDataset(coco_dir / "nothere.json", coco_dir / "img")
    images = [{"id": 1, "file_name": "b.png", "width": 4, "height": 4}]
    path = _coco_json(coco_dir / "ann.json", annotations=[], images=images)
    with pytest.raises(DatasetError, match=r"img/b\.png: image file not found"):
        CocoDataset(path, coco_dir / "img")


# --- COCO behaviour -------------------------------------------------------------------------------
def test_coco_labels_crowd_and_negatives(coco_dir: Path) -> None:
    Image.new("RGB", (20, 10)).save(coco_dir / "img" / "empty.png")
    images = [
        {"id": 7, "file_name": "a.png", "width": 64, "height": 48},
        {"id": 2, "file_name": "empty.png", "width": 20, "height": 10},
    ]
    annotations = [
        {"id": 5, "image_id": 7, "category_id": 90, "bbox": [1.5, 2, 10, 20], "area": 150.0},
        {"id": 6, "image_id": 7, "category_id": 3, "bbox": [50, 40, 30, 30], "iscrowd": 0},
        {"id": 9, "image_id": 7, "category_id": 3, "bbox": [0, 0, 8, 8], "iscrowd": 1},
    ]
    dataset = CocoDataset(
        _coco_json(coco_dir / "ann.json", annotations=annotations, images=images), coco_dir / "img"
    )
    assert dataset.cat_ids == [3, 90] and dataset.class_names == ["cat", "dog"]
    assert dataset.image_ids == [7, 2]
    _, target = dataset[0]
    # xywh -> xyxy; the second box is clipped to the 64x48 image; labels are contiguous.
    assert target["boxes"].tolist() == [[1.5, 2.0, 11.5, 22.0], [50.0, 40.0, 64.0, 48.0]]
    assert target["labels"].tolist() == [1, 0]
    assert target["ignore_boxes"].tolist() == [[0.0, 0.0, 8.0, 8.0]]
    _, empty = dataset[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    gt = dataset.coco_gt()
    assert [(a["id"], a["area"], a["iscrowd"]) for a in gt["annotations"]] == [
        (5, 150.0, 0),
        (6, 900.0, 0),
        (9, 64.0, 1),
    ]


# --- synthetic ----------------------------------------------------------------------------------
def test_synthetic_deterministic_and_seed_dependent() -> None:
    a = SyntheticShapes(8, seed=3)
    b = SyntheticShapes(8, seed=3)
    c = SyntheticShapes(8, seed=4)
    image_b5, target_b5 = b[5]  # access order must not matter
    image_a0, _ = a[0]
    image_a5, target_a5 = a[5]
    torch.testing.assert_close(image_a5, image_b5, rtol=0, atol=0)
    torch.testing.assert_close(target_a5["boxes"], target_b5["boxes"], rtol=0, atol=0)
    assert target_a5["labels"].tolist() == target_b5["labels"].tolist()
    assert not torch.equal(image_a5, c[5][0])
    assert not torch.equal(image_a5, image_a0)


def test_synthetic_boxes_valid_and_size_range_covered() -> None:
    dataset = SyntheticShapes(
        60, image_size=(120, 160), num_classes=5, min_size=8, max_size=96, seed=1
    )
    assert dataset.class_names == ["rectangle", "ellipse", "triangle", "cross", "ring"]
    long_sides, labels = [], []
    for index in range(len(dataset)):
        record = dataset.get_record(index)
        boxes = record.boxes
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= 160).all() and (boxes[:, 3] <= 120).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) > 0).all()
        long_sides += np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).tolist()
        labels += record.labels.tolist()
    assert min(long_sides) <= 10 and max(long_sides) >= 80 and max(long_sides) <= 96
    assert set(labels) == {0, 1, 2, 3, 4}
    image, target = dataset[0]
    assert image.shape == (3, 120, 160) and target["orig_size"] == (120, 160)


def test_synthetic_rectangle_box_is_tight() -> None:
    # One unoccluded rectangle on a plain, noise-free background: its box holds exactly its colour.
    dataset = SyntheticShapes(
        6, num_classes=1, min_objects=1, max_objects=1, max_distractor_lines=0, noise_std=0.0
    )
    for index in range(len(dataset)):
        pixels = dataset.load_image(index).permute(1, 2, 0).numpy().astype(int)  # (H, W, 3)
        ((x1, y1, x2, y2),) = dataset.get_record(index).boxes.astype(int).tolist()
        colour = pixels[y1, x1]
        assert (pixels[y1:y2, x1:x2] == colour).all()
        inside = (pixels == colour).all(axis=2)
        assert inside.sum() == (x2 - x1) * (y2 - y1)


def test_synthetic_occlusion_rule_only_changes_annotations() -> None:
    counts = {}
    for fraction in (0.0, 0.7, 1.0):
        dataset = SyntheticShapes(
            40, seed=2, min_objects=5, max_objects=6, max_occluded_fraction=fraction
        )
        counts[fraction] = sum(len(dataset.get_record(i).boxes) for i in range(len(dataset)))
        if fraction == 0.0:
            image_strict = dataset[7][0]
    assert counts[0.0] < counts[0.7] < counts[1.0]
    torch.testing.assert_close(image_strict, dataset[7][0], rtol=0, atol=0)


def test_synthetic_write_coco_reloads(tmp_path: Path) -> None:
    dataset = SyntheticShapes(5, seed=9, num_classes=4)
    json_path = dataset.write_coco(tmp_path / "syn")
    reloaded = CocoDataset(json_path, tmp_path / "syn" / "images")
    assert reloaded.class_names == dataset.class_names and reloaded.cat_ids == [1, 2, 3, 4]
    assert reloaded.image_ids == dataset.image_ids == [1, 2, 3, 4, 5]
    for index in range(len(dataset)):
        image_a, target_a = dataset[index]
        image_b, target_b = reloaded[index]
        torch.testing.assert_close(image_a, image_b, rtol=0, atol=0)
        torch.testing.assert_close(target_a["boxes"], target_b["boxes"], rtol=0, atol=0)
        assert target_a["labels"].tolist() == target_b["labels"].tolist()


def test_synthetic_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticShapes(1, num_classes=6)
    with pytest.raises(ValueError, match="min_size"):
        SyntheticShapes(1, min_size=20, max_size=10)
    with pytest.raises(ValueError, match="max_occluded_fraction"):
        SyntheticShapes(1, max_occluded_fraction=1.5)


# --- transforms ---------------------------------------------------------------------------------
def _target(boxes: list[list[float]], labels: list[int], height: int, width: int) -> dict:
    target = empty_target(height, width)
    target["boxes"] = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    target["labels"] = torch.tensor(labels, dtype=torch.int64)
    return target


def test_flip_closed_form_pil_and_tensor() -> None:
    width, height = 50, 30
    boxes = [[0.0, 1.0, 10.0, 20.0], [12.5, 3.0, 50.0, 30.0]]
    target = _target(boxes, [0, 1], height, width)
    target["ignore_boxes"] = torch.tensor([[5.0, 5.0, 7.0, 9.0]])
    pil = Image.fromarray(np.arange(height * width * 3, dtype=np.uint8).reshape(height, width, 3))
    tensor = ToTensor()(pil)[0]
    flip = RandomHorizontalFlip(p=1.0)
    pil_out, target_out = flip(pil, target)
    tensor_out, _ = flip(tensor, target)
    expected = [[width - x2, y1, width - x1, y2] for x1, y1, x2, y2 in boxes]
    assert target_out["boxes"].tolist() == expected
    assert target_out["ignore_boxes"].tolist() == [[43.0, 5.0, 45.0, 9.0]]
    assert target_out["flipped"] is True and target_out["labels"].tolist() == [0, 1]
    torch.testing.assert_close(tensor_out, torch.flip(tensor, dims=[-1]))
    torch.testing.assert_close(ToTensor()(pil_out)[0], tensor_out)
    twice = flip(*flip(tensor, target))
    torch.testing.assert_close(twice[0], tensor)
    assert twice[1]["boxes"].tolist() == boxes and twice[1]["flipped"] is False
    assert RandomHorizontalFlip(p=0.0)(tensor, target)[1]["flipped"] is False


def test_flip_reproducible_under_manual_seed() -> None:
    flip = RandomHorizontalFlip(p=0.5)
    image = torch.zeros(3, 4, 4)
    target = _target([[0, 0, 1, 1]], [0], 4, 4)

    def draws() -> list[bool]:
        return [flip(image, target)[1]["flipped"] for _ in range(32)]

    torch.manual_seed(123)
    first = draws()
    torch.manual_seed(123)
    assert draws() == first
    assert 0 < sum(first) < 32
    generator = torch.Generator().manual_seed(5)
    own = RandomHorizontalFlip(p=0.5, generator=generator)
    seq = [own(image, target)[1]["flipped"] for _ in range(16)]
    generator.manual_seed(5)
    assert [own(image, target)[1]["flipped"] for _ in range(16)] == seq


@pytest.mark.parametrize(
    ("hw", "short_side", "max_side", "expected_scale", "expected_hw"),
    [
        ((417, 650), 800, 1333, 800 / 417, (800, 1247)),  # short side binds
        ((100, 1000), 800, 1333, 1333 / 1000, (133, 1333)),  # long side binds
        ((600, 400), 200, None, 0.5, (300, 200)),  # shrink, no cap
    ],
)
def test_resize_keep_ratio_math(hw, short_side, max_side, expected_scale, expected_hw) -> None:
    height, width = hw
    target = _target([[10.0, 20.0, 30.0, 40.0]], [0], height, width)
    resize = ResizeKeepRatio(short_side, max_side)
    assert resize.get_scale(height, width) == pytest.approx(expected_scale)
    pil_out, out = resize(Image.new("RGB", (width, height)), target)
    tensor_out, out_t = resize(torch.rand(3, height, width), target)
    assert (pil_out.height, pil_out.width) == expected_hw == tuple(tensor_out.shape[-2:])
    assert out["size"] == expected_hw == out_t["size"]
    assert out["orig_size"] == (height, width)
    assert out["scale_factor"] == pytest.approx(expected_scale)
    torch.testing.assert_close(
        out["boxes"], torch.tensor([[10.0, 20.0, 30.0, 40.0]]) * expected_scale
    )


def test_resize_then_flip_then_back_to_original_pixels() -> None:
    target = _target([[10.0, 20.0, 30.0, 40.0]], [0], 100, 200)
    _, out = ResizeKeepRatio(50, 1000)(Image.new("RGB", (200, 100)), target)
    _, out2 = ResizeKeepRatio(25, 1000)(Image.new("RGB", (100, 50)), out)
    assert out2["scale_factor"] == pytest.approx(0.25)
    torch.testing.assert_close(out2["boxes"] / out2["scale_factor"], target["boxes"])


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(1, 300),
    width=st.integers(1, 300),
    short_side=st.integers(1, 200),
    corners=st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4),
)
def test_resize_and_flip_invert(height, width, short_side, corners) -> None:
    x1, x2 = sorted(corners[:2])
    y1, y2 = sorted(corners[2:])
    box = [[x1 * width, y1 * height, x2 * width + 1e-3, y2 * height + 1e-3]]
    target = clip_and_drop_boxes(_target(box, [0], height, width), height, width)
    image = torch.zeros(3, height, width)
    resized, out = ResizeKeepRatio(short_side, 2 * short_side)(image, target)
    assert tuple(resized.shape[-2:]) == out["size"]
    back = RandomHorizontalFlip(p=1.0)(*RandomHorizontalFlip(p=1.0)(resized, out))[1]
    if len(back["boxes"]):  # a box may vanish when rounding the new size clips it away
        # Rounding the new size can also cut a box at the far edge: expect the box clipped to
        # the resized image's extent, mapped back to original pixels.
        new_h, new_w = out["size"]
        scale = out["scale_factor"]
        limit = torch.tensor([new_w, new_h, new_w, new_h]) / scale
        expected = torch.minimum(target["boxes"], limit)
        torch.testing.assert_close(back["boxes"] / scale, expected, atol=1e-3, rtol=1e-4)


def test_mode_conversions_to_rgb() -> None:
    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 200, 100, 50, 0
    tensor, _ = ToTensor()(Image.fromarray(rgba, mode="RGBA"))
    assert tensor.shape == (3, 4, 5) and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor[:, 0, 0], torch.tensor([200, 100, 50]) / 255.0)

    grey, _ = ToTensor()(Image.fromarray(np.full((4, 5), 51, dtype=np.uint8), mode="L"))
    torch.testing.assert_close(grey, torch.full((3, 4, 5), 0.2))

    palette = Image.new("P", (5, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 128] + [0] * 762)
    torch.testing.assert_close(ToTensor()(palette)[0][:, 2, 3], torch.tensor([1.0, 0.0, 128 / 255]))

    four = torch.randint(0, 256, (4, 3, 3), dtype=torch.uint8)
    torch.testing.assert_close(ToTensor()(four)[0], four[:3].float() / 255)


def test_clip_and_drop() -> None:
    target = _target(
        [
            [-5.0, -5.0, 10.0, 10.0],
            [60.0, 5.0, 70.0, 9.0],
            [3.0, 3.0, 3.0, 9.0],
            [40.0, 20.0, 80.0, 60.0],
        ],
        [0, 1, 2, 3],
        30,
        50,
    )
    target["ignore_boxes"] = torch.tensor([[55.0, 0.0, 60.0, 5.0], [1.0, 1.0, 2.0, 2.0]])
    out = clip_and_drop_boxes(target, 30, 50)
    assert out["boxes"].tolist() == [[0.0, 0.0, 10.0, 10.0], [40.0, 20.0, 50.0, 30.0]]
    assert out["labels"].tolist() == [0, 3]
    assert out["ignore_boxes"].tolist() == [[1.0, 1.0, 2.0, 2.0]]
    assert target["boxes"].shape == (4, 4)  # input untouched


def test_resize_drops_boxes_that_round_to_nothing() -> None:
    target = _target([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 100.0, 50.0]], [0, 1], 100, 100)
    # A 0.1 px box survives (only width <= 0 is dropped); a box outside the image does not.
    target["boxes"] = torch.cat([target["boxes"], torch.tensor([[120.0, 0.0, 130.0, 10.0]])])
    target["labels"] = torch.tensor([0, 1, 2])
    _, out = ResizeKeepRatio(10, None)(torch.zeros(3, 100, 100), target)
    assert out["labels"].tolist() == [0, 1]
    torch.testing.assert_close(
        out["boxes"], torch.tensor([[0.0, 0.0, 0.1, 0.1], [0.0, 0.0, 10.0, 5.0]])
    )


def test_normalize_and_build_transforms() -> None:
    image = torch.rand(3, 6, 7)
    out, _ = Normalize()(image, None)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(out, (image - mean) / std)
    with pytest.raises(TypeError, match="ToTensor"):
        Normalize()(Image.new("RGB", (2, 2)), None)
    with pytest.raises(ValueError, match="std"):
        Normalize(std=(1.0, 0.0, 1.0))

    train = build_transforms(True, 32, 48, flip_prob=1.0)
    pil = Image.new("RGB", (80, 40), (255, 0, 0))
    image_t, target_t = train(pil, _target([[0.0, 0.0, 8.0, 4.0]], [0], 40, 80))
    assert image_t.shape == (3, 24, 48) and image_t.dtype == torch.float32
    assert target_t["flipped"] is True and target_t["size"] == (24, 48)
    # scale = min(32 / 40, 48 / 80) = 0.6, then x -> 48 - x.
    torch.testing.assert_close(target_t["boxes"], torch.tensor([[48.0 - 4.8, 0.0, 48.0, 2.4]]))
    torch.testing.assert_close(
        image_t[:, 0, 0], (torch.tensor([1.0, 0.0, 0.0]) - mean[:, 0, 0]) / std[:, 0, 0]
    )
    evaluation = build_transforms(False, 32, 48, flip_prob=1.0)
    assert not any(isinstance(t, RandomHorizontalFlip) for t in evaluation.transforms)
    image_e, target_e = evaluation(pil, None)
    assert target_e is None and image_e.shape == (3, 24, 48)


# --- collate ------------------------------------------------------------------------------------
def test_collate_pads_to_multiple_of_divisor() -> None:
    images = [torch.rand(3, 100, 150), torch.rand(3, 130, 90)]
    targets = [empty_target(100, 150, image_id=1), empty_target(130, 90, image_id=2)]
    batch, out_targets = collate(list(zip(images, targets)), size_divisor=32)
    assert batch.shape == (2, 3, 160, 160)
    torch.testing.assert_close(batch[0, :, :100, :150], images[0])
    torch.testing.assert_close(batch[1, :, :130, :90], images[1])
    assert batch[0, :, 100:].abs().sum() == 0 and batch[0, :, :, 150:].abs().sum() == 0
    assert batch[1, :, 130:].abs().sum() == 0 and batch[1, :, :, 90:].abs().sum() == 0
    assert [t["pad_shape"] for t in out_targets] == [(160, 160), (160, 160)]
    assert [t["size"] for t in out_targets] == [(100, 150), (130, 90)]
    assert "pad_shape" not in targets[0]
    assert collate([(images[0], targets[0])])[0].shape == (1, 3, 128, 256)
    assert collate([(images[0], targets[0])], size_divisor=1)[0].shape == (1, 3, 100, 150)
    with pytest.raises(ValueError, match="empty batch"):
        collate([])


# ---- a held-out part of the training split (data.holdout_fraction) ---------------------------


def test_holdout_splits_the_training_split_and_never_reads_val(tmp_path):
    from hcral.config import ConfigError, load_config
    from hcral.data.base import holdout_indices
    from hcral.runner import build_splits

    overrides = ["data.synthetic_train=10", "data.synthetic_val=4", "data.synthetic_size=64", "data.flip_prob=1.0"]
    full_train, _ = build_splits(load_config(overrides=overrides))
    cfg = load_config(overrides=[*overrides, "data.holdout_fraction=0.3", "data.holdout_seed=5"])
    train, val = build_splits(cfg)
    assert (len(train), len(val)) == (7, 3)
    held = holdout_indices(10, 0.3, seed=5)
    assert held == sorted(held) and held == holdout_indices(10, 0.3, seed=5) != holdout_indices(10, 0.3, seed=6)
    # Disjoint, together the whole training split, and nothing from the validation split.
    train_ids, val_ids = set(train.image_ids), set(val.image_ids)
    assert not train_ids & val_ids and train_ids | val_ids == set(full_train.image_ids)
    assert val_ids == {full_train.get_record(i).image_id for i in held}
    assert torch.equal(val.load_image(0), full_train.load_image(held[0]))  # pixels of the training split
    # The held-out images get the evaluation transforms (no flip), the rest the training ones.
    image, target = val[0]
    assert not target["flipped"]
    unflipped, _ = build_splits(load_config(overrides=[*overrides, "data.flip_prob=0.0"]))
    assert torch.equal(target["boxes"], unflipped[held[0]][1]["boxes"])
    assert train[0][1]["flipped"]
    assert len(val.coco_gt()["images"]) == 3
    with pytest.raises(ConfigError, match="data.holdout_fraction=1.0"):
        load_config(overrides=[*overrides, "data.holdout_fraction=1.0"])
    with pytest.raises(ValueError, match="at least 2 images"):
        holdout_indices(1, 0.5)
    assert holdout_indices(3, 0.01) == holdout_indices(3, 0.01)[:1] and len(holdout_indices(3, 0.99)) == 2
