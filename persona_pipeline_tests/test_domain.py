"""Pure domain rules: post states, slots, captions and hashtags, clustering, photo checks."""

from datetime import datetime, time, timedelta, timezone

import numpy as np
import pytest

from persona_pipeline.domain import post_states
from persona_pipeline.domain.captions import TemplateError, fill, hashtags_for_post, training_caption, validate_post_text
from persona_pipeline.domain.clustering import cluster_embeddings
from persona_pipeline.domain.slots import next_free_slot


def test_post_state_machine_allows_the_documented_path_and_refuses_others():
    path = ["draft", "awaiting_approval", "scheduled", "publishing", "failed", "scheduled", "publishing", "published"]
    for current, new in zip(path, path[1:]):
        post_states.check_transition(current, new)
    for current, new in [("published", "scheduled"), ("draft", "published"), ("cancelled", "draft"), ("scheduled", "published")]:
        with pytest.raises(post_states.IllegalTransition, match=f"'{current}' cannot become '{new}'"):
            post_states.check_transition(current, new)


def test_slot_is_now_when_inside_a_window_and_free():
    now = datetime(2026, 6, 1, 9, 30, tzinfo=timezone.utc)  # 10:30 in Lisbon (summer, UTC+1)
    slot = next_free_slot(now, [(time(10, 0), time(15, 0))], "Europe/Lisbon", [], timedelta(hours=2))
    assert slot == now


def test_slot_moves_to_next_window_in_local_time():
    now = datetime(2026, 6, 1, 14, 30, tzinfo=timezone.utc)  # 15:30 Lisbon: after 10–15
    windows = [(time(5, 0), time(8, 0)), (time(10, 0), time(15, 0))]
    slot = next_free_slot(now, windows, "Europe/Lisbon", [], timedelta(hours=2))
    assert slot == datetime(2026, 6, 2, 4, 0, tzinfo=timezone.utc)  # 05:00 Lisbon next day


def test_slot_keeps_the_gap_from_taken_slots():
    now = datetime(2026, 6, 1, 9, 0, tzinfo=timezone.utc)
    taken = [now + timedelta(minutes=30)]
    slot = next_free_slot(now, [(time(0, 0), time.max)], "UTC", taken, timedelta(hours=2))
    assert slot == taken[0] + timedelta(hours=2)
    assert all(abs(slot - t) >= timedelta(hours=2) for t in taken)


def test_slot_across_dst_start_uses_local_wall_clock():
    # Lisbon springs forward on 2026-03-29 at 01:00 UTC; a 05:00 local window is 04:00 UTC after it.
    now = datetime(2026, 3, 28, 12, 0, tzinfo=timezone.utc)
    slot = next_free_slot(now, [(time(5, 0), time(8, 0))], "Europe/Lisbon", [], timedelta(hours=1))
    assert slot == datetime(2026, 3, 29, 4, 0, tzinfo=timezone.utc)


def test_fill_refuses_unknown_placeholders_naming_them():
    assert fill("{trigger} {class_word}", {"trigger": "m1ra", "class_word": "woman"}, what="x") == "m1ra woman"
    with pytest.raises(TemplateError, match=r"\{clothes\}"):
        fill("{trigger} in {clothes}", {"trigger": "m1ra"}, what="persona.yaml training.caption_template")


def test_training_caption_always_starts_with_the_trigger_once():
    assert training_caption("m1ra", "m1ra, close-up") == "m1ra, close-up"
    assert training_caption("m1ra", "close-up,  smiling") == "m1ra, close-up, smiling"
    assert training_caption("m1ra", "m1raX portrait").startswith("m1ra, ")


def test_hashtags_respect_avoid_list_max_and_rotate():
    first = hashtags_for_post(["a", "b", "c", "spam"], ["SPAM"], 2, offset=0)
    second = hashtags_for_post(["a", "b", "c", "spam"], ["SPAM"], 2, offset=1)
    assert first == ["#a", "#b"] and second == ["#b", "#c"]
    assert hashtags_for_post([], [], 5) == []


def test_post_text_validation_names_each_limit():
    assert validate_post_text("hello", ["#a"], 5) == []
    problems = validate_post_text("x" * 2200 + " " + " ".join(f"@u{i}" for i in range(21)), ["#a", "#b", "#c"], 2)
    assert any("2200" in p for p in problems)
    assert any("hashtags; the limit is 2" in p for p in problems)
    assert any("mentions; the limit is 20" in p for p in problems)


def test_clustering_finds_separated_groups_and_handles_tiny_inputs():
    rng = np.random.default_rng(0)
    groups = [rng.normal(loc, 0.05, size=(6, 8)) for loc in (0.0, 3.0, -3.0)]
    result = cluster_embeddings(np.vstack(groups))
    assert result.k == 3
    assert len(set(result.labels[:6])) == 1 and len(set(result.labels)) == 3
    assert cluster_embeddings(np.ones((2, 4))).k == 1
    assert cluster_embeddings(np.ones((5, 4))).k == 1  # identical points: one cluster, no crash
    assert cluster_embeddings(np.zeros((0, 4))).k == 0
