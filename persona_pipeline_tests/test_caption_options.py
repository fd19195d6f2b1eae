"""kohya's caption options in our LoRA loop (training/kohya_dataset.py `vary_caption`): shuffle_caption,
keep_tokens and caption_tag_dropout_rate, with kohya sd-scripts' meaning; their bounds; persona.yaml and
the dataset.toml that training_dataset writes carry them."""

from __future__ import annotations

import tomllib

import numpy as np
import pytest

from persona_pipeline.training.kohya_dataset import vary_caption
from persona_pipeline.training.params import LoraTrainingParams, TrainingConfigError

CAPTION = "m1ra woman, half-body shot, waving, beach, soft daylight, red bag, city lights, tall hat, rain, smile, dusk"
TAGS = [t.strip() for t in CAPTION.split(",")]


def draws(n: int, seed: int = 0, **options) -> list[str]:
    rng = np.random.default_rng(seed)
    return [vary_caption(CAPTION, rng, **options) for _ in range(n)]


def test_no_option_leaves_the_caption_and_the_random_stream_alone():
    rng = np.random.default_rng(5)
    assert vary_caption(CAPTION, rng, keep_tokens=3) == CAPTION
    assert rng.random() == np.random.default_rng(5).random()  # nothing drawn: a run without options draws as before


def test_the_same_seed_gives_the_same_captions_and_another_seed_others():
    options = {"shuffle": True, "keep_tokens": 1, "dropout": 0.3}
    assert draws(50, seed=3, **options) == draws(50, seed=3, **options)
    assert draws(50, seed=3, **options) != draws(50, seed=4, **options)


@pytest.mark.parametrize("keep", [0, 1, 2, 4])
def test_the_first_keep_tokens_tags_stay_in_place_and_the_others_move(keep):
    captions = draws(300, shuffle=True, keep_tokens=keep, dropout=0.2)
    for caption in captions:
        tags = caption.split(", ")
        assert tags[:keep] == TAGS[:keep]
        assert set(tags[keep:]) <= set(TAGS[keep:])
    moved = [c.split(", ")[keep:] for c in captions]
    assert sum(tags != [t for t in TAGS[keep:] if t in tags] for tags in moved) > 200  # shuffled, not just thinned


def test_shuffle_alone_keeps_every_tag():
    for caption in draws(100, shuffle=True, keep_tokens=1):
        assert sorted(caption.split(", ")) == sorted(TAGS) and caption.startswith("m1ra woman, ")


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_each_tag_after_the_kept_ones_is_dropped_at_about_the_rate(rate):
    captions = draws(2000, dropout=rate, keep_tokens=1)
    flexible = len(TAGS) - 1
    dropped = 1 - sum(len(c.split(", ")) - 1 for c in captions) / (flexible * len(captions))
    assert abs(dropped - rate) < 0.02, dropped
    assert all(c.startswith("m1ra woman") for c in captions)
    # without shuffling the survivors keep their order
    assert all(c.split(", ")[1:] == [t for t in TAGS[1:] if t in c.split(", ")[1:]] for c in captions)
    # each tag is dropped independently: every tag is missing from some captions, present in others
    for tag in TAGS[1:]:
        present = sum(tag in c.split(", ") for c in captions) / len(captions)
        assert abs(present - (1 - rate)) < 0.05, (tag, present)


def test_a_rate_of_one_leaves_only_the_kept_tags():
    assert set(draws(20, dropout=1.0, keep_tokens=2)) == {"m1ra woman, half-body shot"}


@pytest.mark.parametrize("override, words", [
    ({"keep_tokens": -1}, ["training.keep_tokens=-1", "[0, 75]"]),
    ({"keep_tokens": 76}, ["training.keep_tokens=76", "[0, 75]"]),
    ({"caption_tag_dropout_rate": 1.5}, ["training.caption_tag_dropout_rate=1.5", "[0, 1]"]),
    ({"caption_tag_dropout_rate": -0.1}, ["training.caption_tag_dropout_rate=-0.1", "[0, 1]"]),
    ({"trigger_embedding_lr": 0.5}, ["training.trigger_embedding_lr=0.5", "[0, 0.1]"]),
])
def test_out_of_range_caption_options_are_refused_naming_the_setting(override, words):
    with pytest.raises(TrainingConfigError) as error:
        LoraTrainingParams(**override).validate("cpu")
    for word in words:
        assert word in str(error.value)


def test_persona_yaml_sets_the_caption_options_and_the_text_encoder_rate():
    from pydantic import ValidationError

    from persona_pipeline.personas import TrainingOverrides

    overrides = TrainingOverrides(shuffle_caption=True, keep_tokens=2, caption_tag_dropout_rate=0.4,
                                  text_encoder_lr=1e-3).param_overrides()
    assert {k: overrides[k] for k in ("shuffle_caption", "keep_tokens", "caption_tag_dropout_rate", "text_encoder_lr")} == {
        "shuffle_caption": True, "keep_tokens": 2, "caption_tag_dropout_rate": 0.4, "text_encoder_lr": 1e-3}
    with pytest.raises(ValidationError, match="caption_tag_dropout_rate"):
        TrainingOverrides(caption_tag_dropout_rate=2)


def test_the_kohya_dataset_toml_carries_the_same_caption_options():
    from persona_pipeline.assets.training_dataset import kohya_toml

    subsets = [{"image_dir": "/d/10_m1ra woman", "class_tokens": "m1ra woman", "repeats": 10}]
    default = tomllib.loads(kohya_toml(subsets, 64, True))["general"]
    assert (default["shuffle_caption"], default["keep_tokens"]) == (False, 1) and "caption_tag_dropout_rate" not in default
    params = LoraTrainingParams(shuffle_caption=True, keep_tokens=2, caption_tag_dropout_rate=0.25)
    general = tomllib.loads(kohya_toml(subsets, 64, True, params.caption_options()))["general"]
    assert (general["shuffle_caption"], general["keep_tokens"], general["caption_tag_dropout_rate"]) == (True, 2, 0.25)


def test_the_flux_loop_refuses_caption_options_before_loading_anything(tmp_path):
    from persona_pipeline.training.flux_lora import train_flux_lora

    with pytest.raises(TrainingConfigError, match="training.shuffle_caption and caption_tag_dropout_rate"):
        train_flux_lora(str(tmp_path / "no-model"), tmp_path, tmp_path / "out", LoraTrainingParams(caption_tag_dropout_rate=0.3))


def test_pivotal_tuning_needs_one_trigger_word_starting_every_caption(tmp_path):
    from persona_pipeline.training.kohya_dataset import DatasetItem, KohyaDataset, dataset_trigger

    items = [DatasetItem(tmp_path / "a.png", "m1ra woman, beach", 10), DatasetItem(tmp_path / "b.png", "m1ra, cafe", 10),
             DatasetItem(tmp_path / "r.png", "photo of a woman", 1, is_reg=True)]
    assert dataset_trigger(KohyaDataset(items)) == "m1ra"  # regularisation captions have none
    items.append(DatasetItem(tmp_path / "c.png", "woman, forest", 10))
    with pytest.raises(TrainingConfigError, match=r"training.trigger_embedding_lr .*'m1ra', 'woman'"):
        dataset_trigger(KohyaDataset(items))
