"""source_photos on a corpus of bad photos: each gets the right outcome and none stops the run."""

import io
import shutil

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
