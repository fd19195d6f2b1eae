"""Identity without the persona's themes (generation.identity_without_themes): open_clip sees the whole
picture, so a look-alike in the setting of her photos can outscore the persona herself in another
setting. Taking the themes' text directions out of the embeddings compares the person. Run on the
committed world CLIP model and world renders, whose looks and scenes are exact."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from persona_pipeline.identity import ClipIdentity, project_off, reference_for
from persona_pipeline.persona_generation import GenerationSettings


def test_project_off_removes_the_span_of_the_directions_and_normalises_again():
    directions = np.array([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    vectors = np.array([[0.6, 0.0, 0.8, 0.0], [0.0, 0.3, 0.0, 0.4], [2.0, 3.0, 0.0, 0.0]])
    out = project_off(vectors, directions)
    assert out[:2] == pytest.approx(np.array([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]), abs=1e-6)
    assert out[2] == pytest.approx(np.zeros(4), abs=1e-6)  # wholly in the span: nothing left, scores 0
    assert out.dtype == np.float32


def test_the_setting_lists_each_theme_once_and_only_when_it_is_on():
    themes = {"everyday": ["city street", "cafe"], "travel": ["beach", "cafe"]}
    assert GenerationSettings(themes=themes).identity_ignores() == []
    on = GenerationSettings(themes=themes, identity_without_themes=True)
    assert on.identity_ignores() == ["city street", "cafe", "beach"]


@pytest.mark.slow
def test_a_look_alike_in_her_photos_setting_no_longer_outscores_her_in_another(tmp_path):
    from persona_pipeline.resources.clip import ClipModel
    from persona_pipeline.world.attributes import DEMO_PERSONA, SCENES, sample_shot
    from persona_pipeline.world.quality_run import OTHER_CHARACTERS
    from persona_pipeline.world.render import render_shot

    rng = random.Random(3)

    def draw(character, scene: str, count: int, tag: str):
        paths = []
        for index in range(count):
            shot = replace(sample_shot(rng, character), scene=scene, lighting="soft daylight")
            path = tmp_path / f"{tag}-{index}.png"
            render_shot(shot, 64, rng.getrandbits(32)).save(path)
            paths.append(path)
        return paths

    photos = draw(DEMO_PERSONA, "beach", 3, "photo-beach") + draw(DEMO_PERSONA, "city street", 3, "photo-street")
    r3na = dict(OTHER_CHARACTERS)["r3na"]  # her bob and yellow jacket, another hair colour and scarf
    look_alike = draw(r3na, "beach", 8, "r3na-beach")
    her_elsewhere = draw(DEMO_PERSONA, "forest", 8, "her-forest")
    clip = ClipModel(model_name="world")

    def scores(without):
        reference = reference_for(ClipIdentity(clip, without), ClipIdentity(clip, without), photos)
        return np.array(reference.score(her_elsewhere)[0]), np.array(reference.score(look_alike)[0]), reference

    her, other, reference = scores(())
    assert other.mean() > her.mean()  # the whole picture: the beach outweighs the person
    her, other, reference = scores(tuple(SCENES))
    assert her.mean() > other.mean() + 0.1 and np.mean(her[:, None] > other[None, :]) >= 0.9
    assert reference.method == f"clip:{clip.model_id} without {len(SCENES)} theme(s)"
