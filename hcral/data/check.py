"""Checks that find bad data before a run starts, and report every problem at once.

A training run reads each image only when its batch comes; without these checks a truncated
validation image is found after the last iteration, an EXIF-rotated image fails with a size
mismatch that does not say why, and a set without boxes trains to the end on zero positives.
:func:`check_splits` runs before the first iteration (``hcral train``) and on its own
(``hcral check-data CONFIG``).

What an image check costs: the header (size, EXIF orientation) and the file's last bytes (the JPEG
end-of-image marker, PNG's ``IEND`` chunk), about 0.1 ms an image from the page cache (51 ms for
the 575 Aquarium train+valid JPEGs, 21 ms for Raccoon's 200); only a file that does not end as its
format should, or a format without an end marker, is decoded (JPEG at 1/8 scale, which still reads
all of the entropy-coded data). ``full_decode=True`` decodes every file that way (1.5 s for the
575 Aquarium images, 1024 px on the long side): it also finds damage inside the data of a file whose end is
intact. A JPEG cut short but ending with an end marker decodes without error in PIL and is not
found either way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image

from hcral.data.base import DetectionDataset, image_header, shown_size
from hcral.data.errors import DatasetError
from hcral.data.synthetic import SyntheticShapes

__all__ = [
    "IMAGE_SUFFIXES",
    "box_count",
    "check_dataset",
    "check_image",
    "check_splits",
    "collect_images",
    "raise_if_problems",
    "validate_class_names",
]

# Files taken as images when a folder is given, and split lines that name a file (VOC).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# EXIF tag 274: how to turn the stored pixels to show the image upright (hcral.data.base.image_header).
_ORIENTATION_NAMES = {
    2: "mirrored",
    3: "rotated 180 degrees",
    4: "mirrored vertically",
    5: "mirrored and rotated 90 degrees",
    6: "rotated 90 degrees clockwise",
    7: "mirrored and rotated 90 degrees clockwise",
    8: "rotated 90 degrees counter-clockwise",
}
# How a complete file of these formats ends: JPEG's EOI marker, PNG's IEND chunk with its CRC.
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"\x00\x00\x00\x00IEND\xaeB`\x82"}
# JPEG decodes at 1/8 scale in the integrity check: every byte is read, the IDCT is 64x cheaper.
_JPEG_DRAFT_SCALE = 8


def _decode(image: Image.Image) -> None:
    """Decode every byte of ``image`` (JPEG at reduced scale); raises on truncated or bad data."""
    if image.format == "JPEG":
        image.draft(
            image.mode,
            (max(1, image.width // _JPEG_DRAFT_SCALE), max(1, image.height // _JPEG_DRAFT_SCALE)),
        )
    image.load()


def check_image(
    path: str | Path, *, full_decode: bool = False
) -> tuple[str | None, tuple[int, int], int | None]:
    """Check that ``path`` is a complete, readable image, decoding it only if its end is not
    as its format's should be (or always with ``full_decode``).

    Returns:
        ``(problem, (width, height), orientation)``: ``problem`` is ``None`` or a message that
        starts with ``path``; the size is the stored one (before EXIF orientation, ``(0, 0)`` if
        unreadable) and ``orientation`` the EXIF orientation tag (1 if absent, ``None`` if
        unreadable), both from :func:`hcral.data.base.image_header`.
    """
    path = Path(path)
    if not path.is_file():
        return f"{path}: image file not found", (0, 0), None
    file_size = path.stat().st_size
    if file_size == 0:
        return f"{path}: empty file (0 bytes), not an image", (0, 0), None
    try:
        with Image.open(path) as image:
            size, orientation = image_header(image)
            marker = _END_MARKERS.get(image.format or "")
            complete = False
            if marker is not None and not full_decode:
                with path.open("rb") as handle:
                    handle.seek(max(file_size - len(marker), 0))
                    complete = handle.read() == marker
            # No end marker (cut off, or data appended after it), or a format without one: decode.
            if not complete:
                _decode(image)
    except Image.UnidentifiedImageError:
        return f"{path}: not an image (PIL cannot identify the file format)", (0, 0), None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        return f"{path}: truncated or corrupt image: {error}", (0, 0), None
    return None, size, orientation


def _size_problem(
    path: Path,
    stored: tuple[int, int],
    orientation: int | None,
    annotated: tuple[int, int],
) -> str | None:
    """A message if the annotation's ``(width, height)`` is not the image's size as shown."""
    shown = shown_size(stored, orientation)
    if shown == annotated:
        return None
    ann_w, ann_h = annotated
    if stored == annotated:  # and so the orientation swaps the sides
        return (
            f"{path}: its EXIF orientation (tag 274 = {orientation}, "
            f"{_ORIENTATION_NAMES[orientation]}) makes the image {shown[0]}x{shown[1]} pixels as "
            f"shown, but its annotation says {ann_w}x{ann_h} (width x height), the size of the "
            "stored pixels before rotation: the boxes are probably in unrotated pixels. hcral "
            "applies EXIF orientation as image viewers do: rotate the file's pixels (e.g. PIL "
            "ImageOps.exif_transpose, then save without EXIF) and its boxes, or annotate the "
            "image as shown"
        )
    note = (
        f" (after its EXIF orientation, {_ORIENTATION_NAMES[orientation]})"
        if orientation in _ORIENTATION_NAMES
        else ""
    )
    return (
        f"{path}: image is {shown[0]}x{shown[1]} pixels{note} but its annotation says "
        f"{ann_w}x{ann_h} (width x height)"
    )


def check_dataset(dataset: DetectionDataset, *, full_decode: bool = False) -> list[str]:
    """Every problem of ``dataset``'s image files and their annotated sizes, without raising.

    For each image: the file exists, is not empty, is an image, is complete (see
    :func:`check_image`), and its size as shown (after EXIF orientation) is the annotation's;
    a mismatch that swapping width and height would fix is reported as an EXIF problem. Generated
    sets (:class:`~hcral.data.SyntheticShapes`) have no files and valid boxes by construction
    and are not checked.

    Returns:
        One message per problem, each starting with the image's path.
    """
    if isinstance(dataset, SyntheticShapes):
        return []
    problems: list[str] = []
    for index in range(len(dataset)):
        record = dataset.get_record(index)
        if record.path is None:
            continue
        problem, stored, orientation = check_image(record.path, full_decode=full_decode)
        if problem is None:
            problem = _size_problem(
                record.path, stored, orientation, (record.width, record.height)
            )
        if problem is not None:
            problems.append(problem)
    return problems


def _describe(dataset: DetectionDataset) -> str:
    """The file a dataset was read from, for messages about the whole split."""
    for attribute in ("ann_file", "split_file"):
        source = getattr(dataset, attribute, None)
        if source is not None:
            return str(source)
    return repr(dataset)


def box_count(dataset: DetectionDataset) -> int:
    """Boxes to train on (not the ignored ones) in ``dataset``."""
    return sum(len(dataset.get_record(index).boxes) for index in range(len(dataset)))


def check_splits(
    train_set: DetectionDataset | None,
    val_set: DetectionDataset | None,
    *,
    full_decode: bool = False,
) -> list[str]:
    """:func:`check_dataset` of both splits, plus what makes a run meaningless as a whole.

    A training set without a single box (it would train on zero positives; e.g. a COCO JSON
    without ``annotations``) and a validation split without images or without boxes (its AP
    is undefined, -1) are problems. Pass ``None`` for a split that the run does not use.
    """
    problems: list[str] = []
    for role, dataset in (("training", train_set), ("validation", val_set)):
        if dataset is None:
            continue
        where = _describe(dataset)
        if len(dataset) == 0:
            problems.append(
                f"{where}: the {role} split has no images"
                + (": nothing to evaluate" if role == "validation" else "")
            )
            continue
        problems += check_dataset(dataset, full_decode=full_decode)
        if isinstance(dataset, SyntheticShapes) or box_count(dataset) > 0:
            continue
        unlabelled = getattr(dataset, "labelled", True) is False
        reason = "; the JSON has no 'annotations' list" if unlabelled else ""
        consequence = (
            "training would see zero positives"
            if role == "training"
            else "AP is undefined (-1) without ground truth"
        )
        problems.append(
            f"{where}: the {role} split has {len(dataset)} images but not a single box"
            f"{reason}: {consequence}"
        )
    return problems


def raise_if_problems(problems: Sequence[str], *, what: str = "data", max_listed: int = 20) -> None:
    """Raise one :class:`DatasetError` listing ``problems`` (the first ``max_listed`` of them).

    One problem is raised as its own message; several as a count and one line each.
    """
    if not problems:
        return
    if len(problems) == 1:
        raise DatasetError(problems[0])
    lines = [f"{len(problems)} problems in the {what}:"]
    lines += [f"  - {problem}" for problem in problems[:max_listed]]
    if len(problems) > max_listed:
        lines.append(f"  ... and {len(problems) - max_listed} more")
    raise DatasetError("\n".join(lines))


def validate_class_names(class_names: Iterable[str], where: str) -> list[str]:
    """``class_names`` as a list, checked to be distinct non-empty strings.

    Raises:
        DatasetError: naming ``where`` and the duplicated or empty names.
    """
    names = list(class_names)
    bad = [name for name in names if not isinstance(name, str) or not name]
    duplicated = sorted(name for name, count in Counter(map(str, names)).items() if count > 1)
    if bad or duplicated:
        raise DatasetError(
            f"{where}: class names must be distinct non-empty strings; "
            f"empty or not strings: {bad}, duplicated: {duplicated}"
        )
    return names


def collect_images(paths: Iterable[str | Path], *, full_decode: bool = False) -> list[Path]:
    """The image files that ``paths`` name, every one checked before any is used.

    A folder stands for the files in it (not recursively) whose suffix is in
    :data:`IMAGE_SUFFIXES`, sorted by name. Outputs are named by file stem, so two inputs with one
    stem are a problem too.

    Raises:
        DatasetError: listing every missing, empty, unreadable or truncated file, every folder
            without images and every stem clash.
    """
    files: list[Path] = []
    problems: list[str] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append(
                    f"{path}: folder without image files (suffixes {', '.join(IMAGE_SUFFIXES)})"
                )
            files += found
        else:
            files.append(path)
    for path in files:
        problem, _, _ = check_image(path, full_decode=full_decode)
        if problem is not None:
            problems.append(problem)
    by_stem: dict[str, list[Path]] = {}
    for path in files:
        by_stem.setdefault(path.stem, []).append(path)
    for stem, clashing in by_stem.items():
        if len(clashing) > 1:
            problems.append(
                f"{', '.join(map(str, clashing))}: {len(clashing)} inputs named {stem!r}; their "
                f"outputs ({stem}.png) would overwrite each other"
            )
    raise_if_problems(problems, what="input images")
    return files
