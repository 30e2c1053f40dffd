"""COCO-format JSON annotations with an image folder."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hcral.data.base import DetectionDataset, ImageRecord, Transform
from hcral.data.check import validate_class_names
from hcral.data.errors import DatasetError

__all__ = ["CocoDataset"]


class CocoDataset(DetectionDataset):
    """A COCO detection JSON (``images``, ``annotations``, ``categories``) and its image folder.

    * ``bbox [x, y, w, h]`` becomes xyxy ``(x, y, x + w, y + h)`` in continuous pixels (COCO
      boxes are already continuous 0-based); boxes are clipped to the image, empty ones dropped.
    * Labels are contiguous: label ``i`` is the ``i``-th category id in ascending order
      (``cat_ids[i]``), ``class_names[i]`` its name (or the order of ``class_names`` if given).
      COCO's 80 ids run 1..90 with gaps. Category names must be distinct.
    * ``iscrowd = 1`` (or ``ignore = 1``) annotations go to ``ignore_boxes``.
    * Images without annotations are kept (negatives); nothing is skipped silently: every problem
      raises :class:`DatasetError` naming the JSON file and the entry.
    * A JSON without an ``annotations`` list (e.g. COCO test-dev image info) is an unlabelled set
      (``labelled`` is False); :func:`hcral.data.check.check_splits` refuses it for training.

    All annotations are checked and every image file must exist at construction; images are
    decoded in ``__getitem__``.

    Args:
        ann_file: the JSON file.
        image_dir: folder that ``images[*].file_name`` is relative to.
        class_names: the run's classes (the training set's): label ``i`` is the category named
            ``class_names[i]``, whatever its id in this JSON; a JSON whose category names are not
            exactly these is an error naming the differences. ``None``: the JSON's categories.
        transforms: ``(image, target) -> (image, target)``; ``None`` = ``ToTensor()`` only.
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_dir: str | Path,
        *,
        class_names: Sequence[str] | None = None,
        transforms: Transform | None = None,
    ) -> None:
        super().__init__(transforms)
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        data = _read_json(self.ann_file)
        where = str(self.ann_file)

        categories = _require_list(data, "categories", where)
        category_name: dict[int, str] = {}
        for k, category in enumerate(categories):
            entry = f"{where}: categories[{k}]"
            cat_id = _require_int(category, "id", entry)
            name = _require(category, "name", entry)
            if not isinstance(name, str):
                raise DatasetError(f"{entry}: field 'name' must be a string, got {name!r}")
            if cat_id in category_name:
                raise DatasetError(f"{entry}: duplicate category id {cat_id}")
            category_name[cat_id] = name
        validate_class_names(category_name.values(), f"{where}: categories")
        if class_names is None:
            self.cat_ids = sorted(category_name)
            self.class_names = [category_name[cat_id] for cat_id in self.cat_ids]
        else:
            self.class_names = validate_class_names(class_names, "class_names")
            id_of = {name: cat_id for cat_id, name in category_name.items()}
            extra = sorted(set(id_of) - set(self.class_names))
            missing = [name for name in self.class_names if name not in id_of]
            if extra or missing:
                raise DatasetError(
                    f"{where}: categories differ from the run's classes {self.class_names} "
                    f"(the training set's, or data.class_names): not in the run: {extra}, "
                    f"missing: {missing}"
                )
            self.cat_ids = [id_of[name] for name in self.class_names]
        label_of = {cat_id: label for label, cat_id in enumerate(self.cat_ids)}

        images = _require_list(data, "images", where)
        image_info: dict[int, dict[str, Any]] = {}
        for k, image in enumerate(images):
            entry = f"{where}: images[{k}]"
            image_id = _require_int(image, "id", entry)
            file_name = _require(image, "file_name", entry)
            if not isinstance(file_name, str) or not file_name:
                raise DatasetError(f"{entry}: field 'file_name' must be a non-empty string")
            width = _require_int(image, "width", entry)
            height = _require_int(image, "height", entry)
            if width <= 0 or height <= 0:
                raise DatasetError(
                    f"{entry}: width and height must be positive, got {width}x{height}"
                )
            if image_id in image_info:
                raise DatasetError(f"{entry}: duplicate image id {image_id}")
            image_path = self.image_dir / file_name
            if not image_path.is_file():
                raise DatasetError(f"{image_path}: image file not found (images[{k}] of {where})")
            image_info[image_id] = {
                "file_name": file_name,
                "path": image_path,
                "width": width,
                "height": height,
                "objects": [],
            }

        # False for an unlabelled set (COCO test-dev image info); a training set needs labels.
        self.labelled = "annotations" in data
        annotations = data.get("annotations", [])
        if not isinstance(annotations, list):
            raise DatasetError(f"{where}: field 'annotations' must be a list")
        self._gt_annotations: list[dict[str, Any]] = []
        for k, annotation in enumerate(annotations):
            entry = f"{where}: annotations[{k}]"
            if not isinstance(annotation, dict):
                raise DatasetError(f"{entry}: must be an object, got {annotation!r}")
            image_id = _require_int(annotation, "image_id", entry)
            cat_id = _require_int(annotation, "category_id", entry)
            if image_id not in image_info:
                raise DatasetError(f"{entry}: unknown image_id {image_id}")
            if cat_id not in label_of:
                raise DatasetError(
                    f"{entry}: unknown category_id {cat_id}; valid category ids: {self.cat_ids}"
                )
            bbox = _require(annotation, "bbox", entry)
            if not isinstance(bbox, list) or len(bbox) != 4:
                raise DatasetError(
                    f"{entry}: field 'bbox' must be a list [x, y, w, h], got {bbox!r}"
                )
            for value in bbox:
                if not _is_number(value):
                    raise DatasetError(f"{entry}: field 'bbox' has a non-numeric value: {bbox!r}")
            x, y, w, h = (float(value) for value in bbox)
            if w < 0 or h < 0:
                raise DatasetError(
                    f"{entry}: box has x2 < x1 or y2 < y1 (bbox [x, y, w, h] = {bbox!r})"
                )
            iscrowd = bool(_optional_int(annotation, "iscrowd", entry))
            ignore = bool(_optional_int(annotation, "ignore", entry))
            area = annotation.get("area", w * h)
            if not _is_number(area):
                raise DatasetError(f"{entry}: field 'area' is not a number: {area!r}")
            image_info[image_id]["objects"].append(
                ([x, y, x + w, y + h], label_of[cat_id], iscrowd or ignore)
            )
            self._gt_annotations.append(
                {
                    "id": annotation.get("id"),
                    "image_id": image_id,
                    "category_id": cat_id,
                    "bbox": [x, y, w, h],
                    "area": float(area),
                    "iscrowd": int(iscrowd or ignore),
                }
            )

        self.records: list[ImageRecord] = []
        for image_id, info in image_info.items():
            objects = info["objects"]
            self.records.append(
                ImageRecord.make(
                    image_id=image_id,
                    file_name=info["file_name"],
                    path=info["path"],
                    height=info["height"],
                    width=info["width"],
                    boxes=[box for box, _, ignored in objects if not ignored],
                    labels=[label for _, label, ignored in objects if not ignored],
                    ignore_boxes=[box for box, _, ignored in objects if ignored],
                    ignore_labels=[label for _, label, ignored in objects if ignored],
                )
            )

    def __len__(self) -> int:
        return len(self.records)

    def get_record(self, index: int) -> ImageRecord:
        return self.records[index]

    def coco_gt(self) -> dict[str, Any]:
        """The JSON's ground truth, reduced to what box evaluation reads.

        Unlike the VOC/synthetic version, boxes and ``area`` are the JSON's own (unclipped; COCO's
        ``area`` is the segment area, which pycocotools uses for the S/M/L ranges). Annotation ids
        are kept if all are distinct positive integers, else renumbered from 1 (pycocotools treats
        id 0 as "unmatched"). ``iscrowd`` is 1 for crowd and ``ignore`` annotations.
        """
        annotations = [dict(annotation) for annotation in self._gt_annotations]
        ids = [annotation["id"] for annotation in annotations]
        valid_ids = all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in ids)
        if not valid_ids or len(set(ids)) != len(ids):
            for new_id, annotation in enumerate(annotations, start=1):
                annotation["id"] = new_id
        for annotation in annotations:
            annotation["bbox"] = list(annotation["bbox"])
        images = [
            {
                "id": record.image_id,
                "file_name": record.file_name,
                "height": record.height,
                "width": record.width,
            }
            for record in self.records
        ]
        categories = [
            {"id": cat_id, "name": name} for cat_id, name in zip(self.cat_ids, self.class_names)
        ]
        return {"images": images, "annotations": annotations, "categories": categories}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found")
    try:
        with path.open("r", encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: malformed JSON: {error}") from error
    except OSError as error:
        raise DatasetError(f"{path}: cannot read annotation file: {error}") from error
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: malformed COCO JSON: the top level must be an object")
    return data


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(node: Any, key: str, entry: str) -> Any:
    if not isinstance(node, dict):
        raise DatasetError(f"{entry}: must be an object, got {node!r}")
    if key not in node:
        raise DatasetError(f"{entry}: missing field {key!r}")
    return node[key]


def _require_list(node: dict[str, Any], key: str, where: str) -> list[Any]:
    value = _require(node, key, where)
    if not isinstance(value, list):
        raise DatasetError(f"{where}: field {key!r} must be a list")
    return value


def _require_int(node: Any, key: str, entry: str) -> int:
    value = _require(node, key, entry)
    if not _is_number(value) or float(value) != int(value):
        raise DatasetError(f"{entry}: field {key!r} must be an integer, got {value!r}")
    return int(value)


def _optional_int(node: dict[str, Any], key: str, entry: str) -> int:
    if key not in node:
        return 0
    return _require_int(node, key, entry)
