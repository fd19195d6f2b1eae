"""The procedural world: the same seed draws the same bytes, every scene looks like itself, captions
are the training set's captions, and the demo persona's look and trigger never reach the base set."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys

import numpy as np
import pytest

from persona_pipeline.cli import main
from persona_pipeline.demo_photos import demo_shots
from persona_pipeline.domain.captions import training_caption
from persona_pipeline.domain.training_captions import find_identity_terms
from persona_pipeline.world.attributes import (
    DEMO_PERSONA, DEMO_TRIGGER, HAIR_COLOURS, HAIR_STYLES, JACKET_COLOURS, SCARF_CHOICES, SCENES, Character, Shot,
    is_demo_persona, sample_character,
)
from persona_pipeline.world.captions import world_caption
from persona_pipeline.world.dataset import world_samples, world_shot
from persona_pipeline.world.render import render_shot

from .conftest import DEMO

SOMEONE = Character(hair_colour="black", hair_style="long", jacket_colour="blue", scarf_colour="white", skin_tone="tan")


def test_the_same_seed_draws_the_same_bytes_and_another_seed_or_split_does_not():
    first = [(s.image.tobytes(), s.caption) for s in world_samples(12, seed=3)]
    again = [(s.image.tobytes(), s.caption) for s in world_samples(12, seed=3)]
    assert first == again
    other_seed = [s.image.tobytes() for s in world_samples(12, seed=4)]
    heldout = [s.image.tobytes() for s in world_samples(12, seed=3, split="heldout")]
    assert not {b for b, _ in first} & (set(other_seed) | set(heldout))
    # any sample can be drawn alone: sample 7 is the same whether the 7 before it were drawn or not
    (alone,) = world_samples(1, seed=3, start=7)
    assert alone.image.tobytes() == first[7][0] and alone.caption == first[7][1]
    with pytest.raises(ValueError, match="split 'test' is not one of train, heldout"):
        world_shot(3, 0, split="test")


def test_every_scene_looks_unlike_every_other():
    """The same character, framing, pose, light and seed in each scene: every pair of scenes differs
    by a mean of at least 20 levels per pixel (the character alone is the same in all of them)."""
    images = {scene: np.asarray(render_shot(Shot(SOMEONE, scene, "full-body shot", "arms down", "soft daylight"), 96, seed=5),
                                dtype=np.float32) for scene in SCENES}
    differences = {(a, b): float(np.abs(images[a] - images[b]).mean()) for a, b in itertools.combinations(SCENES, 2)}
    closest = min(differences, key=differences.get)
    assert differences[closest] > 20, (closest, differences[closest])


def test_renders_are_the_size_asked_and_the_light_changes_them():
    shot = Shot(DEMO_PERSONA, "beach", "half-body shot", "waving", "soft daylight")
    assert render_shot(shot, 64).size == (64, 64) and render_shot(shot, 512).size == (512, 512)
    day = np.asarray(render_shot(shot, 96, seed=1), dtype=np.float32).mean()
    dim = np.asarray(render_shot(Shot(**{**shot.__dict__, "lighting": "dim evening light"}), 96, seed=1), dtype=np.float32).mean()
    assert dim < 0.75 * day


class ScriptedRandom(random.Random):
    """choice() answers from a script first: the sampler's rejection can be driven into its corner."""

    def __init__(self, script):
        super().__init__(0)
        self.script = list(script)

    def choice(self, seq):
        return self.script.pop(0) if self.script else super().choice(seq)


def test_the_sampler_rejects_the_demo_persona_and_a_scarf_the_colour_of_its_jacket():
    persona = ["teal", "bob", "yellow", "red", "light", "glasses"]  # skin and accessory do not rescue it
    hidden_scarf = ["black", "short", "green", "green", "deep", "none"]
    fine = ["teal", "bob", "yellow", "blue", "medium", "none"]
    assert sample_character(ScriptedRandom(persona + hidden_scarf + fine)) == Character(*fine)
    assert is_demo_persona(Character(*persona)) and not is_demo_persona(Character(*fine))


def test_the_base_world_never_holds_the_demo_persona_but_holds_each_of_its_values():
    rng = random.Random(11)
    characters = [sample_character(rng) for _ in range(4000)]
    assert not any(is_demo_persona(c) for c in characters)
    assert {c.hair_colour for c in characters} == set(HAIR_COLOURS) and {c.hair_style for c in characters} == set(HAIR_STYLES)
    assert {c.jacket_colour for c in characters} == set(JACKET_COLOURS) and {c.scarf_colour for c in characters} == set(SCARF_CHOICES)
    # three of the four together do occur: only the whole look is kept out
    assert any((c.hair_colour, c.hair_style, c.jacket_colour) == ("teal", "bob", "yellow") for c in characters)
    shots = [world_shot(seed, index)[0] for seed in (0, 1) for index in range(1500)]
    assert not any(is_demo_persona(s.character) for s in shots)
    assert not any(DEMO_TRIGGER in world_caption(s) for s in shots)


def test_captions_are_written_as_training_dataset_writes_them():
    shot = Shot(Character("teal", "long", "yellow", "red", "light", "glasses"), "beach", "half-body shot", "waving",
                "golden hour light")
    assert world_caption(shot) == \
        "woman, half-body shot, waving, teal long hair, yellow jacket, red scarf, glasses, beach, golden hour light"
    persona = world_caption(shot, trigger=DEMO_TRIGGER)
    assert persona == "m1ra woman, half-body shot, waving, beach, golden hour light"
    # training_dataset keeps a sidecar that starts with the trigger as it is, and a persona caption
    # names no identity (the look is what the LoRA binds to the trigger word)
    assert training_caption(DEMO_TRIGGER, persona) == persona and find_identity_terms(persona) == []
    assert world_caption(Shot(SOMEONE, "cafe", "close-up portrait", "arms down", "soft daylight")) == \
        "woman, close-up portrait, arms down, black long hair, blue jacket, white scarf, cafe, soft daylight"
    no_scarf = Character("pink", "bob", "red", "none", "deep", "none")
    assert world_caption(Shot(no_scarf, "market", "full-body shot", "arms raised", "dim evening light")) == \
        "woman, full-body shot, arms raised, pink bob, red jacket, market, dim evening light"


def test_varied_captions_take_the_shapes_prompts_take_and_keep_the_scene():
    import random

    from persona_pipeline.world.captions import PHOTO_PREFIX, varied_caption
    from persona_pipeline.world.dataset import world_shot
    from persona_pipeline.world.train_sd import SdSettings, batch_at

    rng = random.Random(0)
    shots = [world_shot(0, i, "train")[0] for i in range(400)]
    captions = [varied_caption(shot, rng) for shot in shots]
    for shot, caption in zip(shots, captions):
        body = caption.removeprefix(PHOTO_PREFIX)
        assert body.startswith("woman, ") and shot.scene in body.split(", ")
        full = world_caption(shot).split(", ")
        assert all(part in full for part in body.split(", "))  # only parts of the full caption, in its order
        assert [full.index(p) for p in body.split(", ")] == sorted(full.index(p) for p in body.split(", "))
    share = lambda test: sum(map(test, captions)) / len(captions)  # noqa: E731
    assert 0.4 < share(lambda c: c.startswith(PHOTO_PREFIX)) < 0.6
    assert 0.15 < share(lambda c: " jacket" not in c) < 0.35  # the look left out about a quarter of the time
    assert 0.4 < share(lambda c: not any(f in c for f in ("portrait", "shot"))) < 0.6
    again = random.Random(0)
    assert [varied_caption(shot, again) for shot in shots] == captions  # seeded: the same stream, the same captions
    # In training batches: none varied at 0 (the committed first runs), the share asked otherwise,
    # and the same step varies the same way (so a resumed run matches an unbroken one).
    settings = SdSettings(batch_size=64, train_count=1000)
    _, plain = batch_at(settings, 3)
    assert plain == [s.caption for s in world_samples(64, 0, "train", size=64, start=192)]
    _, varied = batch_at(settings, 3, variety=0.5)
    assert 0.25 < sum(a != b for a, b in zip(plain, varied)) / 64 < 0.75
    assert batch_at(settings, 3, variety=0.5)[1] == varied


def test_the_demo_sidecars_are_persona_captions_of_the_demo_shots():
    shots = demo_shots()
    assert {s.scene for s in shots} == set(SCENES) and all(s.character == DEMO_PERSONA for s in shots)
    sidecars = sorted((DEMO / "photos").glob("*.txt"))
    assert [p.stem for p in sidecars] == [f"mira_{i:02d}" for i in range(1, 19, 2)]
    for path in sidecars:
        index = int(path.stem.split("_")[1]) - 1
        assert path.read_text() == world_caption(shots[index], DEMO_TRIGGER) + "\n"


def test_world_data_writes_count_pairs_with_their_captions_and_labels(tmp_path, capsys):
    assert main(["world", "data", "--out", str(tmp_path / "a"), "--count", "6", "--seed", "3"]) == 0
    assert "wrote 6 images" in capsys.readouterr().out
    images = sorted((tmp_path / "a").glob("*.png"))
    assert [p.name for p in images] == [f"{i:05d}.png" for i in range(6)]
    rows = [json.loads(line) for line in (tmp_path / "a" / "labels.jsonl").read_text().splitlines()]
    for path, row, sample in zip(images, rows, world_samples(6, seed=3)):
        assert path.with_suffix(".txt").read_text() == sample.caption + "\n" == row["caption"] + "\n"
        assert row == {"file": path.name, "caption": sample.caption, "labels": sample.labels}
    main(["world", "data", "--out", str(tmp_path / "b"), "--count", "6", "--seed", "3"])
    assert [p.read_bytes() for p in images] == [p.read_bytes() for p in sorted((tmp_path / "b").glob("*.png"))]


def test_world_data_refuses_a_bad_count_in_one_line():
    run = subprocess.run([sys.executable, "-m", "persona_pipeline.cli", "world", "data", "--out", "x", "--count", "0"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "'0' is not a whole number of 1 or more" in run.stderr and "Traceback" not in run.stderr
