"""training_dataset on the tiny models: where each caption comes from (sidecar, edit, stored,
captioner), the kohya folder and dataset.toml, flips and the regularisation set, the quality
checks, and the Gemini captioner over real HTTP against the local fake server."""

from __future__ import annotations

import base64
import json
import tomllib
from pathlib import Path

import pytest
from PIL import Image, ImageEnhance, ImageFilter
from sqlalchemy import func, select

from persona_pipeline.assets.lora_model import lora_model
from persona_pipeline.assets.source_photos import source_photos
from persona_pipeline.assets.training_dataset import training_dataset
from persona_pipeline.db import models
from persona_pipeline.db.session import session_scope
from persona_pipeline.resources import gemini as gemini_module
from persona_pipeline.resources.captioners import ClipCaptioner
from persona_pipeline.resources.diffusion import DiffusionBackend
from persona_pipeline_tests.conftest import make_database, make_settings, materialise_persona, write_persona
from persona_fakes.gemini import GOOD_FIELDS, FakeGemini

PIPELINE = [source_photos, training_dataset]
SUBSET = "10_t3st woman"  # <repeats>_<trigger> <class> with write_persona's defaults
SMALL = {"min_photos": 2, "steps": 1}  # few photos, and a trainer that would stop at once


@pytest.fixture(autouse=True)
def no_gemini_key(monkeypatch):
    """The offline captioner unless a test sets the key itself."""
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)


@pytest.fixture
def clip_calls(monkeypatch) -> list[list[str]]:
    """The photo files of every open_clip captioning batch."""
    calls: list[list[str]] = []
    original = ClipCaptioner.caption_fields

    def recording(self, paths, **kwargs):
        calls.append([str(p) for p in paths])
        return original(self, paths, **kwargs)

    monkeypatch.setattr(ClipCaptioner, "caption_fields", recording)
    return calls


@pytest.fixture
def sqlite_url(tmp_path):
    url, cleanup = make_database("sqlite", tmp_path)
    yield url
    cleanup()


def meta(result) -> dict:
    (materialization,) = result.asset_materializations_for_node("training_dataset")
    return {key: value.value for key, value in materialization.metadata.items()}


def caption_rows(result) -> dict[str, dict]:
    """The metadata table of captions, by source photo name."""
    return {r.data["source_photo"]: r.data for r in meta(result)["captions"].records}


def checks(result) -> dict:
    return {e.check_name: e for e in result.get_asset_check_evaluations() if e.asset_key.path == ["training_dataset"]}


def dataset_dir(result) -> Path:
    return Path(meta(result)["path"])


def read_toml(folder: Path) -> dict:
    with open(folder / "dataset.toml", "rb") as handle:
        return tomllib.load(handle)


def source_paths(settings) -> dict[str, str]:
    """Normalised photo file of each accepted source photo, by original name."""
    with session_scope(settings.database_url) as session:
        return dict(session.execute(select(models.SourcePhoto.original_name, models.SourcePhoto.path)
                                    .where(models.SourcePhoto.status == "accepted")).all())


def stored_captions(settings, kind: str) -> dict[str, tuple[int, str, str]]:
    """(row id, caption, captioner) of each PhotoCaption of `kind`, by original photo name."""
    with session_scope(settings.database_url) as session:
        rows = session.execute(
            select(models.SourcePhoto.original_name, models.PhotoCaption.id, models.PhotoCaption.caption,
                   models.PhotoCaption.captioner)
            .join(models.PhotoCaption, models.PhotoCaption.pixel_sha256 == models.SourcePhoto.pixel_sha256)
            .where(models.PhotoCaption.kind == kind, models.SourcePhoto.status == "accepted")).all()
    return {name: (row_id, caption, captioner) for name, row_id, caption, captioner in rows}


# --- caption sources and the kohya folder -------------------------------------------------------


@pytest.mark.slow
def test_sidecars_win_clip_captions_the_rest_and_the_folder_is_kohya(tmp_path, db_url, clip_calls):
    settings = make_settings(tmp_path, db_url)
    folder = write_persona(settings.datasets_dir, photos=4, training=SMALL)

    result, _ = materialise_persona(PIPELINE, settings, folder)

    assert result.success
    rows = caption_rows(result)
    assert {name: row["source"] for name, row in rows.items()} == {
        "mira_01.jpg": "sidecar", "mira_02.jpg": "clip:world", "mira_03.jpg": "sidecar", "mira_04.jpg": "clip:world"}
    for name in ("mira_01.jpg", "mira_03.jpg"):
        sidecar = (folder / "photos" / name.replace(".jpg", ".txt")).read_text().strip()
        assert rows[name]["caption"] == f"t3st, {sidecar}"
    for name in ("mira_02.jpg", "mira_04.jpg"):
        assert rows[name]["caption"].startswith("t3st woman, ") and len(rows[name]["caption"]) > len("t3st woman, ")
    # One open_clip batch, of exactly the photos without a sidecar.
    paths = source_paths(settings)
    assert clip_calls == [[paths["mira_02.jpg"], paths["mira_04.jpg"]]]
    assert json.loads(meta(result)["caption_sources"]) == {"clip:world": 2, "sidecar": 2}

    out = dataset_dir(result)
    subset = out / SUBSET
    assert sorted(p.name for p in subset.iterdir()) == [f"{i:04d}.{ext}" for i in range(1, 5) for ext in ("png", "txt")]
    for index, name in enumerate(sorted(rows), start=1):
        text = (subset / f"{index:04d}.txt").read_text(encoding="utf-8").strip()
        assert text == rows[name]["caption"] and text.startswith("t3st")
        assert (subset / f"{index:04d}.png").read_bytes() == Path(paths[name]).read_bytes()

    toml = read_toml(out)
    assert toml["general"]["flip_aug"] is True and toml["general"]["caption_extension"] == ".txt"
    (dataset,) = toml["datasets"]
    (subset_config,) = dataset["subsets"]
    assert subset_config["image_dir"] == str(subset) and Path(subset_config["image_dir"]).is_dir()
    assert subset_config["num_repeats"] == 10 and subset_config["class_tokens"] == "t3st woman"
    assert "is_reg" not in subset_config

    recorded = json.loads((out / "metadata.json").read_text())
    assert [i["caption_source"] for i in recorded["images"]] == ["sidecar", "clip:world", "sidecar", "clip:world"]
    assert recorded["version"] == meta(result)["dataset_version"] and recorded["settings"]["flip_aug"] is True
    with session_scope(settings.database_url) as session:
        (row,) = session.scalars(select(models.Dataset)).all()
        assert (row.version, row.path, row.image_count) == (recorded["version"], str(out), 4)
    assert all(checks(result)[name].passed for name in ("captions_start_with_trigger", "image_count_in_range"))


@pytest.mark.slow
def test_caption_edits_survive_rematerialisation_and_generated_captions_are_kept(tmp_path, db_url, clip_calls):
    settings = make_settings(tmp_path, db_url)
    folder = write_persona(settings.datasets_dir, photos=4, training=SMALL)

    first, _ = materialise_persona(PIPELINE, settings, folder)
    generated = stored_captions(settings, "generated")
    assert {name: (caption, captioner) for name, (_, caption, captioner) in generated.items()} == {
        name: (caption_rows(first)[name]["caption"], "clip:world") for name in ("mira_02.jpg", "mira_04.jpg")}
    assert len(clip_calls) == 1

    edited = "t3st woman, edited by hand, red scarf, harbour at dusk"
    (dataset_dir(first) / SUBSET / "0002.txt").write_text(edited + "\n", encoding="utf-8")  # mira_02.jpg
    second, _ = materialise_persona(PIPELINE, settings, folder)

    assert meta(second)["dataset_version"] != meta(first)["dataset_version"]
    assert meta(second)["edits_recorded"] == 1
    rows = caption_rows(second)
    assert (rows["mira_02.jpg"]["caption"], rows["mira_02.jpg"]["source"]) == (edited, "edited")
    assert rows["mira_04.jpg"] == caption_rows(first)["mira_04.jpg"]  # the untouched ones stay
    new_folder = dataset_dir(second)
    assert new_folder != dataset_dir(first)
    assert (new_folder / SUBSET / "0002.txt").read_text(encoding="utf-8").strip() == edited
    recorded = json.loads((new_folder / "metadata.json").read_text())
    assert (recorded["images"][1]["caption"], recorded["images"][1]["caption_source"]) == (edited, "edited")
    assert {name: row[1:] for name, row in stored_captions(settings, "edited").items()} == {"mira_02.jpg": (edited, "person")}
    # Generated captions came from the database: no captioner call, the same rows and text.
    assert len(clip_calls) == 1
    assert stored_captions(settings, "generated") == generated

    third, _ = materialise_persona(PIPELINE, settings, folder)

    assert meta(third)["dataset_version"] == meta(second)["dataset_version"]
    assert dataset_dir(third) == new_folder
    assert (caption_rows(third)["mira_02.jpg"]["caption"], caption_rows(third)["mira_02.jpg"]["source"]) == (edited, "edited")
    assert (new_folder / SUBSET / "0002.txt").read_text(encoding="utf-8").strip() == edited
    assert len(clip_calls) == 1 and stored_captions(settings, "generated") == generated
    with session_scope(settings.database_url) as session:
        assert session.scalar(select(func.count(models.Dataset.id))) == 2


@pytest.mark.slow
def test_reverting_an_edit_leads_back_to_the_old_version_with_its_own_caption_files(tmp_path, sqlite_url):
    settings = make_settings(tmp_path, sqlite_url)
    folder = write_persona(settings.datasets_dir, photos=3, training=SMALL)
    first, _ = materialise_persona(PIPELINE, settings, folder)
    original = caption_rows(first)["mira_02.jpg"]["caption"]
    (dataset_dir(first) / SUBSET / "0002.txt").write_text("t3st woman, edited once\n", encoding="utf-8")
    second, _ = materialise_persona(PIPELINE, settings, folder)
    (dataset_dir(second) / SUBSET / "0002.txt").write_text(original + "\n", encoding="utf-8")  # the newer edit

    third, _ = materialise_persona(PIPELINE, settings, folder)

    # The captions are those of the first version again, so it is reused; its folder, which still
    # held the superseded edit, must say what its version and metadata.json say.
    assert meta(third)["dataset_version"] == meta(first)["dataset_version"]
    out = dataset_dir(third)
    assert caption_rows(third)["mira_02.jpg"]["caption"] == original
    assert (out / SUBSET / "0002.txt").read_text(encoding="utf-8").strip() == original
    assert json.loads((out / "metadata.json").read_text())["images"][1]["caption"] == original

    fourth, _ = materialise_persona(PIPELINE, settings, folder)
    assert meta(fourth)["dataset_version"] == meta(first)["dataset_version"]
    assert (out / SUBSET / "0002.txt").read_text(encoding="utf-8").strip() == original


# --- settings that change the dataset -----------------------------------------------------------


@pytest.mark.slow
def test_flip_augment_off_is_in_the_toml_and_makes_another_version(tmp_path, sqlite_url):
    settings = make_settings(tmp_path, sqlite_url)
    folder = write_persona(settings.datasets_dir, photos=3, training=SMALL)
    flipped, _ = materialise_persona(PIPELINE, settings, folder)

    write_persona(settings.datasets_dir, photos=3, training={**SMALL, "flip_augment": False})
    plain, _ = materialise_persona(PIPELINE, settings, folder)

    assert read_toml(dataset_dir(flipped))["general"]["flip_aug"] is True
    assert read_toml(dataset_dir(plain))["general"]["flip_aug"] is False
    assert meta(plain)["flip_augment"] is False
    assert json.loads((dataset_dir(plain) / "metadata.json").read_text())["settings"]["flip_aug"] is False
    assert meta(plain)["dataset_version"] != meta(flipped)["dataset_version"]
    assert dataset_dir(plain) != dataset_dir(flipped)
    assert caption_rows(plain) == caption_rows(flipped)  # only the setting differs


@pytest.mark.slow
def test_regularisation_set_is_a_reg_subset_generated_once(tmp_path, sqlite_url, monkeypatch):
    settings = make_settings(tmp_path, sqlite_url)
    folder = write_persona(settings.datasets_dir, photos=3, training={**SMALL, "regularization": {"images": 2}})

    first, _ = materialise_persona(PIPELINE, settings, folder)

    out = dataset_dir(first)
    reg = out / "reg" / "1_woman"
    assert sorted(p.name for p in reg.glob("*.png")) == ["reg0000.png", "reg0001.png"]
    assert (reg / "reg0000.txt").read_text().strip() == "photo of a woman"
    assert meta(first)["regularization_images"] == 2
    toml = read_toml(out)
    subsets = toml["datasets"][0]["subsets"]
    assert len(subsets) == 2 and not subsets[0].get("is_reg")
    assert subsets[1] == {"image_dir": str(reg), "class_tokens": "woman", "num_repeats": 1, "is_reg": True}
    resolution = toml["datasets"][0]["resolution"]
    with Image.open(reg / "reg0000.png") as image:
        assert image.size == (resolution, resolution)
    (cache,) = (settings.home / "personas" / "tester" / "regularization").iterdir()
    assert (cache / "done.json").is_file()
    cached = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in cache.iterdir()}
    assert {p.name: p.read_bytes() for p in reg.iterdir()} == {n: b for n, (_, b) in cached.items() if not n.endswith(".json")}

    def no_generation(self, *args, **kwargs):
        raise AssertionError("regularisation images were generated again")

    monkeypatch.setattr(DiffusionBackend, "generate_plain", no_generation)
    second, _ = materialise_persona(PIPELINE, settings, folder)

    assert second.success and meta(second)["regularization_images"] == 2
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in cache.iterdir()} == cached
    assert meta(second)["dataset_version"] == meta(first)["dataset_version"]


# --- quality checks -----------------------------------------------------------------------------


@pytest.mark.slow
def test_caption_without_trigger_fails_the_blocking_check_and_stops_lora_model(tmp_path, sqlite_url):
    settings = make_settings(tmp_path, sqlite_url)
    folder = write_persona(settings.datasets_dir, photos=3, training=SMALL)
    first, _ = materialise_persona(PIPELINE, settings, folder)
    assert checks(first)["captions_start_with_trigger"].passed

    (dataset_dir(first) / SUBSET / "0002.txt").write_text("a woman in a red scarf\n", encoding="utf-8")
    result, _ = materialise_persona([*PIPELINE, lora_model], settings, folder, raise_on_error=False)

    check = checks(result)["captions_start_with_trigger"]
    assert not check.passed and check.severity.value == "ERROR"
    assert "0002.png" in check.description and "t3st" in check.description
    assert "0001.png" not in check.description and "0003.png" not in check.description
    assert checks(result)["image_count_in_range"].passed
    assert not result.success and result.get_failed_step_keys() == {"training_dataset"}
    (failure,) = result.get_step_failure_events()
    assert "captions_start_with_trigger" in failure.event_specific_data.error.message
    # lora_model never started: no step event, no materialisation, no LoRA on disk or in the database.
    assert [e for e in result.all_events if e.step_key == "lora_model" and e.event_type_value == "STEP_START"] == []
    assert result.asset_materializations_for_node("lora_model") == []
    assert not (settings.home / "personas" / "tester" / "loras").exists()
    with session_scope(settings.database_url) as session:
        assert session.scalar(select(func.count(models.LoraModel.id))) == 0


@pytest.fixture(scope="module")
def flawed(tmp_path_factory):
    """One materialisation of a set with too many photos, a near-duplicate pair (one pixel apart,
    so source_photos keeps both) and a blurred, darkened photo."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    tmp = tmp_path_factory.mktemp("flawed")
    url, cleanup = make_database("sqlite", tmp)
    settings = make_settings(tmp, url)
    folder = write_persona(settings.datasets_dir, photos=4, training={
        **SMALL, "max_photos": 5, "quality": {"duplicate_cosine": 0.9999}})
    photos = folder / "photos"
    with Image.open(photos / "mira_02.jpg") as image:
        copy = image.convert("RGB")
    red, green, blue = copy.getpixel((0, 0))
    copy.putpixel((0, 0), ((red + 1) % 256, green, blue))
    copy.save(photos / "mira_02_copy.png")
    with Image.open(photos / "mira_04.jpg") as image:
        dark = ImageEnhance.Brightness(image.convert("RGB").filter(ImageFilter.GaussianBlur(12))).enhance(0.1)
    assert min(dark.size) >= 256  # still above training.min_side: source_photos accepts it
    dark.save(photos / "mira_04_dark.png")
    result, _ = materialise_persona(PIPELINE, settings, folder, raise_on_error=False)
    yield result, {name: row["image"] for name, row in caption_rows(result).items()}
    cleanup()
    monkeypatch.undo()


@pytest.mark.slow
def test_too_many_images_fails_the_image_count_check_naming_the_range(flawed):
    result, images = flawed
    assert len(images) == 6  # both near duplicates and the dark photo were accepted
    check = checks(result)["image_count_in_range"]
    assert not check.passed and check.severity.value == "ERROR"
    assert "6 training images" in check.description and "between 2 and 5" in check.description
    assert not result.success and result.get_failed_step_keys() == {"training_dataset"}


def test_near_duplicates_names_both_files(flawed):
    result, images = flawed
    check = checks(result)["near_duplicates"]
    assert not check.passed
    assert f"{images['mira_02.jpg']} and {images['mira_02_copy.png']} are near duplicates" in check.description
    assert check.metadata["findings"].value == 1  # no other pair of the set


def test_image_quality_names_the_blurry_dark_photo(flawed):
    result, images = flawed
    check = checks(result)["image_quality"]
    dark = images["mira_04_dark.png"]
    assert not check.passed and check.severity.value == "ERROR"
    assert f"{dark}: no detail" in check.description and f"{dark}: mean luma" in check.description
    assert dark in check.metadata["files"].value
    assert f"{images['mira_04.jpg']}: no detail" not in check.description


# --- Gemini through the asset -------------------------------------------------------------------


@pytest.fixture
def gemini(monkeypatch):
    """The fake Gemini server (its key goes in the settings: gemini_settings), and backoff waits
    recorded, not slept."""
    monkeypatch.setattr(gemini_module, "sleep", lambda seconds: None)
    with FakeGemini(api_key="fake-key") as server:
        yield server


def gemini_settings(tmp_path, url, server):
    return make_settings(tmp_path, url, gemini_base_url=server.url, gemini_model="gemini-test-model", gemini_api_key="fake-key")


def requested_photos(server, settings) -> list[str]:
    """The source photo each request carried, by comparing the inline bytes with the normalised files."""
    by_bytes = {Path(path).read_bytes(): name for name, path in source_paths(settings).items()}
    return [by_bytes[base64.urlsafe_b64decode(r.inline_images()[0][1])] for r in server.requests]


@pytest.mark.slow
def test_gemini_captions_the_photos_without_a_sidecar(tmp_path, sqlite_url, gemini, clip_calls):
    settings = gemini_settings(tmp_path, sqlite_url, gemini)
    folder = write_persona(settings.datasets_dir, photos=4, training=SMALL)

    result, resources = materialise_persona(PIPELINE, settings, folder)

    assert resources["gemini"].enabled and clip_calls == []
    assert requested_photos(gemini, settings) == ["mira_02.jpg", "mira_04.jpg"]
    assert {r.model for r in gemini.requests} == {"gemini-test-model"}
    assert {r.headers["x-goog-api-key"] for r in gemini.requests} == {"fake-key"}
    rows = caption_rows(result)
    assert rows["mira_01.jpg"]["source"] == rows["mira_03.jpg"]["source"] == "sidecar"
    for name in ("mira_02.jpg", "mira_04.jpg"):
        assert rows[name]["source"] == "gemini:gemini-test-model"
        assert rows[name]["caption"].startswith("t3st woman, ")
        assert all(value in rows[name]["caption"] for value in GOOD_FIELDS.values())
    assert {name: (caption, captioner) for name, (_, caption, captioner) in stored_captions(settings, "generated").items()} == {
        name: (rows[name]["caption"], "gemini:gemini-test-model") for name in ("mira_02.jpg", "mira_04.jpg")}
    assert (dataset_dir(result) / SUBSET / "0002.txt").read_text().strip() == rows["mira_02.jpg"]["caption"]


@pytest.mark.slow
def test_gemini_failure_midway_keeps_the_captions_made_and_the_rerun_asks_only_for_the_rest(tmp_path, sqlite_url, gemini):
    settings = gemini_settings(tmp_path, sqlite_url, gemini)
    folder = write_persona(settings.datasets_dir, photos=6, training=SMALL)  # mira_02, _04, _06 lack a sidecar
    gemini.reply_text(json.dumps(GOOD_FIELDS))
    for _ in range(50):
        gemini.fail(500, "Internal error encountered.")

    failed, _ = materialise_persona(PIPELINE, settings, folder, raise_on_error=False)

    assert not failed.success and failed.get_failed_step_keys() == {"training_dataset"}
    (failure,) = failed.get_step_failure_events()
    message = failure.event_specific_data.error.message
    assert "mira_04.jpg" in message and "HTTP 500" in message
    assert requested_photos(gemini, settings) == ["mira_02.jpg"] + ["mira_04.jpg"] * 5  # max_retries 4
    saved = stored_captions(settings, "generated")
    assert list(saved) == ["mira_02.jpg"] and saved["mira_02.jpg"][2] == "gemini:gemini-test-model"
    with session_scope(settings.database_url) as session:
        assert session.scalar(select(func.count(models.Dataset.id))) == 0

    gemini.faults.clear()  # the server recovers
    gemini.requests.clear()
    recovered, _ = materialise_persona(PIPELINE, settings, folder)

    assert recovered.success
    assert requested_photos(gemini, settings) == ["mira_04.jpg", "mira_06.jpg"]
    rows = caption_rows(recovered)
    assert {rows[n]["source"] for n in ("mira_02.jpg", "mira_04.jpg", "mira_06.jpg")} == {"gemini:gemini-test-model"}
    assert rows["mira_02.jpg"]["caption"] == saved["mira_02.jpg"][1]
    assert stored_captions(settings, "generated")["mira_02.jpg"] == saved["mira_02.jpg"]  # the same row, kept
    assert len(stored_captions(settings, "generated")) == 3
