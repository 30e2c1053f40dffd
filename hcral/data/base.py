"""What every hcral detection dataset shares: records, image loading, targets, COCO ground truth."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from hcral.data.errors import DatasetError
from hcral.data.transforms import ToTensor, clip_boxes, to_rgb

__all__ = ["DetectionDataset", "ImageRecord", "load_image"]

Transform = Callable[[Any, dict[str, Any]], tuple[Any, dict[str, Any]]]


def load_image(path: str | Path) -> Image.Image:
    """Decode ``path`` fully into an RGB PIL image (see :func:`hcral.data.transforms.to_rgb`).

    Raises:
        DatasetError: naming ``path`` if the file is missing or cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: image file not found")
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        # PIL reports undecodable bytes as UnidentifiedImageError (an OSError), truncated data as
        # OSError, some broken headers as SyntaxError/ValueError.
        raise DatasetError(f"{path}: cannot read image: {error}") from error


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
        ignore_boxes: list[list[float]],
        ignore_labels: list[int],
    ) -> ImageRecord:
        """Build a record from lists, clipping to the image and dropping empty boxes."""
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

    def load_image(self, index: int) -> Image.Image:
        """The RGB image ``index`` as stored (before transforms)."""
        record = self.get_record(index)
        assert record.path is not None, "records without a path need load_image overridden"
        return load_image(record.path)

    def _load(self, index: int) -> tuple[Image.Image, ImageRecord]:
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
        if (image.height, image.width) != (record.height, record.width):
            raise DatasetError(
                f"{record.path or record.file_name}: image is {image.width}x{image.height} pixels "
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
