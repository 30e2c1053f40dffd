"""YOLO-format datasets (the Ultralytics / Roboflow layout): a ``data.yaml`` and ``.txt`` labels."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from hcral.data.base import DetectionDataset, ImageRecord, Transform, read_image_size
from hcral.data.errors import DatasetError
from hcral.data.transforms import clip_boxes

__all__ = ["YOLODataset"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# The yaml keys that may name image folders.
_SPLIT_KEYS = ("train", "val", "test")
# The folder component that images/ is swapped for to find a label file.
_IMAGES_DIR, _LABELS_DIR, _LABEL_SUFFIX = "images", "labels", ".txt"
# Roboflow writes ``train: ../train/images`` next to a data.yaml that sits in the dataset folder.
_ROBOFLOW_PREFIX = "../"
# A label line: class index, then cx, cy, w, h.
_LINE_FIELDS = 5


class YOLODataset(DetectionDataset):
    """One split of a YOLO-format dataset described by a ``data.yaml``.

    ``data.yaml`` (as Ultralytics reads it):

    * ``train`` / ``val`` / ``test``: an image folder or a list of them, relative to ``path`` if
      the file has that key (itself relative to the yaml's folder unless absolute), else to the
      yaml's folder. Roboflow exports write ``train: ../train/images`` next to a yaml that sits in
      the dataset folder, so that path does not exist; as Ultralytics does, a path that starts with
      ``../`` and does not exist is tried once more without that prefix.
    * ``names``: a list, or a mapping ``{index: name}`` whose indices are exactly ``0..nc-1``;
      ``nc`` (optional) must equal the number of names.

    Images are the files with a suffix in :data:`IMAGE_SUFFIXES` under each folder (recursively),
    sorted by path; image ids run from 1 in that order. The label file of
    ``.../images/a/b.jpg`` is ``.../labels/a/b.txt`` (the last ``images`` component swapped for
    ``labels``). It has one line per box, ``class cx cy w h``: ``class`` an index into ``names``
    and the rest normalised to ``[0, 1]`` by the image width and height (as the image is shown,
    i.e. after its EXIF orientation). A missing or empty label file is an image without objects.

    Boxes become continuous xyxy pixels ``((cx - w/2) W, (cy - h/2) H, (cx + w/2) W,
    (cy + h/2) H)``. Values up to ``coord_tol`` outside ``[0, 1]`` are clamped (exporters round);
    further out is an error. Boxes of zero width or height are dropped with one warning for the
    whole split that counts them. Labels are the class indices; category ids are ``index + 1``.

    All label files are parsed and image headers read at construction (no pixels decoded);
    images are decoded in ``__getitem__``. Errors are :class:`DatasetError` naming the file and,
    for label files, the line.

    Args:
        data_yaml: the ``data.yaml`` file.
        split: the yaml key of the split: ``"train"``, ``"val"`` or ``"test"``.
        class_names: if given, must equal the yaml's ``names`` (a check that a config and the data
            agree; labels are always indices into ``names``).
        transforms: ``(image, target) -> (image, target)``; ``None`` = ``ToTensor()`` only.
        coord_tol: how far outside ``[0, 1]`` a normalised value may be before it is an error.
    """

    def __init__(
        self,
        data_yaml: str | Path,
        split: str = "train",
        *,
        class_names: Sequence[str] | None = None,
        transforms: Transform | None = None,
        coord_tol: float = 0.01,
    ) -> None:
        super().__init__(transforms)
        self.data_yaml = Path(data_yaml)
        self.split = split
        self.coord_tol = coord_tol
        data = _read_yaml(self.data_yaml)
        self.class_names = _read_names(data, self.data_yaml)
        if class_names is not None and list(class_names) != self.class_names:
            raise DatasetError(
                f"{self.data_yaml}: class_names {list(class_names)} differ from the file's names "
                f"{self.class_names}; drop class_names or make them equal"
            )
        self.cat_ids = list(range(1, len(self.class_names) + 1))
        self.root = _dataset_root(data, self.data_yaml)
        self.image_dirs = _image_dirs(data, split, self.root, self.data_yaml)

        image_paths = [path for folder in self.image_dirs for path in _list_images(folder)]
        if not image_paths:
            raise DatasetError(
                f"{self.data_yaml}: split {split!r} has no images with suffixes "
                f"{', '.join(IMAGE_SUFFIXES)} in {', '.join(map(str, self.image_dirs))}"
            )

        self.records: list[ImageRecord] = []
        num_dropped, dropped_example = 0, ""
        for image_id, image_path in enumerate(image_paths, start=1):
            height, width = read_image_size(image_path)
            label_path = _label_path(image_path)
            boxes, labels, line_numbers = self._parse_labels(label_path, width, height)
            # The rule ImageRecord.make drops by, applied here so the dropped boxes can be counted.
            _, keep = clip_boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), height, width)
            dropped = [n for n, kept in zip(line_numbers, keep.tolist()) if not kept]
            if dropped and not num_dropped:
                dropped_example = f"{label_path} line {dropped[0]}"
            num_dropped += len(dropped)
            self.records.append(
                ImageRecord.make(
                    image_id=image_id,
                    file_name=_relative_name(image_path, self.root),
                    path=image_path,
                    height=height,
                    width=width,
                    boxes=boxes,
                    labels=labels,
                )
            )
        if num_dropped:
            warnings.warn(
                f"{self.data_yaml}: split {split!r}: dropped {num_dropped} box(es) of zero width "
                f"or height, e.g. {dropped_example}",
                UserWarning,
                stacklevel=2,
            )

    def __len__(self) -> int:
        return len(self.records)

    def get_record(self, index: int) -> ImageRecord:
        return self.records[index]

    # --- parsing ------------------------------------------------------------------------------
    def _parse_labels(
        self, label_path: Path, width: int, height: int
    ) -> tuple[list[list[float]], list[int], list[int]]:
        """Boxes (xyxy pixels), labels and 1-based line numbers of one label file."""
        if not label_path.is_file():
            return [], [], []
        try:
            lines = label_path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise DatasetError(f"{label_path}: cannot read label file: {error}") from error
        boxes, labels, line_numbers = [], [], []
        num_classes = len(self.class_names)
        for line_number, line in enumerate(lines, start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{label_path}: line {line_number}"
            try:
                values = [float(field) for field in fields]
            except ValueError:
                values = []
            if len(values) != _LINE_FIELDS or not all(math.isfinite(v) for v in values):
                raise DatasetError(
                    f"{where}: expected {_LINE_FIELDS} numbers 'class cx cy w h', got {line.strip()!r}"
                )
            label = values[0]
            if label != int(label) or not 0 <= label < num_classes:
                raise DatasetError(
                    f"{where}: class index {fields[0]} out of range 0..{num_classes - 1} "
                    f"(names: {self.class_names})"
                )
            coords = values[1:]
            if any(not -self.coord_tol <= v <= 1 + self.coord_tol for v in coords):
                raise DatasetError(
                    f"{where}: cx cy w h must lie in [0, 1] (tolerance {self.coord_tol:g}), got "
                    f"{' '.join(fields[1:])}"
                )
            cx, cy, w, h = (min(max(v, 0.0), 1.0) for v in coords)
            boxes.append(
                [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
            )
            labels.append(int(label))
            line_numbers.append(line_number)
        return boxes, labels, line_numbers


def _label_path(image_path: Path) -> Path:
    """The label file of ``image_path``: its last ``images`` component swapped for ``labels``,
    suffix ``.txt`` (Ultralytics' rule)."""
    parts = list(image_path.parts)
    for k in range(len(parts) - 2, -1, -1):
        if parts[k] == _IMAGES_DIR:
            parts[k] = _LABELS_DIR
            break
    else:
        raise DatasetError(
            f"{image_path}: no '{_IMAGES_DIR}' folder in the path, so no labels/ folder beside it"
        )
    return Path(*parts).with_suffix(_LABEL_SUFFIX)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(f"{path}: data.yaml not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: cannot read: {error}") from error
    except yaml.YAMLError as error:
        raise DatasetError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: the top level must be a mapping with 'names' and split keys")
    return data


def _read_names(data: dict[str, Any], path: Path) -> list[str]:
    """``names`` as a list in index order, checked against ``nc``."""
    if "names" not in data:
        raise DatasetError(f"{path}: missing key 'names' (the class names)")
    names = data["names"]
    if isinstance(names, dict):
        indices = list(names)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices) or sorted(
            indices
        ) != list(range(len(indices))):
            raise DatasetError(
                f"{path}: 'names' as a mapping must have the indices 0..{len(names) - 1}, "
                f"got {indices}"
            )
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{path}: 'names' must be a non-empty list or mapping, got {names!r}")
    # YAML reads an unquoted class called 1 as an int; Ultralytics takes it as its text.
    if any(isinstance(name, bool) or not isinstance(name, (str, int)) for name in names):
        raise DatasetError(f"{path}: 'names' must be strings, got {names!r}")
    names = [str(name) for name in names]
    if len(set(names)) != len(names) or not all(names):
        raise DatasetError(f"{path}: 'names' must be distinct and non-empty, got {names}")
    if "nc" in data and data["nc"] != len(names):
        raise DatasetError(f"{path}: nc is {data['nc']!r} but 'names' has {len(names)} entries")
    return names


def _dataset_root(data: dict[str, Any], path: Path) -> Path:
    """The folder split paths are relative to: ``path`` (relative to the yaml) or the yaml's."""
    base = path.parent
    if data.get("path") is None:
        return base
    if not isinstance(data["path"], str):
        raise DatasetError(f"{path}: 'path' must be a folder name, got {data['path']!r}")
    return base / data["path"]


def _image_dirs(data: dict[str, Any], split: str, root: Path, path: Path) -> list[Path]:
    if data.get(split) is None:
        present = [key for key in _SPLIT_KEYS if data.get(key) is not None]
        raise DatasetError(
            f"{path}: missing key {split!r} (the {split} image folder); splits in the file: "
            f"{', '.join(present) or 'none'}"
        )
    entries = data[split] if isinstance(data[split], list) else [data[split]]
    folders = []
    for entry in entries:
        if not isinstance(entry, str):
            raise DatasetError(f"{path}: {split!r} must be a folder or a list of folders, got {entry!r}")
        folder = root / entry
        if not folder.exists() and entry.startswith(_ROBOFLOW_PREFIX):
            folder = root / entry[len(_ROBOFLOW_PREFIX) :]
        if not folder.is_dir():
            raise DatasetError(
                f"{path}: {split}: image folder {entry!r} not found (looked for {root / entry}"
                + (f" and {folder}" if folder != root / entry else "")
                + ")"
            )
        folders.append(folder)
    return folders


def _list_images(folder: Path) -> list[Path]:
    return sorted(
        path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    )


def _relative_name(image_path: Path, root: Path) -> str:
    try:
        return image_path.relative_to(root).as_posix()
    except ValueError:
        return image_path.as_posix()
