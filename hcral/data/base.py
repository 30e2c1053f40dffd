"""What every hcral detection dataset shares: records, image loading, targets, COCO ground truth."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import ExifTags, Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, read_file

from hcral.data.errors import DatasetError
from hcral.data.transforms import ToTensor, clip_boxes, image_size

__all__ = ["DetectionDataset", "ImageRecord", "load_image", "read_image_size"]

Transform = Callable[[Any, dict[str, Any]], tuple[Any, dict[str, Any]]]

# JPEG and PNG (by their first bytes) are decoded by torchvision.io, which applies their EXIF
# orientation; other formats (WebP, GIF, BMP, TIFF, ...) by PIL, turned by ImageOps.exif_transpose.
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_TORCHVISION_FORMATS = ("JPEG", "PNG")
# EXIF orientations 5-8 turn the stored image by 90 degrees (with or without a mirror).
_QUARTER_TURN_ORIENTATIONS = (5, 6, 7, 8)
_TIFF_WIDTH, _TIFF_LENGTH = 256, 257  # TIFF tags of the stored size
# torchvision's decoder errors read "<function>, <source file>.cpp:<line>, <message>".
_CPP_LOCATION = re.compile(r"^[^,]+, \S+:\d+, ")
# What PIL raises for a file it cannot identify or decode (UnidentifiedImageError is an OSError).
_PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def load_image(path: str | Path) -> Tensor:
    """Decode ``path`` into a uint8 RGB tensor ``(3, H, W)``, turned upright by its EXIF orientation.

    JPEG and PNG are decoded by ``torchvision.io`` (libjpeg-turbo, libpng), every other format PIL
    opens (WebP, GIF's first frame, BMP, TIFF, ...) by PIL with ``ImageOps.exif_transpose``.
    :func:`read_image_size` gives the same ``(H, W)`` from the header. Grey, grey + alpha,
    palette, RGBA and CMYK become RGB (alpha is dropped: the colour stored under transparent pixels
    is kept, as OpenCV's ``imread(IMREAD_COLOR)`` does for MMDetection); 16-bit PNG is scaled to 8
    bits (its high byte), 16-bit images of other formats are clipped by PIL's ``convert``.

    Raises:
        DatasetError: naming ``path`` if the file is missing or empty, is not an image, or cannot
            be decoded (truncated, corrupt).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: image file not found")
    if path.stat().st_size == 0:
        raise DatasetError(f"{path}: cannot read image: the file is empty")
    data = read_file(str(path))  # (num_bytes,) uint8
    head = bytes(data[: len(_PNG_MAGIC)].tolist())
    if not (head.startswith(_JPEG_MAGIC) or head.startswith(_PNG_MAGIC)):
        try:
            with Image.open(path) as image:
                return TF.pil_to_tensor(ImageOps.exif_transpose(image).convert("RGB"))
        except _PIL_ERRORS as error:
            raise DatasetError(f"{path}: cannot read image: {error}") from error
    try:
        image = decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError as error:
        message = _CPP_LOCATION.sub("", str(error).splitlines()[0])
        raise DatasetError(f"{path}: cannot read image: {message}") from error
    return TF.to_dtype(image, torch.uint8, scale=True)  # 16-bit PNG decodes to uint16


def image_header(image: Image.Image) -> tuple[tuple[int, int], int]:
    """``((width, height), orientation)`` of an opened PIL image, from its header alone: the stored
    size and the EXIF orientation (1 if absent) that :func:`load_image` applies."""
    width, height = image.size
    tags = getattr(image, "tag_v2", None)
    if tags is not None and _TIFF_WIDTH in tags and _TIFF_LENGTH in tags:
        # Recent Pillow reports a TIFF's size already turned by its orientation.
        width, height = int(tags[_TIFF_WIDTH]), int(tags[_TIFF_LENGTH])
    if image.format in _TORCHVISION_FORMATS:
        # The EXIF block torchvision reads (before the pixel data), without XMP: PNG's
        # ``getexif`` would decode the pixels to look for more.
        exif = Image.Exif()
        if image.info.get("exif"):
            exif.load(image.info["exif"])
    else:
        exif = image.getexif()  # what exif_transpose reads
    return (width, height), exif.get(ExifTags.Base.Orientation, 1)


def shown_size(stored: tuple[int, int], orientation: int) -> tuple[int, int]:
    """``(width, height)`` after EXIF ``orientation`` of an image stored as ``stored``."""
    return (stored[1], stored[0]) if orientation in _QUARTER_TURN_ORIENTATIONS else stored


def read_image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of :func:`load_image`'s tensor for ``path``, from the file header alone
    (:func:`image_header`). A truncated or corrupt body is only found by decoding
    (:func:`load_image`, :func:`hcral.data.check.check_image`).

    Raises:
        DatasetError: naming ``path`` if the file is missing or has no readable image header.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: image file not found")
    try:
        with Image.open(path) as image:
            stored, orientation = image_header(image)
    except _PIL_ERRORS as error:
        raise DatasetError(f"{path}: cannot read image header: {error}") from error
    width, height = shown_size(stored, orientation)
    return height, width


@dataclass
class ImageRecord:
    """One image's annotation in ORIGINAL image pixels (continuous xyxy, see transforms docs).

    ``boxes``/``labels`` are the objects to train on; ``ignore_boxes``/``ignore_labels`` the ones
    that neither count as positives nor as misses (VOC ``difficult``, COCO ``iscrowd``). Boxes are
    already clipped to ``(width, height)`` and empty ones dropped.
    """

    image_id: int
    file_name: str
    path: Path | None
    height: int
    width: int
    boxes: np.ndarray  # (M, 4) float32
    labels: np.ndarray  # (M,) int64
    ignore_boxes: np.ndarray  # (K, 4) float32
    ignore_labels: np.ndarray  # (K,) int64

    @staticmethod
    def make(
        *,
        image_id: int,
        file_name: str,
        path: Path | None,
        height: int,
        width: int,
        boxes: list[list[float]],
        labels: list[int],
        ignore_boxes: Sequence[Sequence[float]] = (),
        ignore_labels: Sequence[int] = (),
    ) -> ImageRecord:
        """Build a record from lists, clipping to the image and dropping empty boxes (no ignored
        boxes unless given)."""
        kept = {}
        for name, box_list, label_list in (
            ("", boxes, labels),
            ("ignore_", ignore_boxes, ignore_labels),
        ):
            box_tensor = torch.tensor(box_list, dtype=torch.float32).reshape(-1, 4)  # (M, 4)
            clipped, keep = clip_boxes(box_tensor, height, width)
            kept[name + "boxes"] = clipped[keep].numpy()
            kept[name + "labels"] = np.asarray(label_list, dtype=np.int64).reshape(-1)[keep.numpy()]
        return ImageRecord(
            image_id=int(image_id),
            file_name=str(file_name),
            path=path,
            height=int(height),
            width=int(width),
            boxes=kept["boxes"],
            labels=kept["labels"],
            ignore_boxes=kept["ignore_boxes"],
            ignore_labels=kept["ignore_labels"],
        )


class DetectionDataset(Dataset):
    """Base class: subclasses fill ``class_names``, ``cat_ids`` and implement :meth:`get_record`
    and :meth:`__len__` (and :meth:`load_image` if images are not files).

    ``__getitem__(i)`` returns ``(image, target)``: ``image`` float32 ``(3, H, W)`` after the
    transforms (``ToTensor()`` alone when ``transforms`` is None, i.e. 0..1 values); ``target``
    with ``boxes`` float32 ``(M, 4)`` xyxy in the transformed image, ``labels`` int64 ``(M,)`` in
    ``0..C-1``, ``ignore_boxes`` float32 ``(K, 4)``, ``image_id`` int, ``orig_size`` ``(h, w)`` of
    the file image, ``size`` ``(h, w)`` after resizing (before padding), ``scale_factor`` float,
    ``flipped`` bool, ``file_name`` str.
    """

    class_names: list[str]
    cat_ids: list[int]

    def __init__(self, transforms: Transform | None = None) -> None:
        self.transforms: Transform = transforms if transforms is not None else ToTensor()

    # --- to implement -------------------------------------------------------------------------
    def __len__(self) -> int:
        raise NotImplementedError

    def get_record(self, index: int) -> ImageRecord:
        """The annotation of image ``index`` in original pixels, without decoding the image."""
        raise NotImplementedError

    def image_hw(self, index: int) -> tuple[int, int]:
        """``(height, width)`` of image ``index`` in original pixels, without decoding it."""
        record = self.get_record(index)
        return record.height, record.width

    def load_image(self, index: int) -> Tensor:
        """The image ``index`` before transforms: uint8 RGB ``(3, H, W)`` (see :func:`load_image`)."""
        record = self.get_record(index)
        assert record.path is not None, "records without a path need load_image overridden"
        return load_image(record.path)

    def _load(self, index: int) -> tuple[Tensor, ImageRecord]:
        """Image and record together (generated datasets make both in one pass)."""
        return self.load_image(index), self.get_record(index)

    # --- shared -------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_ids(self) -> list[int]:
        return [self.get_record(i).image_id for i in range(len(self))]

    def label_to_cat_id(self, label: int) -> int:
        """COCO category id of contiguous ``label`` (``cat_ids[label]``)."""
        return self.cat_ids[label]

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index = index % len(self)
        image, record = self._load(index)
        height, width = image_size(image)
        if (height, width) != (record.height, record.width):
            raise DatasetError(
                f"{record.path or record.file_name}: image is {width}x{height} pixels "
                f"but its annotation says {record.width}x{record.height} (width x height)"
            )
        target: dict[str, Any] = {
            "boxes": torch.from_numpy(record.boxes.copy()),
            "labels": torch.from_numpy(record.labels.copy()),
            "ignore_boxes": torch.from_numpy(record.ignore_boxes.copy()),
            "image_id": record.image_id,
            "orig_size": (record.height, record.width),
            "size": (record.height, record.width),
            "scale_factor": 1.0,
            "flipped": False,
            "file_name": record.file_name,
        }
        return self.transforms(image, target)

    def coco_gt(self) -> dict[str, Any]:
        """COCO-format ground truth of the dataset, for :func:`hcral.evaluation.coco_evaluate`.

        ``bbox`` is ``[x, y, w, h]`` in original image pixels, ``area = w * h``; ignored objects
        (VOC ``difficult``) are written with ``iscrowd = 1``, which pycocotools treats as
        "matching detections are neither true nor false positives"; category ids are ``cat_ids``
        and annotation ids run from 1 (pycocotools treats id 0 as "unmatched").
        """
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for index in range(len(self)):
            record = self.get_record(index)
            images.append(
                {
                    "id": record.image_id,
                    "file_name": record.file_name,
                    "height": record.height,
                    "width": record.width,
                }
            )
            for boxes, labels, iscrowd in (
                (record.boxes, record.labels, 0),
                (record.ignore_boxes, record.ignore_labels, 1),
            ):
                for box, label in zip(boxes.tolist(), labels.tolist()):
                    width, height = box[2] - box[0], box[3] - box[1]
                    annotations.append(
                        {
                            "id": len(annotations) + 1,
                            "image_id": record.image_id,
                            "category_id": self.cat_ids[label],
                            "bbox": [box[0], box[1], width, height],
                            "area": width * height,
                            "iscrowd": iscrowd,
                        }
                    )
        categories = [
            {"id": cat_id, "name": name} for cat_id, name in zip(self.cat_ids, self.class_names)
        ]
        return {"images": images, "annotations": annotations, "categories": categories}


class SubsetDataset(DetectionDataset):
    """Images ``indices`` of ``dataset``, with its classes and records, under ``transforms``."""

    def __init__(self, dataset: DetectionDataset, indices: Sequence[int], transforms: Transform | None = None) -> None:
        super().__init__(transforms if transforms is not None else dataset.transforms)
        self.dataset, self.indices = dataset, [int(i) for i in indices]
        self.class_names, self.cat_ids = dataset.class_names, dataset.cat_ids

    def __len__(self) -> int:
        return len(self.indices)

    def get_record(self, index: int) -> ImageRecord:
        return self.dataset.get_record(self.indices[index])

    def image_hw(self, index: int) -> tuple[int, int]:
        return self.dataset.image_hw(self.indices[index])

    def load_image(self, index: int) -> Tensor:
        return self.dataset.load_image(self.indices[index])

    def _load(self, index: int) -> tuple[Tensor, ImageRecord]:
        return self.dataset._load(self.indices[index])


def holdout_indices(size: int, fraction: float, *, seed: int = 0) -> list[int]:
    """The sorted indices of a held-out ``fraction`` of ``size`` images: a fixed random draw of
    ``round(fraction · size)`` of them (at least 1, and at least 1 left for training)."""
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction!r}")
    if size < 2:
        raise ValueError(f"holding out part of a split needs at least 2 images, got {size}")
    count = min(max(round(fraction * size), 1), size - 1)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:count].tolist())
