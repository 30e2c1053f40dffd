"""YOLO-format datasets (hcral.data.yolo): data.yaml, label files, errors, the Aquarium data set."""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hcral.config import load_config
from hcral.data import CocoDataset, DatasetError, YOLODataset
from hcral.evaluation import write_json_atomic
from hcral.experiments.analyze import SCORE_IOU_METRICS
from hcral.runner import build_splits, train

AQUARIUM = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "aquarium"
AQUARIUM_NAMES = ["fish", "jellyfish", "penguin", "puffin", "shark", "starfish", "stingray"]
# COCO AP; metrics.json adds SCORE_IOU_METRICS (the correlations only where defined).
METRIC_KEYS = {"AP", "AP50", "AP75", "APs", "APm", "APl"}


# --- helpers ---------------------------------------------------------------------------------
def write_image(path: Path, width: int, height: int, *, orientation: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (width, height), (90, 120, 150))
    if orientation is None:
        image.save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(path, exif=exif)


def write_split(
    folder: Path, labels: dict[str, str | None], *, width: int = 200, height: int = 100
) -> None:
    """``folder/images/<name>`` images and ``folder/labels/<stem>.txt`` (None: no label file)."""
    for name, text in labels.items():
        write_image(folder / "images" / name, width, height)
        if text is not None:
            label = (folder / "labels" / name).with_suffix(".txt")
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text(text)


def write_yaml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def one_split(tmp_path: Path, labels: dict[str, str | None], names: str = "[cat, dog]") -> Path:
    write_split(tmp_path / "train", labels)
    return write_yaml(tmp_path / "data.yaml", f"train: train/images\nnames: {names}\n")


# --- reading ---------------------------------------------------------------------------------
def test_boxes_in_pixels_by_hand_and_coco_gt(tmp_path: Path) -> None:
    # 200 x 100 image. cx 0.5, cy 0.5, w 0.2, h 0.4 -> x 100 +- 20, y 50 +- 20.
    # cx 0.25, cy 0.75, w 0.5, h 0.5 -> x 50 +- 50, y 75 +- 25.
    data_yaml = one_split(tmp_path, {"a.jpg": "0 0.5 0.5 0.2 0.4\n1 0.25 0.75 0.5 0.5\n"})
    dataset = YOLODataset(data_yaml, "train")
    assert dataset.class_names == ["cat", "dog"] and dataset.cat_ids == [1, 2]
    record = dataset.get_record(0)
    assert (record.height, record.width, record.image_id) == (100, 200, 1)
    assert record.file_name == "train/images/a.jpg"
    np.testing.assert_array_equal(record.boxes, [[80, 30, 120, 70], [0, 50, 100, 100]])
    np.testing.assert_array_equal(record.labels, [0, 1])

    image, target = dataset[0]
    assert image.shape == (3, 100, 200)
    torch.testing.assert_close(target["boxes"], torch.tensor([[80.0, 30, 120, 70], [0, 50, 100, 100]]))

    gt = dataset.coco_gt()
    assert gt["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    assert gt["images"] == [{"id": 1, "file_name": "train/images/a.jpg", "height": 100, "width": 200}]
    assert [(a["bbox"], a["area"], a["category_id"]) for a in gt["annotations"]] == [
        ([80, 30, 40, 40], 1600, 1),
        ([0, 50, 100, 50], 5000, 2),
    ]
    # The same ground truth read back as a COCO dataset gives the same records.
    reloaded = CocoDataset(write_json_atomic(tmp_path / "gt.json", gt), tmp_path)
    np.testing.assert_array_equal(reloaded.get_record(0).boxes, record.boxes)
    np.testing.assert_array_equal(reloaded.get_record(0).labels, record.labels)


def test_names_as_list_and_as_dict_agree(tmp_path: Path) -> None:
    write_split(tmp_path / "train", {"a.jpg": "1 0.5 0.5 0.2 0.2\n"})
    as_list = write_yaml(tmp_path / "list.yaml", "train: train/images\nnc: 2\nnames: [cat, dog]\n")
    as_dict = write_yaml(tmp_path / "dict.yaml", "train: train/images\nnames:\n  1: dog\n  0: cat\n")
    a, b = YOLODataset(as_list, "train"), YOLODataset(as_dict, "train")
    assert a.class_names == b.class_names == ["cat", "dog"]
    np.testing.assert_array_equal(a.get_record(0).labels, b.get_record(0).labels)


def test_path_key_list_of_folders_and_image_order(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_split(data / "part1", {"b.png": "0 0.5 0.5 0.1 0.1\n", "a.jpg": None, "c.JPEG": ""})
    write_split(data / "part2", {"0.bmp": "1 0.5 0.5 0.1 0.1\n"})
    (data / "part1" / "images" / "notes.txt").write_text("not an image")
    data_yaml = write_yaml(
        tmp_path / "configs" / "data.yaml",
        "path: ../data\ntrain: [part1/images, part2/images]\nnames: [cat, dog]\n",
    )
    dataset = YOLODataset(data_yaml, "train")
    assert [r.file_name for r in dataset.records] == [
        "part1/images/a.jpg", "part1/images/b.png", "part1/images/c.JPEG", "part2/images/0.bmp",
    ]
    assert dataset.image_ids == [1, 2, 3, 4]
    assert [len(r.boxes) for r in dataset.records] == [0, 1, 0, 1]


def test_roboflow_parent_prefix_falls_back_to_the_yaml_folder(tmp_path: Path) -> None:
    write_split(tmp_path / "train", {"a.jpg": "0 0.5 0.5 0.2 0.2\n"})
    data_yaml = write_yaml(tmp_path / "data.yaml", "train: ../train/images\nnames: [cat]\n")
    assert (tmp_path.parent / "train" / "images").exists() is False
    assert YOLODataset(data_yaml, "train").image_dirs == [tmp_path / "train" / "images"]


def test_empty_and_missing_label_files_are_images_without_objects(tmp_path: Path) -> None:
    data_yaml = one_split(tmp_path, {"empty.jpg": "\n \n", "missing.jpg": None})
    dataset = YOLODataset(data_yaml, "train")
    for index in range(2):
        assert dataset.get_record(index).boxes.shape == (0, 4)
        assert dataset[index][1]["labels"].shape == (0,)
    assert dataset.coco_gt()["annotations"] == []


def test_zero_size_boxes_dropped_with_one_warning_that_counts_them(tmp_path: Path) -> None:
    data_yaml = one_split(
        tmp_path,
        {
            "a.jpg": "0 0.5 0.5 0.2 0.2\n0 0.3 0.3 0 0.1\n",
            "b.jpg": "1 0.5 0.5 0.1 0\n1 0.2 0.2 0 0\n",
        },
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = YOLODataset(data_yaml, "train")
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "dropped 3 box(es)" in message and f"{tmp_path / 'train' / 'labels' / 'a.txt'} line 2" in message
    assert [len(r.boxes) for r in dataset.records] == [1, 0]


def test_values_just_outside_unit_range_are_clamped(tmp_path: Path) -> None:
    data_yaml = one_split(tmp_path, {"a.jpg": "0 1.005 0.5 0.2 1.004\n"})
    # cx clamped to 1 -> x 200 +- 20, clipped to 200; h clamped to 1 -> y 0..100.
    np.testing.assert_allclose(YOLODataset(data_yaml, "train").get_record(0).boxes, [[180, 0, 200, 100]])


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".tif"])
def test_image_size_follows_exif_orientation(tmp_path: Path, suffix: str) -> None:
    # Stored 40 x 20, orientation 6 (rotate 90): shown 20 wide, 40 high. The label is of the shown image.
    write_image(tmp_path / "train" / "images" / f"r{suffix}", 40, 20, orientation=6)
    (tmp_path / "train" / "labels").mkdir()
    (tmp_path / "train" / "labels" / "r.txt").write_text("0 0.5 0.25 1 0.5\n")
    dataset = YOLODataset(write_yaml(tmp_path / "data.yaml", "train: train/images\nnames: [a]\n"), "train")
    record = dataset.get_record(0)
    assert (record.width, record.height) == (20, 40)
    np.testing.assert_array_equal(record.boxes, [[0, 0, 20, 20]])
    assert dataset[0][0].shape == (3, 40, 20)


def test_class_names_must_equal_the_yaml_names(tmp_path: Path) -> None:
    data_yaml = one_split(tmp_path, {"a.jpg": ""})
    assert YOLODataset(data_yaml, "train", class_names=["cat", "dog"]).class_names == ["cat", "dog"]
    with pytest.raises(DatasetError, match=r"data.yaml: class_names \['dog', 'cat'\] differ"):
        YOLODataset(data_yaml, "train", class_names=["dog", "cat"])


# --- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("0 0.5 0.5 0.2", r"expected 5 numbers 'class cx cy w h', got '0 0.5 0.5 0.2'"),
        ("0 0.5 0.5 0.2 0.2 0.1", r"expected 5 numbers"),
        ("0 0.5 x 0.2 0.2", r"expected 5 numbers"),
        ("0 0.5 nan 0.2 0.2", r"expected 5 numbers"),
        ("2 0.5 0.5 0.2 0.2", r"class index 2 out of range 0..1 \(names: \['cat', 'dog'\]\)"),
        ("-1 0.5 0.5 0.2 0.2", r"class index -1 out of range 0..1"),
        ("0.5 0.5 0.5 0.2 0.2", r"class index 0.5 out of range"),
        ("0 0.5 0.5 1.02 0.2", r"cx cy w h must lie in \[0, 1\] \(tolerance 0.01\), got 0.5 0.5 1.02 0.2"),
        ("0 -0.02 0.5 0.2 0.2", r"cx cy w h must lie in \[0, 1\]"),
    ],
)
def test_bad_label_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    data_yaml = one_split(tmp_path, {"a.jpg": f"0 0.5 0.5 0.2 0.2\n\n{line}\n"})
    label = tmp_path / "train" / "labels" / "a.txt"
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(label))}: line 3: {message}"):
        YOLODataset(data_yaml, "train")


def test_coord_tol_is_a_parameter(tmp_path: Path) -> None:
    data_yaml = one_split(tmp_path, {"a.jpg": "0 0.5 0.5 1.02 0.2\n"})
    assert len(YOLODataset(data_yaml, "train", coord_tol=0.05).get_record(0).boxes) == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train: train/images\n", r"missing key 'names'"),
        ("train: train/images\nnames: [cat, dog]\nnc: 3\n", r"nc is 3 but 'names' has 2 entries"),
        ("train: train/images\nnames: {0: cat, 2: dog}\n", r"indices 0..1, got \[0, 2\]"),
        ("train: train/images\nnames: [cat, cat]\n", r"distinct"),
        ("train: train/images\nnames: []\n", r"non-empty list or mapping"),
        ("val: train/images\nnames: [cat]\n", r"missing key 'train' .*splits in the file: val"),
        ("train: nowhere/images\nnames: [cat]\n", r"train: image folder 'nowhere/images' not found"),
        ("train: ../nowhere/images\nnames: [cat]\n", r"not found \(looked for .*nowhere/images and"),
        ("train: train/images: [\n", r"not valid YAML"),
        ("- train\n", r"the top level must be a mapping"),
    ],
)
def test_bad_data_yaml_names_the_file(tmp_path: Path, text: str, message: str) -> None:
    write_split(tmp_path / "train", {"a.jpg": ""})
    data_yaml = write_yaml(tmp_path / "data.yaml", text)
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(data_yaml))}: .*{message}"):
        YOLODataset(data_yaml, "train")


def test_missing_yaml_and_empty_image_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nope.yaml: data.yaml not found"):
        YOLODataset(tmp_path / "nope.yaml", "train")
    (tmp_path / "train" / "images").mkdir(parents=True)
    data_yaml = write_yaml(tmp_path / "data.yaml", "train: train/images\nnames: [cat]\n")
    with pytest.raises(DatasetError, match=r"split 'train' has no images"):
        YOLODataset(data_yaml, "train")


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    data_yaml = one_split(tmp_path, {"a.jpg": ""})
    bad = tmp_path / "train" / "images" / "b.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(bad))}: cannot read image"):
        YOLODataset(data_yaml, "train")


# --- the Aquarium data set -------------------------------------------------------------------
def aquarium_all_splits(tmp_path: Path) -> Path:
    """The shipped data.yaml has train and val only; this one adds test (and uses ``path``)."""
    return write_yaml(
        tmp_path / "aquarium.yaml",
        f"path: {AQUARIUM}\ntrain: train/images\nval: valid/images\ntest: test/images\n"
        f"names: {AQUARIUM_NAMES}\n",
    )


def test_aquarium_splits_classes_and_box_counts(tmp_path: Path) -> None:
    shipped = AQUARIUM / "data.yaml"  # has Roboflow's `train: ../train/images`
    train_set, val_set = YOLODataset(shipped, "train"), YOLODataset(shipped, "val")
    with pytest.warns(UserWarning, match=r"dropped 2 box\(es\) .*IMG_2423_.* line 17"):
        test_set = YOLODataset(aquarium_all_splits(tmp_path), "test")
    assert (len(train_set), len(val_set), len(test_set)) == (448, 127, 63)
    assert train_set.class_names == val_set.class_names == test_set.class_names == AQUARIUM_NAMES

    records = [r for dataset in (train_set, val_set, test_set) for r in dataset.records]
    counts = Counter(AQUARIUM_NAMES[label] for r in records for label in r.labels.tolist())
    # README: fish 2,669, jellyfish 694, penguin 516, shark 354, puffin 284, stingray 184,
    # starfish 116 (4,817), including the two zero-size shark boxes of the test split, dropped here.
    readme = {"fish": 2669, "jellyfish": 694, "penguin": 516, "shark": 354, "puffin": 284,
              "stingray": 184, "starfish": 116}
    assert sum(readme.values()) == 4817
    assert counts == Counter(readme) - Counter(shark=2)
    assert max(len(r.boxes) for r in records) == 56
    empty = [r for r in records if len(r.boxes) == 0]
    assert len(empty) == 1 and empty[0].file_name.startswith("train/images/IMG_3133_")
    assert {(r.width, r.height) for r in records} == {(768, 1024), (1024, 768), (576, 1024), (1024, 576)}
    for r in records:
        assert (r.boxes[:, 2:] > r.boxes[:, :2]).all() and (r.boxes[:, 2] <= r.width).all()

    gt = val_set.coco_gt()
    assert len(gt["images"]) == 127 and [c["name"] for c in gt["categories"]] == AQUARIUM_NAMES
    assert len(gt["annotations"]) == sum(len(r.boxes) for r in val_set.records)


def test_aquarium_through_the_config_and_a_short_run(tmp_path: Path) -> None:
    cfg = load_config(
        overrides=[
            "data.dataset=yolo", f"data.root={AQUARIUM / 'data.yaml'}", "model.backbone=small",
            "model.fpn_channels=32", "model.head_channels=32", "model.head_convs=1",
            "data.short_side=128", "data.max_side=128", "data.batch_size=2", "data.num_workers=0",
            "train.max_iters=2", "train.warmup_iters=2", "eval.batch_size=8", f"out_dir={tmp_path}",
        ]
    )
    train_set, val_set = build_splits(cfg)
    assert val_set.class_names == train_set.class_names
    assert isinstance(val_set, YOLODataset) and val_set.split == "val" and len(val_set) == 127
    metrics = train(cfg, progress=False)
    assert set(metrics) - set(SCORE_IOU_METRICS) == METRIC_KEYS and "score_iou_n" in metrics
    for key in METRIC_KEYS:
        assert metrics[key] == -1 or 0.0 <= metrics[key] <= 1.0, key
    detections = json.loads((tmp_path / "detections.json").read_text())
    assert {d["image_id"] for d in detections} <= set(val_set.image_ids)
    assert {d["category_id"] for d in detections} <= set(val_set.cat_ids)


@pytest.mark.parametrize("detector", ["fcos_atss", "atss", "retinanet"])
def test_aquarium_configs_train_the_pretrained_lite0_end_to_end(tmp_path: Path, detector: str) -> None:
    """The shipped Aquarium HCRAL configs as users run them (YOLO reader, offline ImageNet Lite0),
    shortened to two iterations at 128 px: the weights load, the frozen backbone stays as loaded."""
    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(
        repo / "configs" / f"aquarium_{detector}_hcral.yaml",
        [
            f"data.root={AQUARIUM / 'data.yaml'}", "data.short_side=128", "data.max_side=171",
            "data.num_workers=0", "train.max_iters=2", "train.warmup_iters=2", f"out_dir={tmp_path}",
        ],
    )
    assert cfg.data.class_names == AQUARIUM_NAMES and cfg.model.pretrained
    metrics = train(cfg, progress=False)
    assert set(metrics) - set(SCORE_IOU_METRICS) == METRIC_KEYS and "score_iou_n" in metrics
    from hcral.models.build import build_model

    fresh = build_model(cfg, len(AQUARIUM_NAMES)).backbone.state_dict()
    trained = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    for key, value in fresh.items():  # the whole backbone is frozen (frozen_stages 7)
        assert torch.equal(trained[f"backbone.{key}"], value), key
