"""PASCAL VOC XML annotations with split files."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from hcral.data.base import DetectionDataset, ImageRecord, Transform, read_image_size
from hcral.data.check import IMAGE_SUFFIXES, raise_if_problems, validate_class_names
from hcral.data.errors import DatasetError

__all__ = ["VOCDataset"]

# Folder names of the two layouts: (images, annotations).
_FLAT_LAYOUT = ("images", "annotations")
_VOCDEVKIT_LAYOUT = ("JPEGImages", "Annotations")
_VOCDEVKIT_SPLIT_DIR = ("ImageSets", "Main")
_DEFAULT_SUFFIX = ".jpg"
_BOX_FIELDS = ("xmin", "ymin", "xmax", "ymax")


class VOCDataset(DetectionDataset):
    """Images with one PASCAL VOC XML file each, listed by a split file.

    Layouts (the first that exists wins):

    * flat, as ``shared/datasets/raccoon``: ``root/images/``, ``root/annotations/<stem>.xml`` and
      ``root/<split>.txt`` listing image file names;
    * VOCdevkit: ``root/JPEGImages/``, ``root/Annotations/<stem>.xml`` and
      ``root/ImageSets/Main/<split>.txt`` listing stems (the image is the XML's ``<filename>``,
      else ``<stem>.jpg``).

    ``split`` may also be a path to a split file. Blank lines and lines starting with ``#`` are
    skipped.

    Coordinates: VOC writes 1-based, inclusive pixel corners (a box covering pixels 1..W has
    ``xmin = 1, xmax = W``). They become continuous 0-based coordinates
    ``(xmin - 1, ymin - 1, xmax, ymax)``, so the box covers exactly those pixels and a full-image
    box is ``(0, 0, W, H)``. Boxes are clipped to the image; empty ones are dropped. They are in
    the pixels of the image as shown, i.e. after its EXIF orientation; a missing or zero
    ``<size>`` is read from the image header in that frame.

    Objects with ``<difficult>1</difficult>`` go to ``ignore_boxes`` (``iscrowd = 1`` in
    :meth:`coco_gt`). Images without objects are kept (negatives). Image ids are the 1-based
    positions in the split file.

    All XML files are parsed and checked at construction, and image files must exist; images are
    decoded in ``__getitem__``. Errors are :class:`DatasetError` naming the file.

    Args:
        root: dataset folder.
        split: split name (``root/<split>.txt``) or path to a split file.
        class_names: the classes, label ``i`` = ``class_names[i]``; an object of another class is
            an error naming its file and index. ``None`` = the sorted names found in this split,
            so a misspelt name (``racoon``) silently becomes a class of its own: give the list
            (``data.class_names``) to catch it. Pass the training split's list when building any
            other split: a split's own list would number the classes differently.
        transforms: ``(image, target) -> (image, target)``; ``None`` = ``ToTensor()`` only.
    """

    def __init__(
        self,
        root: str | Path,
        split: str | Path = "train",
        *,
        class_names: Sequence[str] | None = None,
        transforms: Transform | None = None,
    ) -> None:
        super().__init__(transforms)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: dataset root folder not found")
        image_dir, ann_dir, split_file = self._find_layout(split)
        self.image_dir, self.ann_dir, self.split_file = image_dir, ann_dir, split_file

        parsed = [self._parse_xml(entry) for entry in self._read_split(split_file)]
        if class_names is None:
            class_names = sorted({name for item in parsed for name, *_ in item["objects"]})
        self.class_names = validate_class_names(class_names, f"{split_file}: class_names")
        self.cat_ids = list(range(1, len(self.class_names) + 1))
        label_of = {name: label for label, name in enumerate(self.class_names)}
        # Every object of an unknown class at once: a misspelt name is usually in several files.
        raise_if_problems(
            [
                f"{item['ann_path']}: object {index}: unknown class {name!r}; "
                f"valid classes: {self.class_names}"
                for item in parsed
                for index, (name, _, _) in enumerate(item["objects"])
                if name not in label_of
            ],
            what=f"classes of {split_file}",
        )

        self.records: list[ImageRecord] = []
        for image_id, item in enumerate(parsed, start=1):
            boxes, labels, ignore_boxes, ignore_labels = [], [], [], []
            for name, box, difficult in item["objects"]:
                (ignore_boxes if difficult else boxes).append(box)
                (ignore_labels if difficult else labels).append(label_of[name])
            self.records.append(
                ImageRecord.make(
                    image_id=image_id,
                    file_name=item["file_name"],
                    path=item["image_path"],
                    height=item["height"],
                    width=item["width"],
                    boxes=boxes,
                    labels=labels,
                    ignore_boxes=ignore_boxes,
                    ignore_labels=ignore_labels,
                )
            )

    def __len__(self) -> int:
        return len(self.records)

    def get_record(self, index: int) -> ImageRecord:
        return self.records[index]

    # --- parsing ------------------------------------------------------------------------------
    def _find_layout(self, split: str | Path) -> tuple[Path, Path, Path]:
        candidates = []
        for image_name, ann_name in (_FLAT_LAYOUT, _VOCDEVKIT_LAYOUT):
            if (self.root / ann_name).is_dir():
                candidates.append((self.root / image_name, self.root / ann_name))
        if not candidates:
            raise DatasetError(
                f"{self.root}: no annotation folder; expected '{_FLAT_LAYOUT[1]}/' "
                f"or '{_VOCDEVKIT_LAYOUT[1]}/'"
            )
        image_dir, ann_dir = candidates[0]
        tried = [
            self.root / f"{split}.txt",
            self.root.joinpath(*_VOCDEVKIT_SPLIT_DIR, f"{split}.txt"),
            Path(split),
            self.root / split,
        ]
        for split_file in tried:
            if split_file.is_file():
                return image_dir, ann_dir, split_file
        raise DatasetError(
            f"{tried[0]}: split file not found for split={str(split)!r}; tried "
            + ", ".join(str(path) for path in tried)
        )

    def _read_split(self, split_file: Path) -> list[str]:
        try:
            lines = split_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise DatasetError(f"{split_file}: cannot read split file: {error}") from error
        entries: list[str] = []
        seen: set[str] = set()
        for line_number, line in enumerate(lines, start=1):
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            if entry in seen:
                raise DatasetError(f"{split_file}: line {line_number}: {entry!r} is listed twice")
            seen.add(entry)
            entries.append(entry)
        return entries

    def _parse_xml(self, entry: str) -> dict:
        has_suffix = Path(entry).suffix.lower() in IMAGE_SUFFIXES  # else a stem (VOCdevkit style)
        stem = Path(entry).stem if has_suffix else entry
        ann_path = self.ann_dir / f"{stem}.xml"
        if not ann_path.is_file():
            raise DatasetError(
                f"{ann_path}: annotation file not found (listed in {self.split_file})"
            )
        try:
            root = ET.parse(ann_path).getroot()
        except (ET.ParseError, OSError) as error:
            raise DatasetError(f"{ann_path}: malformed XML: {error}") from error

        if has_suffix:
            file_name = entry
        else:
            file_name = (root.findtext("filename") or "").strip() or stem + _DEFAULT_SUFFIX
        image_path = self.image_dir / file_name
        if not image_path.is_file():
            raise DatasetError(f"{image_path}: image file not found (annotation {ann_path})")

        width = _optional_int(root, "size/width", ann_path)
        height = _optional_int(root, "size/height", ann_path)
        if not width or not height:
            # Some tools write 0 or no <size>; the image header is cheap to read. Its size is the
            # image as shown (after EXIF orientation), the frame the boxes are taken to be in.
            height, width = read_image_size(image_path)

        objects = []
        for index, obj in enumerate(root.findall("object")):
            name = (obj.findtext("name") or "").strip()
            if not name:
                raise DatasetError(f"{ann_path}: object {index}: missing field 'name'")
            values = {}
            for field in _BOX_FIELDS:
                text = obj.findtext(f"bndbox/{field}")
                if text is None or not text.strip():
                    raise DatasetError(
                        f"{ann_path}: object {index}: missing field 'bndbox/{field}'"
                    )
                try:
                    values[field] = float(text)
                except ValueError:
                    raise DatasetError(
                        f"{ann_path}: object {index}: field 'bndbox/{field}' is not a number: "
                        f"{text.strip()!r}"
                    ) from None
            if values["xmax"] < values["xmin"] or values["ymax"] < values["ymin"]:
                raise DatasetError(
                    f"{ann_path}: object {index}: box has x2 < x1 or y2 < y1 "
                    f"(xmin={values['xmin']:g}, ymin={values['ymin']:g}, "
                    f"xmax={values['xmax']:g}, ymax={values['ymax']:g})"
                )
            difficult = _optional_int(obj, "difficult", ann_path, index) or 0
            # 1-based inclusive corners -> continuous 0-based (see class docstring).
            box = [values["xmin"] - 1.0, values["ymin"] - 1.0, values["xmax"], values["ymax"]]
            objects.append((name, box, bool(difficult)))
        return {
            "ann_path": ann_path,
            "image_path": image_path,
            "file_name": file_name,
            "width": width,
            "height": height,
            "objects": objects,
        }


def _optional_int(
    node: ET.Element, field: str, ann_path: Path, index: int | None = None
) -> int | None:
    text = node.findtext(field)
    if text is None or not text.strip():
        return None
    try:
        return int(float(text))
    except ValueError:
        where = "" if index is None else f"object {index}: "
        raise DatasetError(
            f"{ann_path}: {where}field {field!r} is not a number: {text.strip()!r}"
        ) from None
