"""The world's attribute classifier: the committed weights read every head right on fresh held-out
world images (>= 95 %) and read the demo persona on its photos; a missing, corrupt or mismatched
weight file is refused by name with the command that rebuilds it; and the training command learns."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from PIL import Image

from persona_pipeline.cli import main
from persona_pipeline.demo_photos import demo_shots
from persona_pipeline.world.attributes import DEMO_PERSONA
from persona_pipeline.fileio import sha256_file
from persona_pipeline.world.classifier import HEADS, accuracy, load_classifier
from persona_pipeline.world.model_manifest import WorldWeightsError
from persona_pipeline.world.classifier_config import MANIFEST_FILE, REBUILD_COMMAND, WEIGHTS_DIR, WEIGHTS_FILE
from persona_pipeline.world.dataset import samples_digest, world_samples

from .conftest import DEMO

FRESH = 500  # held-out images no manifest figure was measured on (they start after the manifest's)


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def test_committed_weights_read_every_head_of_fresh_held_out_images(classifier):
    manifest = classifier.manifest
    samples = list(world_samples(FRESH, manifest["seed"], "heldout", start=manifest["heldout_count"]))
    measured = accuracy(classifier.predict([s.image for s in samples]), [s.labels for s in samples])
    print(f"held-out accuracy on {FRESH} fresh images: {measured}")
    assert set(measured) == set(HEADS)
    assert all(value >= 0.95 for value in measured.values()), measured
    assert all(value >= 0.95 for value in manifest["heldout_accuracy"].values()), manifest["heldout_accuracy"]


def test_committed_weights_are_small_and_were_trained_on_what_the_renderer_draws_today(classifier):
    manifest = classifier.manifest
    assert (WEIGHTS_DIR / WEIGHTS_FILE).stat().st_size <= 2_000_000
    assert manifest["command"].startswith(REBUILD_COMMAND + " --seed ")
    for key in ("seed", "steps", "train_count", "train_data_sha256", "heldout_accuracy", "weights_sha256"):
        assert key in manifest, key
    # a renderer changed since training would make these weights measure a world they never saw
    assert samples_digest(world_samples(manifest["probe_count"], manifest["seed"], "train")) == manifest["probe_sha256"]


def test_the_classifier_reads_the_demo_persona_on_its_photos(classifier):
    photos = sorted((DEMO / "photos").glob("*.jpg"))
    images = []
    for path in photos:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    predicted = classifier.predict(images)
    look = {"hair_colour": DEMO_PERSONA.hair_colour, "hair_style": DEMO_PERSONA.hair_style,
            "jacket_colour": DEMO_PERSONA.jacket_colour, "scarf_colour": DEMO_PERSONA.scarf_colour}
    wrong = [(path.name, p) for path, p in zip(photos, predicted) if {k: p[k] for k in look} != look]
    assert len(wrong) <= 1, wrong
    scenes = [p["scene"] for p in predicted]
    assert sum(s == shot.scene for s, shot in zip(scenes, demo_shots(len(photos)))) >= len(photos) - 1, scenes


@pytest.fixture
def weights_copy(tmp_path):
    folder = tmp_path / "weights"
    shutil.copytree(WEIGHTS_DIR, folder)
    return folder


def test_a_missing_weight_file_names_the_file_and_the_command(weights_copy):
    (weights_copy / WEIGHTS_FILE).unlink()
    with pytest.raises(WorldWeightsError) as error:
        load_classifier(weights_copy)
    assert f"{weights_copy / WEIGHTS_FILE} is missing" in str(error.value) and f"`{REBUILD_COMMAND}`" in str(error.value)


def test_a_corrupt_weight_file_names_the_file_and_the_command(weights_copy):
    weights = weights_copy / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])
    manifest = json.loads((weights_copy / MANIFEST_FILE).read_text())
    manifest["weights_sha256"] = sha256_file(weights)  # the manifest agrees: only the file is broken
    (weights_copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(WorldWeightsError) as error:
        load_classifier(weights_copy)
    assert f"{weights} is corrupt" in str(error.value) and f"`{REBUILD_COMMAND}`" in str(error.value)


def test_a_manifest_whose_hash_does_not_match_is_refused_naming_both_hashes(weights_copy):
    weights = weights_copy / WEIGHTS_FILE
    expected = json.loads((weights_copy / MANIFEST_FILE).read_text())["weights_sha256"]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one bit pattern in the last tensor: still loadable, but not the trained weights
    weights.write_bytes(bytes(data))
    with pytest.raises(WorldWeightsError) as error:
        load_classifier(weights_copy)
    message = str(error.value)
    assert expected in message and sha256_file(weights) in message and "refused" in message


def test_a_manifest_of_another_vocabulary_is_refused(weights_copy):
    manifest = json.loads((weights_copy / MANIFEST_FILE).read_text())
    manifest["heads"]["scene"] = manifest["heads"]["scene"][:-1]
    (weights_copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(WorldWeightsError, match="other classes than the world's vocabulary"):
        load_classifier(weights_copy)


STEP = re.compile(r"^step (\d+)/(\d+)  loss ([0-9.]+)", re.MULTILINE)


def train(out, capsys) -> list[float]:
    args = ["world", "train-classifier", "--out", str(out), "--steps", "40", "--batch-size", "32",
            "--train-count", "320", "--heldout-count", "64", "--seed", "5"]
    assert main(args) == 0
    losses = [float(m.group(3)) for m in STEP.finditer(capsys.readouterr().out)]
    assert len(losses) == 10  # progress shown every tenth of the run
    return losses


@pytest.mark.slow  # trains the classifier (6.6 s alone)
def test_train_classifier_learns_is_deterministic_and_writes_loadable_weights(tmp_path, capsys):
    losses = train(tmp_path / "a", capsys)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    trained = load_classifier(tmp_path / "a")
    assert trained.manifest["steps"] == 40 and set(trained.manifest["heldout_accuracy"]) == set(HEADS)
    assert train(tmp_path / "b", capsys) == losses
    assert sha256_file(tmp_path / "a" / WEIGHTS_FILE) == sha256_file(tmp_path / "b" / WEIGHTS_FILE)
