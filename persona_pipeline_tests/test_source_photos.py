"""source_photos on a corpus of bad photos: each gets the right outcome and none stops the run."""

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select

from persona_pipeline.assets.source_photos import source_photos
from persona_pipeline.db import models
from persona_pipeline.db.session import session_scope
from persona_pipeline_tests.conftest import make_settings, materialise_persona, write_persona


def _png(size, color=(200, 40, 40), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _bad_corpus(photos):
    good = sorted(photos.glob("*.jpg"))[0]
    (photos / "zero.jpg").write_bytes(b"")
    (photos / "truncated.png").write_bytes(_png((400, 400))[:200])
    (photos / "notes.jpg").write_text("this is a text file, not a photo\n")
    (photos / "tiny.png").write_bytes(_png((16, 16)))
    shutil.copy(good, photos / "zz_duplicate.jpg")
    cmyk = io.BytesIO()
    Image.new("CMYK", (400, 320), (0, 255, 255, 0)).save(cmyk, format="JPEG")
    (photos / "cmyk.jpg").write_bytes(cmyk.getvalue())
    rotated = Image.new("RGB", (400, 300), (10, 120, 200))
    rotated.paste((250, 250, 0), (0, 0, 50, 50))  # a marker in the top-left corner
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    buffer = io.BytesIO()
    rotated.save(buffer, format="JPEG", exif=exif)
    (photos / "rotated.jpg").write_bytes(buffer.getvalue())
    return good.name


@pytest.fixture
def ingested(tmp_path, db_url):
    settings = make_settings(tmp_path, db_url)
    folder = write_persona(settings.datasets_dir, "tester", photos=10)
    original = _bad_corpus(folder / "photos")
    result, _ = materialise_persona([source_photos], settings, folder)
    with session_scope(db_url) as session:
        rows = {r.original_name: r for r in session.scalars(select(models.SourcePhoto))}
        session.expunge_all()
    return result, rows, original, settings


def test_each_bad_photo_gets_the_right_outcome(ingested):
    result, rows, original, _ = ingested
    assert result.success
    expect_quarantined = {
        "zero.jpg": "empty file",
        "truncated.png": "corrupt image",
        "notes.jpg": "not an image",
        "tiny.png": "too small: 16x16",
        "zz_duplicate.jpg": f"duplicate of {original}",
    }
    for name, reason in expect_quarantined.items():
        assert rows[name].status == "quarantined", name
        assert reason in rows[name].reason, (name, rows[name].reason)
    for name in ("cmyk.jpg", "rotated.jpg"):
        assert rows[name].status == "accepted", (name, rows[name].reason)


def test_normalised_photos_are_rgb_and_upright(ingested):
    _, rows, _, settings = ingested
    with Image.open(rows["cmyk.jpg"].path) as image:
        assert image.mode == "RGB" and image.format == "PNG"
        assert image.getpixel((200, 160))[0] > 200  # cyan+yellow ink... converted, not refused
    with Image.open(rows["rotated.jpg"].path) as image:
        assert image.size == (300, 400)  # EXIF orientation 6 applied
        assert image.getpixel((280, 10))[2] < 100  # the top-left marker is now top-right
    quarantine = settings.home / "personas" / "tester" / "photos" / "quarantine"
    assert (quarantine / "reasons.json").is_file() and (quarantine / "zero.jpg").exists()


def test_enough_photos_check_reports_usable_count(ingested):
    result, rows, _, _ = ingested
    (check,) = result.get_asset_check_evaluations()
    usable = sum(1 for r in rows.values() if r.status == "accepted")
    assert usable == 12  # the 10 demo photos + the CMYK and the rotated ones; the duplicate is extra
    assert check.passed and check.metadata["usable"].value == usable


def test_too_few_photos_fail_the_blocking_check(tmp_path, db_url):
    settings = make_settings(tmp_path, db_url)
    folder = write_persona(settings.datasets_dir, "few", photos=3)
    result, _ = materialise_persona([source_photos], settings, folder, raise_on_error=False)
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed
    assert "3 usable photos" in check.description and "min_photos is 10" in check.description


# --------------------------------------------------------------------------- 16-bit and float images


def _grey16_png(value: int, size=(320, 320)) -> bytes:
    """A real 16-bit greyscale PNG file (PNG bit depth 16, colour type 0)."""
    buffer = io.BytesIO()
    Image.new("I;16", size, value).save(buffer, format="PNG")
    assert buffer.getvalue()[24:26] == b"\x10\x00"  # IHDR: bit depth 16, greyscale
    return buffer.getvalue()


def _rgb16_png(rgb: tuple[int, int, int], size=(320, 320), alpha: int | None = None) -> bytes:
    """A real 48-bit RGB (or 64-bit RGBA) PNG, written by hand: Pillow cannot write one."""
    import struct
    import zlib

    channels = rgb + ((alpha,) if alpha is not None else ())
    row = b"\x00" + struct.pack(f">{len(channels)}H", *channels) * size[0]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", size[0], size[1], 16, 6 if alpha is not None else 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row * size[1]))
            + chunk(b"IEND", b""))


def _close(pixel, expected, tolerance=1):
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected)), (pixel, expected)


def _tiff(image: Image.Image) -> bytes:
    """The image as a real TIFF file: TIFF keeps I;16, I;16B, I (32-bit integer) and F (float)."""
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF")
    with Image.open(io.BytesIO(buffer.getvalue())) as check:
        assert check.mode == (image.mode if image.mode != "I;16L" else "I;16")
    return buffer.getvalue()


def _inspected(data: bytes) -> Image.Image:
    from persona_pipeline.domain.photos import AcceptedPhoto, inspect_photo

    outcome = inspect_photo(data, min_side=8, max_side=1024)
    assert isinstance(outcome, AcceptedPhoto), outcome
    image = Image.open(io.BytesIO(outcome.png))
    assert image.mode == "RGB"
    return image


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_a_16_bit_value_keeps_its_grey(mode):
    """30000 of 65535 is grey 117 of 255, not white (a plain convert clips it to 255)."""
    pixel = _inspected(_tiff(Image.new(mode, (8, 8), 30000))).getpixel((0, 0))
    ok, detail = _close(pixel, (117, 117, 117))
    assert ok, detail


def test_a_32_bit_integer_image_beyond_16_bits_is_scaled_by_its_range():
    image = Image.new("I", (8, 8), 100_000)
    image.paste(300_000, (4, 0, 8, 8))  # right half at the top of the range
    rgb = _inspected(_tiff(image))
    assert rgb.getpixel((0, 0)) == (0, 0, 0) and rgb.getpixel((7, 0)) == (255, 255, 255)


def test_a_float_image_is_scaled_by_0_to_1_or_its_range():
    unit = _inspected(_tiff(Image.new("F", (8, 8), 30000 / 65535))).getpixel((0, 0))
    ok, detail = _close(unit, (117, 117, 117))
    assert ok, detail  # a plain convert truncates 0.46 to 0: black
    wide = Image.new("F", (8, 8), -2.0)
    wide.paste(6.0, (4, 0, 8, 8))
    wide.paste(2.0, (0, 4, 4, 8))
    rgb = _inspected(_tiff(wide))
    assert rgb.getpixel((0, 0)) == (0, 0, 0) and rgb.getpixel((7, 0)) == (255, 255, 255)
    ok, detail = _close(rgb.getpixel((0, 7)), (128, 128, 128))
    assert ok, detail


def test_16_bit_png_files_decode_to_their_grey_and_colour():
    for data, expected in ((_grey16_png(30000), (117, 117, 117)),
                           (_rgb16_png((30000, 10000, 60000)), (117, 39, 233)),
                           (_rgb16_png((30000, 10000, 60000), alpha=65535), (117, 39, 233))):
        ok, detail = _close(_inspected(data).getpixel((5, 5)), expected)
        assert ok, detail


def test_two_different_16_bit_photos_are_not_duplicates(tmp_path, db_url):
    """Through source_photos: two 16-bit greys (30000 and 20000) were both white, so the second was
    quarantined as a duplicate of the first."""
    settings = make_settings(tmp_path, db_url)
    folder = write_persona(settings.datasets_dir, "grey", photos=10)
    (folder / "photos" / "grey16-a.png").write_bytes(_grey16_png(30000))
    (folder / "photos" / "grey16-b.png").write_bytes(_grey16_png(20000))
    (folder / "photos" / "rgb16.png").write_bytes(_rgb16_png((30000, 10000, 60000)))
    result, _ = materialise_persona([source_photos], settings, folder)
    assert result.success
    with session_scope(db_url) as session:
        rows = {r.original_name: r for r in session.scalars(select(models.SourcePhoto))}
        session.expunge_all()
    for name, grey in (("grey16-a.png", 117), ("grey16-b.png", 78)):
        assert rows[name].status == "accepted", (name, rows[name].reason)
        with Image.open(rows[name].path) as image:
            ok, detail = _close(image.getpixel((10, 10)), (grey, grey, grey))
            assert ok, (name, detail)
    assert rows["rgb16.png"].status == "accepted", rows["rgb16.png"].reason


# --------------------------------------------------------------------------- symbolic links


def _tree_holds(folder, secret: bytes) -> list[str]:
    """Files under `folder` (links not followed) whose bytes contain `secret`."""
    return [str(p) for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and secret in p.read_bytes()]


def test_links_in_photos_are_quarantined_as_links_and_never_read(tmp_path, db_url):
    """link.jpg -> /etc/passwd was quarantined as "not an image" with a byte copy of /etc/passwd
    in quarantine/; a link to an outside JPEG was accepted as a photo. Each link (to a file outside
    or inside, to a folder, dangling) is now quarantined as a link, naming it, and nothing of its
    target reaches the quarantine, the normalised photos or the database."""
    settings = make_settings(tmp_path, db_url)
    folder = write_persona(settings.datasets_dir, "linked", photos=10)
    photos = folder / "photos"
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = b"root:x:0:0:SECRET-" + b"7f3a" * 8 + b"\n"
    (outside / "passwd").write_bytes(secret)
    portrait = Image.new("RGB", (400, 400), (12, 34, 56))
    portrait.save(outside / "portrait.jpg", quality=95)
    (photos / "link.jpg").symlink_to(outside / "passwd")
    (photos / "etc.jpg").symlink_to("/etc/passwd")
    (photos / "outside-photo.jpg").symlink_to(outside / "portrait.jpg")
    (photos / "inside-copy.jpg").symlink_to(sorted(photos.glob("*.jpg"))[0])
    (photos / "folder.jpg").symlink_to(outside, target_is_directory=True)
    (photos / "dangling.jpg").symlink_to(outside / "missing.jpg")
    (photos / "caption-link.txt").symlink_to(outside / "passwd")
    links = ["link.jpg", "etc.jpg", "outside-photo.jpg", "inside-copy.jpg", "folder.jpg", "dangling.jpg", "caption-link.txt"]

    result, _ = materialise_persona([source_photos], settings, folder)
    assert result.success
    with session_scope(db_url) as session:
        rows = {r.original_name: r for r in session.scalars(select(models.SourcePhoto))}
        session.expunge_all()
    assert _tree_holds(settings.home, secret) == []  # no copy of a target anywhere under PERSONA_HOME
    assert _tree_holds(settings.home, Path("/etc/passwd").read_bytes()[:64]) == []
    quarantine = settings.home / "personas" / "linked" / "photos" / "quarantine"
    assert sorted(p.name for p in quarantine.iterdir()) == ["reasons.json"]
    for name in links:
        assert rows[name].status == "quarantined", (name, rows.get(name))
        assert f"{name} is a symbolic link" in rows[name].reason, (name, rows[name].reason)
        assert rows[name].path is None and rows[name].sha256 == ""
    assert sum(1 for r in rows.values() if r.status == "accepted") == 10  # the real photos only
    reasons = json.loads((quarantine / "reasons.json").read_text())
    assert set(reasons) == set(links)
    assert all((photos / name).is_symlink() for name in links)  # the user's links are left as they were


def test_a_linked_photos_folder_is_refused_by_name(tmp_path, db_url):
    """photos/ itself as a link to a folder elsewhere: nothing in it is read."""
    settings = make_settings(tmp_path, db_url)
    folder = write_persona(settings.datasets_dir, "elsewhere", photos=10)
    moved = tmp_path / "real-photos"
    shutil.move(folder / "photos", moved)
    (folder / "photos").symlink_to(moved, target_is_directory=True)
    result, _ = materialise_persona([source_photos], settings, folder, raise_on_error=False)
    with session_scope(db_url) as session:
        rows = {r.original_name: (r.status, r.reason) for r in session.scalars(select(models.SourcePhoto))}
    assert list(rows) == ["photos"], rows
    assert rows["photos"][0] == "quarantined" and "photos is a symbolic link" in rows["photos"][1]
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed and "0 usable photos" in check.description
