"""The post JPEG: aspect fitted by padding (never a crop), upright, RGB, within 8 MiB."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from persona_pipeline.domain.media import (MAX_ASPECT, MAX_MEDIA_BYTES, MIN_ASPECT, MediaError, check_post_jpeg,
                                           export_post_jpeg, fit_aspect)


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("size, fitted", [
    ((1000, 1000), (1000, 1000)),
    ((800, 1000), (800, 1000)),     # exactly 4:5
    ((799, 1000), (800, 1000)),
    ((1, 1000), (800, 1000)),
    ((1080, 1351), (1081, 1351)),   # ceil, so 4:5 is reached, not missed by rounding
    ((1910, 1000), (1910, 1000)),   # exactly 1.91
    ((1911, 1000), (1911, 1001)),
    ((4000, 100), (4000, 2095)),
])
def test_fit_aspect(size, fitted):
    assert fit_aspect(*size) == fitted


def test_fit_aspect_always_lands_in_range_and_only_grows():
    rng = random.Random(3)
    for _ in range(5000):
        width, height = rng.randint(1, 9000), rng.randint(1, 9000)
        new_w, new_h = fit_aspect(width, height)
        assert new_w >= width and new_h >= height
        assert MIN_ASPECT <= new_w / new_h <= MAX_ASPECT, (width, height, new_w, new_h)
        assert (new_w, new_h) == (width, height) or new_w == width or new_h == height


def test_fit_aspect_rejects_empty_sizes():
    with pytest.raises(ValueError, match="0x5"):
        fit_aspect(0, 5)


def test_tall_image_is_padded_not_cropped(tmp_path):
    source = tmp_path / "tall.png"
    Image.new("RGB", (400, 1000), (200, 0, 0)).save(source)
    image = _open(export_post_jpeg(source))
    assert image.format == "JPEG" and image.mode == "RGB" and image.size == (800, 1000)
    pixels = np.asarray(image).astype(int)
    assert (pixels[:, 220:580] - (200, 0, 0)).__abs__().max() < 12  # the whole picture, full height
    assert pixels[:, :180].min() > 240 and pixels[:, -180:].min() > 240  # white bands either side


def test_wide_image_is_padded_top_and_bottom_and_scaled(tmp_path):
    source = tmp_path / "wide.jpg"
    Image.new("RGB", (3000, 1000), (0, 0, 200)).save(source, quality=95)
    image = _open(export_post_jpeg(source))
    assert image.width == 1440 and MIN_ASPECT <= image.width / image.height <= MAX_ASPECT
    pixels = np.asarray(image).astype(int)
    assert pixels[:30].min() > 240 and pixels[-30:].min() > 240
    assert abs(pixels[image.height // 2, :, 2] - 200).max() < 12  # the picture's full width survives


def test_transparency_is_flattened_on_white(tmp_path):
    source = tmp_path / "alpha.png"
    image = Image.new("RGBA", (500, 500), (0, 0, 0, 0))
    image.paste((0, 150, 0, 255), (200, 200, 300, 300))
    image.save(source)
    result = np.asarray(_open(export_post_jpeg(source))).astype(int)
    assert result[10, 10].min() > 245  # transparent -> white, not black
    assert abs(result[250, 250] - (0, 150, 0)).max() < 12


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (600, 300), (220, 0, 0))
    stored.paste((0, 0, 220), (300, 0, 600, 300))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise
    source = tmp_path / "rotated.jpg"
    stored.save(source, quality=95, exif=exif)
    image = _open(export_post_jpeg(source))
    # Upright it is 300x600 (1:2), padded to 4:5; the orientation tag is gone with the EXIF.
    assert image.size == (480, 600) and not image.getexif().get(0x0112)
    pixels = np.asarray(image).astype(int)
    assert pixels[100, 240, 0] > 180 and pixels[500, 240, 2] > 180  # red on top, blue below


def test_sixteen_bit_greyscale_keeps_its_tones(tmp_path):
    source = tmp_path / "grey16.png"
    ramp = np.tile(np.linspace(0, 65535, 500).astype(np.uint16), (500, 1))
    Image.fromarray(ramp).save(source)
    pixels = np.asarray(_open(export_post_jpeg(source))).astype(int)
    assert pixels[250, 5].max() < 20 and pixels[250, 495].min() > 235


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\xff\xd8\xff\xe0" + b"\x00" * 50])
def test_unreadable_source_is_a_media_error_naming_it(tmp_path, content):
    source = tmp_path / "broken.jpg"
    source.write_bytes(content)
    with pytest.raises(MediaError, match="broken.jpg"):
        export_post_jpeg(source)


def test_missing_source_is_a_media_error(tmp_path):
    with pytest.raises(MediaError, match="nowhere.png"):
        export_post_jpeg(tmp_path / "nowhere.png")


@pytest.fixture(scope="module")
def noise_png(tmp_path_factory):
    """6000x4000 random noise: the worst case for JPEG (nothing to compress)."""
    path = tmp_path_factory.mktemp("noise") / "noise.png"
    pixels = np.random.default_rng(11).integers(0, 256, (4000, 6000, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, compress_level=0)
    return path


@pytest.mark.slow
def test_large_noise_at_full_size_fits_in_8_mib(noise_png):
    data = export_post_jpeg(noise_png, max_side=6000)
    image = _open(data)
    assert len(data) <= MAX_MEDIA_BYTES and image.format == "JPEG"
    assert image.width < 6000  # quality alone could not do it: it was scaled down
    assert abs(image.width / image.height - 1.5) < 0.01
    assert check_post_jpeg(data) == []


def test_large_noise_default_export(noise_png):
    data = export_post_jpeg(noise_png)
    image = _open(data)
    assert image.size == (1440, 960) and len(data) <= MAX_MEDIA_BYTES and check_post_jpeg(data) == []


def test_small_byte_budget_steps_quality_then_scales(tmp_path):
    source = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)).save(source)
    sizes = {}
    for quality in (92, 60):
        buffer = io.BytesIO()
        Image.open(source).convert("RGB").save(buffer, format="JPEG", quality=quality, optimize=True)
        sizes[quality] = len(buffer.getvalue())
    budget = (sizes[92] + sizes[60]) // 2
    data = export_post_jpeg(source, max_bytes=budget)
    assert len(data) <= budget and _open(data).size == (1200, 1200)  # a lower quality was enough
    data = export_post_jpeg(source, max_bytes=150_000)
    image = _open(data)
    assert len(data) <= 150_000 and image.width < 1200 and image.width == image.height
    with pytest.raises(MediaError, match="noise.png.*more than 1000"):
        export_post_jpeg(source, max_bytes=1000)


def test_check_post_jpeg_names_each_problem(tmp_path):
    good = io.BytesIO()
    Image.new("RGB", (1080, 1080), (1, 2, 3)).save(good, format="JPEG")
    assert check_post_jpeg(good.getvalue()) == []
    png = io.BytesIO()
    Image.new("RGB", (1080, 1080)).save(png, format="PNG")
    assert check_post_jpeg(png.getvalue()) == ["PNG image, Instagram takes JPEG only"]
    tall = io.BytesIO()
    Image.new("RGB", (500, 1000)).save(tall, format="JPEG")
    problems = check_post_jpeg(tall.getvalue())
    assert len(problems) == 1 and "aspect ratio 500x1000" in problems[0]
    big = check_post_jpeg(good.getvalue(), max_bytes=100)
    assert len(big) == 1 and "more than 100" in big[0]
    assert check_post_jpeg(b"garbage") == ["not an image PIL can read (Instagram takes JPEG only)"]


def test_a_thumbnail_is_a_small_upright_jpeg_of_the_same_aspect(tmp_path):
    from persona_pipeline.domain.media import THUMB_SIDE, thumbnail_jpeg

    source = tmp_path / "big.jpg"
    Image.new("RGB", (1080, 1350), (200, 40, 40)).save(source, quality=90)
    with Image.open(io.BytesIO(thumbnail_jpeg(source))) as thumb:
        assert (thumb.format, thumb.size) == ("JPEG", (96, THUMB_SIDE))
    with pytest.raises(MediaError, match="cannot read the image"):
        thumbnail_jpeg(tmp_path / "missing.jpg")
