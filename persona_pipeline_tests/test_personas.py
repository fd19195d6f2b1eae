"""persona.yaml loading: the demo is valid; a bad file names the file and the field."""

import pytest
import yaml

from persona_pipeline import personas as personas_module
from persona_pipeline.personas import PersonaFileError, PhotoHashCache, discover_personas, load_persona
from persona_pipeline_tests.conftest import DEMO, write_persona


def test_demo_persona_is_valid_and_has_three_pillars_and_enough_photos():
    persona = load_persona(DEMO)
    assert persona.slug == "demo" and persona.config.trigger_word == "m1ra"
    assert len(persona.config.pillars) == 3
    assert 16 <= len([p for p in persona.photo_files() if p.suffix == ".jpg"]) <= 20
    assert persona.config.instagram.token_env == "DEMO_INSTAGRAM_TOKEN"


@pytest.mark.parametrize("change, field, message", [
    ({"timezone": "Mars/Olympus"}, "timezone", "unknown timezone"),
    ({"pillars": [{"name": "a", "weight": 150}]}, "pillars[0].weight", "less than or equal to 100"),
    ({"pillars": [{"name": "a", "weight": 10, "priority": 9}]}, "pillars[0].priority", "less than or equal to 5"),
    ({"posting_windows": ["9-5"]}, "posting_windows", "not 'HH:MM-HH:MM'"),
    ({"posting_windows": ["15:00-10:00"]}, "posting_windows", "ends before it starts"),
    ({"trigger_word": "two words"}, "trigger_word", "pattern"),
    ({"hashtags": {"targets": ["ok", "not ok!"]}}, "hashtags.targets", "letters, digits or underscores"),
    ({"instagram": {"user_id": "1", "token_env": "lower"}}, "instagram.token_env", "pattern"),
    ({"unknown_key": 1}, "unknown_key", "Extra inputs"),
    ({"training": {"min_photos": 0}}, "training.min_photos", "greater than or equal to 1"),
])
def test_bad_fields_are_named_with_the_file(tmp_path, change, field, message):
    folder = write_persona(tmp_path, "bad", photos=0)
    config = yaml.safe_load((folder / "persona.yaml").read_text())
    config.update(change)
    (folder / "persona.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(PersonaFileError) as error:
        load_persona(folder)
    assert str(folder / "persona.yaml") in str(error.value)
    assert f"field '{field}'" in str(error.value) and message in str(error.value)


def test_broken_yaml_and_missing_fields_are_reported(tmp_path):
    folder = write_persona(tmp_path, "broken", photos=0)
    (folder / "persona.yaml").write_text("name: [unclosed\n")
    with pytest.raises(PersonaFileError, match="invalid YAML"):
        load_persona(folder)
    (folder / "persona.yaml").write_text("name: only a name\n")
    with pytest.raises(PersonaFileError, match="field 'trigger_word': Field required"):
        load_persona(folder)


def test_discovery_keeps_good_personas_when_one_is_bad(tmp_path):
    write_persona(tmp_path, "good", photos=0)
    bad = write_persona(tmp_path, "bad", photos=0)
    (bad / "persona.yaml").write_text("- a list\n")
    personas, errors = discover_personas(tmp_path)
    assert [p.slug for p in personas] == ["good"]
    assert "expected a mapping" in errors["bad"]


def test_photo_set_hash_changes_with_content_and_sidecars(tmp_path):
    folder = write_persona(tmp_path, "hashing", photos=2)
    persona = load_persona(folder)
    before = persona.photo_set_hash()
    assert before == persona.photo_set_hash()
    (folder / "photos" / "mira_02.txt").write_text("m1ra, a new caption")
    assert persona.photo_set_hash() != before


def test_the_photo_hash_cache_rereads_only_files_whose_size_or_mtime_changed(tmp_path, monkeypatch):
    import os
    import time

    folder = write_persona(tmp_path, "cached", photos=3)
    persona = load_persona(folder)
    photos = folder / "photos"
    old = time.time() - 600
    for path in photos.iterdir():  # older than the racy window: their hashes may be reused
        os.utime(path, (old, old))
    reads: list[str] = []
    real_read = personas_module.read_regular

    def counting_read(path):
        reads.append(path.name)
        return real_read(path)

    monkeypatch.setattr(personas_module, "read_regular", counting_read)
    cache = PhotoHashCache()
    first = persona.photo_set_hash(cache)
    n_files = len(list(photos.iterdir()))
    assert len(reads) == n_files and first == persona.photo_set_hash()  # the uncached hash agrees
    reads.clear()
    assert persona.photo_set_hash(cache) == first and reads == []  # unchanged set: nothing reread

    # Same size, new bytes, new mtime: reread (only that file), and the hash changes.
    target = sorted(p for p in photos.iterdir() if p.suffix != ".txt")[0]
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, (old + 60, old + 60))
    reads.clear()
    changed = persona.photo_set_hash(cache)
    assert reads == [target.name] and changed != first and changed == persona.photo_set_hash()

    # Same size and the old mtime put back (a tool that keeps times): the ctime still moved, so reread.
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, (old, old))
    reads.clear()
    assert persona.photo_set_hash(cache) == first and reads == [target.name]

    # A file written just now is racy: its hash is not trusted on the next tick, only once it is older.
    fresh = photos / "mira_01.txt"
    fresh.write_text("m1ra, written just now")
    # Its mtime is "now" by the clock the cache reads (time.time_ns), as it is on a real machine; the
    # clock-ahead run moves that clock a year past the filesystem's, so the test says it explicitly.
    now = time.time_ns()
    os.utime(fresh, ns=(now, now))
    reads.clear()
    persona.photo_set_hash(cache)
    persona.photo_set_hash(cache)
    assert reads.count(fresh.name) == 2
    # A removed photo leaves the cache with it.
    target.unlink()
    persona.photo_set_hash(cache)
    assert target.name not in cache._folders[photos]


@pytest.mark.parametrize("step, field", [
    ({"name": "base", "template": "txt2img_lora", "params": {"cfg": 31}}, "generation.steps[0].params.cfg"),
    ({"name": "base", "template": "txt2img_lora", "params": {"sampler": "euler_a"}}, "generation.steps[0].params.sampler"),
    ({"name": "base", "template": "txt2img_lora", "params": {"width": 500}}, "generation.steps[0].params.width"),
    ({"name": "base", "template": "txt2img_lora", "params": {"control_strength": 0.95}},
     "generation.steps[0].params.control_strength"),
    ({"name": "base", "template": "txt2img_lora", "n": 2, "keep": 3}, "generation.steps[0]"),
])
def test_bad_generation_settings_name_the_field(tmp_path, step, field):
    from persona_pipeline_tests.conftest import write_persona

    folder = write_persona(tmp_path, photos=0, generation={"steps": [step]})
    with pytest.raises(PersonaFileError) as error:
        load_persona(folder)
    assert f"field '{field}'" in str(error.value) and "persona.yaml" in str(error.value)


def test_photo_set_hash_and_files_skip_links_and_a_linked_photos_folder(tmp_path):
    """A link in photos/ (or photos/ as a link) is refused by name; the hash holds its name and
    text, not its target's bytes; photo_files lists only regular files."""
    folder = write_persona(tmp_path, "links", photos=2)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.jpg").write_bytes(b"one")
    (folder / "photos" / "link.jpg").symlink_to(outside / "a.jpg")
    persona = load_persona(folder)
    before = persona.photo_set_hash()
    (outside / "a.jpg").write_bytes(b"two")
    assert persona.photo_set_hash() == before
    assert "link.jpg" not in [p.name for p in persona.photo_files()]
    assert [(p.name, "link.jpg is a symbolic link" in why) for p, why in persona.photo_scan().refused] == [("link.jpg", True)]

    linked = write_persona(tmp_path, "linkedphotos", photos=0)
    (linked / "photos").rmdir()
    (linked / "photos").symlink_to(folder / "photos", target_is_directory=True)
    persona = load_persona(linked)
    assert persona.photo_files() == []
    assert [p.name for p, _ in persona.photo_scan().refused] == ["photos"]


def test_a_linked_persona_yaml_is_refused_naming_it_and_not_read(tmp_path):
    """persona.yaml as a link to a file elsewhere: its text would reach the error message (and the
    alert webhook) when it does not parse. Refused by name, the target unread."""
    root = tmp_path / "datasets"
    write_persona(root, "good", photos=0)
    folder = write_persona(root, "linked", photos=0)
    elsewhere = tmp_path / "elsewhere.yaml"
    elsewhere.write_text("SECRET-LINE: [unclosed\n")
    (folder / "persona.yaml").unlink()
    (folder / "persona.yaml").symlink_to(elsewhere)
    personas, errors = discover_personas(root)
    assert [p.slug for p in personas] == ["good"]
    assert "persona.yaml is a symbolic link" in errors["linked"] and "SECRET-LINE" not in errors["linked"]
