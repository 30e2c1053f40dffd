"""Reading image files: load_image (torchvision.io for JPEG/PNG, PIL otherwise) and read_image_size
(header only)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from hcral.data import DatasetError, load_image, read_image_size
from hcral.data.base import shown_size
from hcral.data.check import check_image

RACCOON = Path(
    os.environ.get("HCRAL_RACCOON", Path(__file__).resolve().parents[2] / "shared/datasets/raccoon")
)
ORIENTATION_TAG = 0x0112  # EXIF "Orientation"


def _pattern(height: int = 30, width: int = 50) -> np.ndarray:
    """(H, W, 3) uint8 with smooth gradients (JPEG keeps them) and no symmetry."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack((x * 255 // (width - 1), y * 255 // (height - 1), (x + 2 * y) % 256), -1).astype(np.uint8)


def _save(path: Path, orientation: int | None, **options) -> Path:
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION_TAG] = orientation
    Image.fromarray(_pattern()).save(path, exif=exif.tobytes(), **options)
    return path


def _save_jpeg(path: Path, orientation: int | None) -> Path:
    return _save(path, orientation, quality=95)


def _pil_reference(path: Path) -> torch.Tensor:
    """PIL's decode with PIL's EXIF transpose, as (3, H, W) uint8: an independent reference."""
    with Image.open(path) as image:
        upright = ImageOps.exif_transpose(image).convert("RGB")
    return torch.from_numpy(np.asarray(upright).copy()).permute(2, 0, 1)


@pytest.mark.parametrize("orientation", [None, 1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".tif"])
def test_exif_orientation_applied_and_header_size_agrees(tmp_path, orientation, suffix):
    # JPEG/PNG through torchvision.io, WebP/TIFF through PIL: all turned upright.
    path = _save(tmp_path / f"photo{suffix}", orientation, **({"quality": 95} if suffix == ".jpg" else {}))
    image = load_image(path)
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    # Orientations 5-8 turn the stored 50 x 30 (W x H) image by a quarter turn.
    expected_hw = (50, 30) if orientation in (5, 6, 7, 8) else (30, 50)
    assert tuple(image.shape[1:]) == expected_hw == read_image_size(path)
    torch.testing.assert_close(image, _pil_reference(path), rtol=0, atol=0)
    # The data check sees the same size as shown (it used to turn a TIFF's twice).
    problem, stored, tag = check_image(path)
    assert problem is None and shown_size(stored, tag) == expected_hw[::-1]


def test_exif_orientation_6_is_a_clockwise_quarter_turn(tmp_path):
    plain = load_image(_save_jpeg(tmp_path / "plain.jpg", None))
    turned = load_image(_save_jpeg(tmp_path / "turned.jpg", 6))
    # Same JPEG data, only the tag differs: the tagged one is the plain one turned 90 degrees clockwise.
    torch.testing.assert_close(turned, torch.rot90(plain, k=-1, dims=(1, 2)), rtol=0, atol=0)


def test_modes_become_8_bit_rgb(tmp_path):
    grey = np.arange(30 * 50, dtype=np.uint8).reshape(30, 50)
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    got = load_image(tmp_path / "grey.png")
    assert got.shape == (3, 30, 50)
    for channel in got:
        assert channel.tolist() == grey.tolist()

    # RGBA: alpha dropped, the colour stored under transparent pixels kept.
    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[...] = (200, 100, 50, 0)
    rgba[0, 0] = (1, 2, 3, 255)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    got = load_image(tmp_path / "rgba.png")
    assert got[:, 0, 0].tolist() == [1, 2, 3] and got[:, 3, 4].tolist() == [200, 100, 50]

    # 16-bit grey ('I;16'): the high byte.
    values = np.array([[0, 255, 256, 1000], [25700, 32768, 65280, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "sixteen.png")
    assert Image.open(tmp_path / "sixteen.png").mode == "I;16"
    got = load_image(tmp_path / "sixteen.png")
    assert got.dtype == torch.uint8 and got.shape == (3, 2, 4)
    assert got[1].tolist() == (values // 256).tolist() == [[0, 0, 1, 3], [100, 128, 255, 255]]

    # Palette.
    palette = Image.new("P", (5, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 128] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    assert load_image(tmp_path / "palette.png")[:, 2, 3].tolist() == [255, 0, 128]

    # CMYK JPEG: pure red ink mix (C=0, M=Y=255, K=0) reads as red.
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    got = load_image(tmp_path / "cmyk.jpg")
    assert got.shape == (3, 10, 20)
    torch.testing.assert_close(got[:, 5, 10].int(), torch.tensor([255, 0, 0], dtype=torch.int32), rtol=0, atol=2)

    # Formats torchvision.io does not decode go through PIL.
    Image.fromarray(_pattern()).save(tmp_path / "picture.bmp")
    Image.fromarray(_pattern()).convert("P").save(tmp_path / "picture.gif")
    for name in ("picture.bmp", "picture.gif"):
        torch.testing.assert_close(load_image(tmp_path / name), _pil_reference(tmp_path / name), rtol=0, atol=0)
    assert load_image(tmp_path / "picture.bmp").tolist() == torch.from_numpy(_pattern()).permute(2, 0, 1).tolist()

    names = ("grey.png", "rgba.png", "sixteen.png", "palette.png", "cmyk.jpg", "picture.bmp", "picture.gif")
    for name in names:
        assert read_image_size(tmp_path / name) == tuple(load_image(tmp_path / name).shape[1:]), name


def test_bad_files_raise_dataset_error_naming_the_file(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(good)
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:300])
    full_jpeg = _save_jpeg(tmp_path / "full.jpg", None)
    (tmp_path / "truncated.jpg").write_bytes(full_jpeg.read_bytes()[:400])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("this is not an image")
    good_bmp = tmp_path / "good.bmp"
    Image.fromarray(_pattern()).save(good_bmp)
    (tmp_path / "truncated.bmp").write_bytes(good_bmp.read_bytes()[:1000])

    for name in ("truncated.png", "truncated.jpg", "truncated.bmp", "empty.jpg", "notes.jpg"):
        with pytest.raises(DatasetError, match=rf"{name}: cannot read image: \S"):
            load_image(tmp_path / name)
    with pytest.raises(DatasetError, match=r"empty\.jpg: cannot read image: the file is empty"):
        load_image(tmp_path / "empty.jpg")
    with pytest.raises(DatasetError, match=r"truncated\.jpg: cannot read image: .*truncated"):
        load_image(tmp_path / "truncated.jpg")
    with pytest.raises(DatasetError, match=r"missing\.jpg: image file not found"):
        load_image(tmp_path / "missing.jpg")

    # The header alone: a truncated body still has its size; the rest fail, naming the file.
    assert read_image_size(tmp_path / "truncated.png") == read_image_size(tmp_path / "truncated.bmp") == (30, 50)
    for name in ("empty.jpg", "notes.jpg"):
        with pytest.raises(DatasetError, match=rf"{name}: cannot read image header"):
            read_image_size(tmp_path / name)
    with pytest.raises(DatasetError, match=r"missing\.jpg: image file not found"):
        read_image_size(tmp_path / "missing.jpg")


def test_raccoon_images_header_size_and_pixels_match_pil():
    # Real photographs, the grey ones included; pixels as PIL decodes them (the same libjpeg).
    names = ["raccoon-1.jpg", "raccoon-152.jpg"] + sorted(p.name for p in (RACCOON / "images").glob("*.jpg"))[:6]
    for name in names:
        path = RACCOON / "images" / name
        image = load_image(path)
        assert tuple(image.shape[1:]) == read_image_size(path), name
        torch.testing.assert_close(image, _pil_reference(path), rtol=0, atol=0)
