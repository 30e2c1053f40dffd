"""Bad data is found before the first training iteration, named, and reported all at once; one class
list per run; ``predict`` checks every input first (issue 11, items 1, 5 and 7).

Every case goes through a real entry point (``hcral.cli.main`` or ``hcral.runner.train``) on a
tiny VOC or COCO set written to ``tmp_path``.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageOps
from torchvision.transforms.v2.functional import to_pil_image

from hcral.cli import main as cli_main
from hcral.config import ConfigError, load_config
from hcral.data import DatasetError
from hcral.runner import CHECKPOINT, build_splits, load_checkpoint, train

# Stored image size (width, height) and the object drawn into every image.
SIZE = (64, 48)
BOX = (8, 6, 40, 30)  # continuous xyxy
ORIENTATION_ROTATE_90_CW = 6


# --- writing tiny data sets ---------------------------------------------------------------------
def _picture(size: tuple[int, int] = SIZE, box: tuple[int, ...] = BOX) -> Image.Image:
    """A noisy grey image with a red rectangle at ``box``."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(90, 140, (size[1], size[0], 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = (220, 30, 30)
    return Image.fromarray(pixels)


def _save_jpeg(path: Path, image: Image.Image | None = None, orientation: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    (image or _picture()).save(path, quality=95, exif=exif)
    return path


def _xml(objects: list[tuple[str, tuple[int, ...]]], size: tuple[int, int] = SIZE) -> str:
    parts = [f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height></size>"]
    for name, (x0, y0, x1, y1) in objects:
        # VOC corners are 1-based and inclusive.
        parts.append(
            f"<object><name>{name}</name><bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin>"
            f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


def _voc(root: Path, splits: dict[str, dict[str, list[str]]]) -> Path:
    """A flat VOC set: ``splits[split][stem]`` = class names of the objects in image ``stem.jpg``
    (each object at ``BOX``)."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, images in splits.items():
        for stem, names in images.items():
            _save_jpeg(root / "images" / f"{stem}.jpg")
            (root / "annotations" / f"{stem}.xml").write_text(_xml([(n, BOX) for n in names]))
        (root / f"{split}.txt").write_text("".join(f"{stem}.jpg\n" for stem in images))
    return root


RACCOONS = {"train": {"t1": ["raccoon"], "t2": ["raccoon"]}, "val": {"v1": ["raccoon"], "v2": []}}


def _coco_json(path: Path, stems: list[str], *, categories: list[str], annotations: bool = True) -> Path:
    data: dict = {
        "images": [
            {"id": i, "file_name": f"{stem}.jpg", "width": SIZE[0], "height": SIZE[1]}
            for i, stem in enumerate(stems, start=1)
        ],
        "categories": [{"id": i, "name": name} for i, name in enumerate(categories, start=1)],
    }
    if annotations:
        x0, y0, x1, y1 = BOX
        data["annotations"] = [
            {"id": i, "image_id": i, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": 1.0}
            for i in range(1, len(stems) + 1)
        ]
    path.write_text(json.dumps(data))
    return path


def _coco(root: Path, *, train_categories=("fish",), val_categories=("fish",), train_annotations=True) -> dict:
    for stem in ("t1", "t2", "v1"):
        _save_jpeg(root / "images" / f"{stem}.jpg")
    return {
        "dataset": "coco",
        "train_ann": str(_coco_json(root / "train.json", ["t1", "t2"], categories=list(train_categories),
                                    annotations=train_annotations)),
        "val_ann": str(_coco_json(root / "val.json", ["v1"], categories=list(val_categories))),
        "train_images": str(root / "images"),
        "val_images": str(root / "images"),
    }


def _config_file(tmp_path: Path, data: dict) -> Path:
    """A YAML config for a 1-iteration run of a detector small enough for a test."""
    config = {
        "model": {"backbone": "small", "fpn_channels": 16, "head_channels": 16, "head_convs": 1},
        "data": {"short_side": 32, "max_side": 64, "batch_size": 2, "num_workers": 0, **data},
        "train": {"epochs": 1, "max_iters": 1, "warmup_iters": 1, "device": "cpu", "log_interval": 1},
        # Every detection reaches predictions.json (an untrained model scores about 0.01).
        "eval": {"batch_size": 4, "score_thr": 0.0, "max_per_img": 5},
        "out_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _voc_data(root: Path, **extra) -> dict:
    return {"dataset": "voc", "root": str(root), **extra}


# --- probes: bad data refused before the first iteration, every problem named ------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _val_zebra(root: Path) -> dict:
    # Train classes {aardvark, raccoon}, val {raccoon, zebra}: before, zebra took raccoon's label 0.
    splits = {"train": {"t1": ["aardvark"], "t2": ["raccoon"]}, "val": {"v1": ["raccoon"], "v2": ["zebra"]}}
    return _voc_data(_voc(root, splits))


def _typo(root: Path) -> dict:
    splits = {"train": {"t1": ["raccoon"], "t2": ["racoon"], "t3": ["racoon"]}, "val": {"v1": ["raccoon"]}}
    return _voc_data(_voc(root, splits), class_names=["raccoon"])


def _truncated_val(root: Path) -> dict:
    _truncate(_voc(root, RACCOONS) / "images" / "v1.jpg")
    return _voc_data(root)


def _empty_val_file(root: Path) -> dict:
    (_voc(root, RACCOONS) / "images" / "v1.jpg").write_bytes(b"")
    return _voc_data(root)


def _not_an_image(root: Path) -> dict:
    (_voc(root, RACCOONS) / "images" / "v1.jpg").write_text("<html>404 Not Found</html>")
    return _voc_data(root)


def _exif_rotated(root: Path) -> dict:
    # The annotation has the stored size, the image is shown turned by 90 degrees.
    _voc(root, RACCOONS)
    _save_jpeg(root / "images" / "t2.jpg", orientation=ORIENTATION_ROTATE_90_CW)
    return _voc_data(root)


def _empty_val_split(root: Path) -> dict:
    (_voc(root, RACCOONS) / "val.txt").write_text("# nothing here yet\n")
    return _voc_data(root)


def _val_without_boxes(root: Path) -> dict:
    splits = {"train": RACCOONS["train"], "val": {"v1": [], "v2": []}}
    return _voc_data(_voc(root, splits))


def _many_problems(root: Path) -> dict:
    # 22 empty validation files and a truncated training image: one error, 20 listed, a count.
    splits = {"train": RACCOONS["train"], "val": {f"v{i:02d}": ["raccoon"] for i in range(22)}}
    _voc(root, splits)
    for i in range(22):
        (root / "images" / f"v{i:02d}.jpg").write_bytes(b"")
    _truncate(root / "images" / "t1.jpg")
    return _voc_data(root)


def _coco_val_other_categories(root: Path) -> dict:
    return _coco(root, train_categories=("fish", "shark"), val_categories=("fish", "penguin"))


def _coco_train_without_annotations(root: Path) -> dict:
    return _coco(root, train_annotations=False)


Probe = tuple[Callable[[Path], dict], list[str]]
REFUSED: dict[str, Probe] = {
    "val class not in the train list": (
        _val_zebra,
        [r"annotations/v2\.xml: object 0: unknown class 'zebra'; valid classes: \['aardvark', 'raccoon'\]"],
    ),
    "misspelt class with data.class_names": (
        _typo,
        [r"2 problems in the classes of .*train\.txt",
         r"annotations/t2\.xml: object 0: unknown class 'racoon'; valid classes: \['raccoon'\]",
         r"annotations/t3\.xml: object 0: unknown class 'racoon'"],
    ),
    "truncated val image": (_truncated_val, [r"images/v1\.jpg: truncated or corrupt image"]),
    "empty val image file": (_empty_val_file, [r"images/v1\.jpg: empty file \(0 bytes\)"]),
    "val file is not an image": (_not_an_image, [r"images/v1\.jpg: not an image"]),
    "EXIF rotation vs annotated size": (
        _exif_rotated,
        [r"images/t2\.jpg: its EXIF orientation \(tag 274 = 6, rotated 90 degrees clockwise\) makes the "
         r"image 48x64 pixels as shown, but its annotation says 64x48"],
    ),
    "empty val split": (_empty_val_split, [r"val\.txt: the validation split has no images"]),
    "val split without boxes": (
        _val_without_boxes, [r"val\.txt: the validation split has 2 images but not a single box"]
    ),
    "all problems at once, capped": (
        _many_problems,
        [r"23 problems in the data:", r"images/t1\.jpg: truncated", r"images/v00\.jpg: empty file",
         r"images/v18\.jpg: empty file", r"\.\.\. and 3 more"],
    ),
    "COCO val json with other categories": (
        _coco_val_other_categories,
        [r"val\.json: categories differ from the run's classes \['fish', 'shark'\].*"
         r"not in the run: \['penguin'\], missing: \['shark'\]"],
    ),
    "COCO train json without annotations": (
        _coco_train_without_annotations,
        [r"train\.json: the training split has 2 images but not a single box; the JSON has no "
         r"'annotations' list"],
    ),
}


@pytest.mark.parametrize("probe", list(REFUSED), ids=list(REFUSED))
def test_bad_data_is_refused_before_training_and_named(tmp_path, capsys, probe):
    make, messages = REFUSED[probe]
    config = _config_file(tmp_path, make(tmp_path / "data"))
    assert cli_main(["train", str(config), "--no-progress"]) != 0
    err = capsys.readouterr().err
    for message in messages:
        assert re.search(message, err), (message, err)
    assert not (tmp_path / "run" / CHECKPOINT).exists()  # refused before the first iteration
    # `hcral check-data` finds the same on its own, one line a problem (no header, no cap).
    assert cli_main(["check-data", str(config)]) != 0
    err = capsys.readouterr().err
    for message in [m for m in messages if not re.search("problems in|more$", m)]:
        assert re.search(message, err), (message, err)


def test_check_data_lists_every_problem_uncapped(tmp_path, capsys):
    config = _config_file(tmp_path, _many_problems(tmp_path / "data"))
    assert cli_main(["check-data", str(config)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert sum("empty file (0 bytes)" in line for line in lines) == 22
    assert lines[-1] == "hcral check-data: 23 problems"


def test_check_data_on_clean_data_summarises(tmp_path, capsys):
    config = _config_file(tmp_path, _voc_data(_voc(tmp_path / "data", RACCOONS)))
    assert cli_main(["check-data", str(config)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "train: 2 images, 2 boxes", "val: 2 images, 1 boxes", "classes: ['raccoon']"
    ]


def test_full_decode_finds_damage_that_the_end_marker_check_misses(tmp_path, capsys):
    # PNG data flipped inside its IDAT chunk: the file still ends with IEND.
    root = _voc(tmp_path / "data", RACCOONS)
    buffer = io.BytesIO()
    _picture().save(buffer, format="PNG")
    damaged = bytearray(buffer.getvalue())
    damaged[len(damaged) // 2 : len(damaged) // 2 + 64] = bytes(64)
    (root / "images" / "v1.jpg").write_bytes(bytes(damaged))
    config = _config_file(tmp_path, _voc_data(root))
    assert cli_main(["check-data", str(config)]) == 0
    assert cli_main(["check-data", str(config), "--full-decode"]) == 1
    assert re.search(r"images/v1\.jpg: truncated or corrupt image", capsys.readouterr().err)


# --- probes: the right result ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A 1-iteration run on train {aardvark, raccoon}, val {raccoon}: the val set lacks a class."""
    tmp_path = tmp_path_factory.mktemp("run")
    splits = {"train": {"t1": ["aardvark"], "t2": ["raccoon"]}, "val": {"v1": ["raccoon"]}}
    config = _config_file(tmp_path, _voc_data(_voc(tmp_path / "data", splits)))
    torch.manual_seed(0)
    train(load_config(config), progress=False)
    return tmp_path


def test_val_without_a_class_uses_the_train_list(trained_run):
    # Before: the val set's own list [raccoon] numbered raccoon 0, the model's aardvark, and the
    # final evaluation failed (labels must be in 0..0).
    run = trained_run / "run"
    assert load_checkpoint(run / CHECKPOINT)["class_names"] == ["aardvark", "raccoon"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) >= {"AP", "AP50"}
    cfg = load_config(trained_run / "config.yaml")
    train_set, val_set = build_splits(cfg)
    assert val_set.class_names == train_set.class_names == ["aardvark", "raccoon"]
    gt = val_set.coco_gt()
    assert [a["category_id"] for a in gt["annotations"]] == [2]  # raccoon, as in training
    # `hcral eval` labels the val set with the checkpoint's list too.
    out = trained_run / "eval"
    assert cli_main(["eval", str(trained_run / "config.yaml"), "--checkpoint", str(run / CHECKPOINT),
                     "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text()) == metrics


def test_resume_on_data_with_other_classes_is_refused(trained_run, tmp_path):
    (tmp_path / "run").mkdir()
    shutil.copy(trained_run / "run" / CHECKPOINT, tmp_path / "run" / CHECKPOINT)
    # Another class list in the config: the resume's config check names the key.
    overrides = ["data.class_names=[raccoon, aardvark]", f"out_dir={tmp_path / 'run'}"]
    cfg = load_config(trained_run / "config.yaml", overrides)
    with pytest.raises(ConfigError, match=r"cannot resume .*checkpoint\.pt: .*data\.class_names"):
        train(cfg, resume=True, progress=False)
    # The same config, but the data's classes are not the checkpoint's.
    ckpt = load_checkpoint(tmp_path / "run" / CHECKPOINT)
    ckpt["class_names"] = ["raccoon", "aardvark"]
    torch.save(ckpt, tmp_path / "run" / CHECKPOINT)
    cfg = load_config(trained_run / "config.yaml", [f"out_dir={tmp_path / 'run'}"])
    with pytest.raises(DatasetError, match=r"checkpoint\.pt: trained on classes \['raccoon', 'aardvark'\]"):
        train(cfg, resume=True, progress=False)


def _predict(trained_run: Path, out: Path, *inputs: Path | str, extra: tuple[str, ...] = ()) -> int:
    run = trained_run / "run"
    args = ["predict", str(trained_run / "config.yaml"), "--checkpoint", str(run / CHECKPOINT)]
    return cli_main([*args, *map(str, inputs), "--out", str(out), *extra])


def test_predict_a_folder_predicts_every_image_in_it(trained_run, tmp_path):
    folder = tmp_path / "photos"
    for stem in ("b", "a"):
        _save_jpeg(folder / f"{stem}.jpg")
    (folder / "notes.txt").write_text("not an image, not taken")
    assert _predict(trained_run, tmp_path / "out", folder) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png", "predictions.json"]
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert {p["file_name"] for p in predictions} == {"a.jpg", "b.jpg"}


@pytest.mark.parametrize(
    ("inputs", "messages"),
    [
        (["a.jpg", "missing.jpg"], [r"missing\.jpg: image file not found"]),
        (["a.jpg", "cut.jpg", "missing.jpg", "empty_dir"],
         [r"3 problems in the input images", r"cut\.jpg: truncated or corrupt image",
          r"missing\.jpg: image file not found", r"empty_dir: folder without image files"]),
        (["a.jpg", "other/a.jpg"], [r"2 inputs named 'a'; their outputs \(a\.png\) would overwrite"]),
    ],
    ids=["missing file", "every bad input at once", "two inputs, one output name"],
)
def test_predict_checks_every_input_before_writing(trained_run, tmp_path, capsys, inputs, messages):
    _save_jpeg(tmp_path / "a.jpg")
    _save_jpeg(tmp_path / "other" / "a.jpg")
    _truncate(_save_jpeg(tmp_path / "cut.jpg"))
    (tmp_path / "empty_dir").mkdir()
    assert _predict(trained_run, tmp_path / "out", *[tmp_path / name for name in inputs]) != 0
    err = capsys.readouterr().err
    for message in messages:
        assert re.search(message, err), (message, err)
    assert not (tmp_path / "out").exists()  # nothing written, not even a.png


def test_predict_score_thr_sets_what_the_pngs_show(trained_run, tmp_path, capsys):
    image = _save_jpeg(tmp_path / "a.jpg")
    shown = np.asarray(Image.open(image).convert("RGB"))
    drawn = {}
    for thr in ("0", "1"):
        out = tmp_path / f"out{thr}"
        assert _predict(trained_run, out, image, extra=("--score-thr", thr)) == 0
        predictions = json.loads((out / "predictions.json").read_text())
        count = sum(p["score"] >= float(thr) for p in predictions)
        assert f"; {count} with score >= {thr} drawn into the PNGs" in capsys.readouterr().out
        drawn[thr] = np.asarray(Image.open(out / "a.png").convert("RGB"))
    assert predictions  # eval.score_thr = 0: the model's top detections are written
    assert not np.array_equal(drawn["0"], shown)  # every detection drawn
    assert np.array_equal(drawn["1"], shown)  # none reaches 1
    assert _predict(trained_run, tmp_path / "bad", image, extra=("--score-thr", "1.5")) != 0
    assert "score_thr must be in [0, 1], got 1.5" in capsys.readouterr().err


# --- EXIF orientation applied everywhere ----------------------------------------------------------
def _exif_image(path: Path) -> tuple[Path, Image.Image]:
    """A stored 64x48 JPEG shown turned by 90 degrees, and the image as shown."""
    stored = _save_jpeg(path, orientation=ORIENTATION_ROTATE_90_CW)
    with Image.open(stored) as image:
        return stored, ImageOps.exif_transpose(image).convert("RGB")


def _red_box(image: Image.Image) -> tuple[int, int, int, int]:
    pixels = np.asarray(image).astype(int)
    ys, xs = np.nonzero((pixels[..., 0] > 180) & (pixels[..., 1] < 90))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_exif_image_without_annotated_size_puts_boxes_on_the_shown_pixels(tmp_path, capsys):
    # Before: <size> 0 took the stored (unrotated) size and pixels, so a box drawn on the image as
    # every viewer shows it covered other pixels.
    root = _voc(tmp_path / "data", RACCOONS)
    _, shown = _exif_image(root / "images" / "t1.jpg")
    box = _red_box(shown)
    (root / "annotations" / "t1.xml").write_text(_xml([("raccoon", box)], size=(0, 0)))
    config = _config_file(tmp_path, _voc_data(root))
    assert cli_main(["check-data", str(config)]) == 0
    train_set, _ = build_splits(load_config(config))
    record = train_set.get_record(0)
    assert (record.width, record.height) == shown.size == (SIZE[1], SIZE[0])
    image = to_pil_image(train_set.load_image(0))
    assert image.size == shown.size
    assert _red_box(image) == box == tuple(int(v) for v in record.boxes[0])


def test_predict_writes_an_exif_image_as_shown(trained_run, tmp_path):
    stored, shown = _exif_image(tmp_path / "a.jpg")
    assert _predict(trained_run, tmp_path / "out", stored) == 0
    with Image.open(tmp_path / "out" / "a.png") as png:
        assert png.size == shown.size == (SIZE[1], SIZE[0])
