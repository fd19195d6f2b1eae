"""Permalinks read in batches (issue 25, publishing throughput): the multi-id lookup
(GET /?ids=a,b,c&fields=permalink) against the fake Graph API over real HTTP, on SQLite and
PostgreSQL; the fake answers it as the Graph API does (803 for an id it does not find), and a
failed lookup falls back to one call per post."""

from __future__ import annotations

import pytest

from persona_pipeline.resources.instagram import MAX_IDS, GraphError, InstagramGraphClient
from persona_pipeline.resources.instagram_pipeline import PERMALINK_BATCH
from persona_pipeline_tests.test_publishing import (TOKEN_A, TOKEN_B, USER_A, USER_B, assert_no_token_leaked,
                                                    assert_published_once, persona, posts, world)  # noqa: F401
from persona_fakes.graph import Fault


def _publish_directly(fake, user: str, token: str, n: int) -> list[str]:
    """n media on `user`'s account, made through the fake's own API (no publisher)."""
    client = InstagramGraphClient(base_url=fake.url, timeout_s=5)
    fake.fetch_media = False  # no image host needed for these
    fake.accounts[user].quota_total = max(fake.accounts[user].quota_total, n)
    ids = []
    for i in range(n):
        container = client.create_container(user, token, f"http://127.0.0.1:9/{user}-{i}.jpg", f"direct {user} {i}")
        ids.append(client.publish_container(user, token, container))
    return ids


def test_the_multi_id_lookup_answers_many_ids_in_one_request_and_splits_at_the_limit(world):
    ids = _publish_directly(world.fake, USER_A, TOKEN_A, MAX_IDS + 3)
    client = InstagramGraphClient(base_url=world.fake.url, timeout_s=5)
    links = client.permalinks(ids, TOKEN_A)
    assert set(links) == set(ids)
    assert links == {m.id: m.permalink for m in world.fake.media.values()}
    lookups = world.fake.requests_to("permalinks")
    assert [len(r.params["ids"].split(",")) for r in lookups] == [MAX_IDS, 3]
    assert all(r.params["fields"] == "permalink" and r.token_in == "query" for r in lookups)
    assert world.fake.requests_to("permalink") == []


def test_the_fake_refuses_the_whole_lookup_for_an_id_it_does_not_find_or_of_another_account(world):
    mine = _publish_directly(world.fake, USER_A, TOKEN_A, 2)
    theirs = _publish_directly(world.fake, USER_B, TOKEN_B, 1)
    client = InstagramGraphClient(base_url=world.fake.url, timeout_s=5, max_retries=0)
    for ids in ([*mine, "1799999999999"], [*mine, *theirs]):
        with pytest.raises(GraphError) as refused:
            client.permalinks(ids, TOKEN_A)
        assert refused.value.code == 803 and refused.value.kind == "permanent"
        assert ids[-1] in str(refused.value) and TOKEN_A not in str(refused.value)
    with pytest.raises(GraphError) as bad_token:
        client.permalinks(mine, "EAAG-not-a-token")
    assert bad_token.value.code == 190


def test_published_posts_get_their_permalinks_in_batches(world):
    pid = persona(world)
    ids = posts(world, pid, "anna", USER_A, PERMALINK_BATCH + 2)
    counts = world.publish()
    assert counts["published"] == len(ids)
    assert_published_once(world, ids)  # every post has its permalink
    by_media = {m.id: m.permalink for m in world.fake.media.values()}
    for post_id in ids:
        post = world.post(post_id)
        assert post.permalink == by_media[post.external_id]
        assert [(a.step, a.outcome) for a in world.attempts(post_id)][-1] == ("permalink", "ok")
    lookups = world.fake.requests_to("permalinks")
    assert sorted(len(r.params["ids"].split(",")) for r in lookups) == [2, PERMALINK_BATCH]
    assert world.fake.requests_to("permalink") == []  # no per-post call


def test_a_failed_lookup_falls_back_to_one_call_per_post(world):
    pid = persona(world)
    ids = posts(world, pid, "anna", USER_A, 3)
    world.fake.inject("permalinks", Fault.graph(803, message="(#803) Some of the aliases you requested do not exist"))
    world.fake.inject("permalink", Fault.graph(100, 33), times=1)  # and one post's own read fails too
    counts = world.publish()
    assert counts["published"] == 3
    assert len(world.fake.requests_to("permalinks")) == 1 and len(world.fake.requests_to("permalink")) == 3
    linked = [world.post(i).permalink for i in ids]
    assert linked[0] is None and all(link.startswith("https://www.instagram.com/p/") for link in linked[1:])
    # the post stays published with its media id; its attempt row says the permalink read failed
    first = world.post(ids[0])
    assert first.status == "published" and first.external_id
    assert [(a.step, a.outcome) for a in world.attempts(ids[0])][-1] == ("permalink", "failed")
    assert any(f"post {ids[0]}: published as media" in line for line in world.log.lines)
    assert world.fake.double_publishes() == []
    assert_no_token_leaked(world)


def test_the_next_run_reads_the_permalinks_a_killed_run_never_asked_for_but_not_a_failed_one(world):
    from datetime import datetime, timedelta, timezone

    from sqlalchemy import delete, update

    from persona_pipeline.db import models
    from persona_pipeline.db.session import session_scope

    pid = persona(world)
    first = posts(world, pid, "anna", USER_A, 3)
    assert world.publish()["published"] == 3
    killed, failed, fine = first
    with session_scope(world.url) as session:  # as a run killed before its batch's lookup leaves `killed`
        session.execute(update(models.Post).where(models.Post.id.in_([killed, failed])).values(permalink=None))
        session.execute(delete(models.PostAttempt).where(models.PostAttempt.post_id == killed,
                                                         models.PostAttempt.step == "permalink"))
        session.execute(update(models.PostAttempt).where(models.PostAttempt.post_id == failed,
                                                         models.PostAttempt.step == "permalink").values(outcome="failed"))
    before = len(world.fake.requests_to("permalinks"))
    later = posts(world, pid, "anna", USER_A, 1,
                  first=datetime.now(timezone.utc).replace(second=0, microsecond=0) - timedelta(hours=1))
    assert world.publish()["published"] == 1
    assert world.post(killed).permalink.startswith("https://www.instagram.com/p/")
    assert world.post(failed).permalink is None  # a read that failed is recorded, not asked again each run
    (lookup,) = world.fake.requests_to("permalinks")[before:]
    asked = set(lookup.params["ids"].split(","))
    assert asked == {world.post(killed).external_id, world.post(later[0]).external_id}
    assert world.fake.double_publishes() == []
