"""The review decisions the form calls (db/review.py, db/review_posts.py, db/review_views.py) on SQLite and PostgreSQL:
pair offers, votes bound to offers, Bradley–Terry approval, winners from the final step, post edits,
moves and rejections, and the queue. Concurrency runs on PostgreSQL."""

import random
import threading
from datetime import datetime, timedelta, timezone
from itertools import combinations

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from persona_pipeline.db import models, review, review_posts, review_views
from persona_pipeline.db.session import session_scope
from persona_pipeline.domain import elo
from persona_pipeline_tests.conftest import make_database
from persona_pipeline_tests.review_fixtures import racing_votes, seed_review


def _events(url, kind):
    with session_scope(url) as session:
        return list(session.scalars(select(models.ReviewEvent).where(models.ReviewEvent.kind == kind)))


def test_offers_record_probability_and_never_repeat_a_pair(db_url, tmp_path):
    seed = seed_review(db_url, tmp_path / "home", candidates=5)
    step = seed.step_ids[0]
    seen = set()
    with session_scope(db_url) as session:
        held = []
        for _ in range(10):  # 5 candidates: 10 pairs, each offered once while the offers are held
            offer = review.next_pair(session, step, "ana", exclude_offer_ids=held, rng=random.Random(len(held)))
            assert offer is not None and 0 < offer.probability <= 1 and offer.strategy in {"active", "explore"}
            pair = frozenset((offer.left_id, offer.right_id))
            assert pair not in seen and pair <= set(seed.candidate_ids)
            seen.add(pair)
            held.append(offer.id)
        assert review.next_pair(session, step, "ana", exclude_offer_ids=held) is None


def test_a_vote_must_match_its_offer_and_records_its_probability(db_url, tmp_path):
    seed = seed_review(db_url, tmp_path / "home", candidates=4)
    with session_scope(db_url) as session:
        offer = review.next_pair(session, seed.step_ids[0], "ana", rng=random.Random(1))
        offer_id, left, right, probability = offer.id, offer.left_id, offer.right_id, offer.probability
    other = next(c for c in seed.candidate_ids if c not in (left, right))
    with pytest.raises(review.ReviewError, match=f"not the pair of offer {offer_id}"), session_scope(db_url) as session:
        review.cast_vote(session, left, other, "ana", offer_id=offer_id)
    with pytest.raises(review.NotFound), session_scope(db_url) as session:
        review.cast_vote(session, left, right, "ana", offer_id=999999)
    with session_scope(db_url) as session:
        vote = review.cast_vote(session, right, left, "ana", offer_id=offer_id)
        assert vote.selection_probability == pytest.approx(probability) and vote.offer_id == offer_id
        assert session.get(models.PairOffer, offer_id).outcome == "voted"
    with pytest.raises(review.DuplicateVote), session_scope(db_url) as session:
        review.cast_vote(session, left, right, "ana", offer_id=offer_id)
    [event] = _events(db_url, "vote")
    assert event.reviewer == "ana" and event.payload["offer_id"] == offer_id and event.created_at is not None


def test_skip_and_kill_close_their_offer(db_url, tmp_path):
    seed = seed_review(db_url, tmp_path / "home", candidates=4)
    with session_scope(db_url) as session:
        first = review.next_pair(session, seed.step_ids[0], "ana", rng=random.Random(2))
        second = review.next_pair(session, seed.step_ids[0], "ana", exclude_offer_ids=[first.id], rng=random.Random(3))
        ids = first.id, second.id, second.left_id
    with session_scope(db_url) as session:
        review.skip_offer(session, ids[0], "ana")
    with pytest.raises(review.ReviewError, match="already answered"), session_scope(db_url) as session:
        review.skip_offer(session, ids[0], "ana")
    outsider = next(c for c in seed.candidate_ids if c not in (second.left_id, second.right_id))
    with pytest.raises(review.ReviewError, match="not in pair offer"), session_scope(db_url) as session:
        review.kill_candidate(session, outsider, "ana", offer_id=ids[1])
    with session_scope(db_url) as session:
        review.kill_candidate(session, ids[2], "ana", reason="hands", offer_id=ids[1])
        assert session.get(models.PairOffer, ids[1]).outcome == "killed"
        assert session.get(models.Candidate, ids[2]).status == "killed"
        # a killed candidate is never offered again
        for _ in range(3):
            offer = review.next_pair(session, seed.step_ids[0], "ana")
            if offer is None:
                break
            assert ids[2] not in (offer.left_id, offer.right_id)
            review.cast_vote(session, offer.left_id, offer.right_id, "ana", offer_id=offer.id)
    assert [e.reviewer for e in _events(db_url, "skip")] == ["ana"]


def test_approval_takes_the_bradley_terry_top_k_and_warns_about_few_votes(db_url, tmp_path):
    seed = seed_review(db_url, tmp_path / "home", candidates=4, steps=2, top_k=2)
    a, b, c, d = seed.candidate_ids
    with session_scope(db_url) as session:
        # d beats everyone, c beats a and b, b beats a: order d, c, b, a
        for winner, loser in [(d, a), (d, b), (d, c), (c, a), (c, b), (b, a)]:
            review.cast_vote(session, winner, loser, "ana")
    with session_scope(db_url) as session:
        view = review_views.step_view(session, seed.step_ids[0])
        assert [r.candidate_id for r in view.ranking] == [d, c, b, a]
        assert all(r.ci_low <= r.score <= r.ci_high for r in view.ranking)
        assert view.k_default == 2 and view.can_approve and not view.can_pick
        assert view.low_vote_warning() == [d, c]  # three votes each, fewer than five
        step = review.approve_step(session, seed.step_ids[0], 2, "ana")
        nxt = session.get(models.RunStep, seed.step_ids[1])
        assert step.status == "approved" and nxt.status == "generating" and nxt.parent_ids == [d, c]
    [event] = _events(db_url, "approve_step")
    assert event.payload["parents"] == [d, c] and event.payload["low_vote_candidates"] == [d, c]


def test_the_winner_comes_from_the_final_step(db_url, tmp_path):
    seed = seed_review(db_url, tmp_path / "home", candidates=3, steps=2)
    with pytest.raises(review.ReviewError, match="final step 2"), session_scope(db_url) as session:
        review.pick_winner(session, seed.run_id, seed.candidate_ids[0], "ana")
    one = seed_review(db_url, tmp_path / "home", candidates=3, steps=1, slug="solo", posts=0)
    with pytest.raises(review.ReviewError, match="is not from run"), session_scope(db_url) as session:
        review.pick_winner(session, one.run_id, seed.candidate_ids[0], "ana")
    with session_scope(db_url) as session:
        run = review.pick_winner(session, one.run_id, one.candidate_ids[1], "ana")
        assert run.status == "done" and run.winner_candidate_id == one.candidate_ids[1]


def test_post_edit_move_reject_and_approve(db_url, tmp_path):
    seed = seed_review(db_url, tmp_path / "home", posts=3)
    first, second, third = seed.post_ids
    with pytest.raises(review.ReviewError, match="the limit is 2"), session_scope(db_url) as session:
        review_posts.edit_post(session, first, "New words", ["a", "b", "c"], "ana")  # the test persona allows 2
    with pytest.raises(review.ReviewError, match="2200"), session_scope(db_url) as session:
        review_posts.edit_post(session, first, "x" * 2300, [], "ana")
    with pytest.raises(review.ReviewError, match="'#not ok'"), session_scope(db_url) as session:
        review_posts.edit_post(session, first, "fine", ["#not ok"], "ana")
    with session_scope(db_url) as session:
        post = review_posts.edit_post(session, first, "  <b>New</b> words  ", ["sun", "#sea", "sun"], "ana")
        assert post.caption == "<b>New</b> words" and post.hashtags == ["#sun", "#sea"]
        slot = post.scheduled_at
    # moving next to another post of the account is refused (the test persona keeps 60 min apart)
    with pytest.raises(review.ReviewError, match="within 60 minutes"), session_scope(db_url) as session:
        review_posts.move_post(session, second, slot + timedelta(minutes=20), "ana")
    with pytest.raises(review.ReviewError, match="in the past"), session_scope(db_url) as session:
        review_posts.move_post(session, second, datetime.now(timezone.utc) - timedelta(hours=1), "ana")
    with session_scope(db_url) as session:
        moved = review_posts.move_post(session, second, slot + timedelta(days=2), "ana")
        assert moved.scheduled_at == slot + timedelta(days=2)
        review_posts.reject_post(session, third, "bo", "off brand")
        assert session.get(models.Post, third).status == "cancelled"
    with pytest.raises(review.ReviewError, match="cannot become"), session_scope(db_url) as session:
        review_posts.approve_post(session, third, "ana")
    # a slot that passed while the post waited moves to the next free one
    with session_scope(db_url) as session:
        session.get(models.Post, first).scheduled_at = datetime.now(timezone.utc) - timedelta(hours=3)
    with session_scope(db_url) as session:
        now = datetime.now(timezone.utc)
        post = review_posts.approve_post(session, first, "ana", now=now)
        assert post.status == "scheduled" and post.scheduled_at >= now.replace(microsecond=0)
    kinds = [e.kind for e in _events(db_url, "edit_post") + _events(db_url, "move_post") + _events(db_url, "reject_post")
             + _events(db_url, "approve_post")]
    assert kinds == ["edit_post", "move_post", "reject_post", "approve_post"]


def test_the_queue_counts_what_needs_a_person(db_url, tmp_path):
    seed = seed_review(db_url, tmp_path / "home", candidates=4, steps=2, posts=2)
    with session_scope(db_url) as session:
        [queue] = review_views.review_queue(session)
        assert (queue.slug, queue.pairs_to_vote, queue.steps_to_vote, queue.steps_to_approve, queue.posts_to_approve) == \
            (seed.slug, 6, [seed.step_ids[0]], [seed.step_ids[0]], 2)
        a, b = seed.candidate_ids[:2]
        review.cast_vote(session, a, b, "ana")
        review_posts.approve_post(session, seed.post_ids[0], "ana")
    with session_scope(db_url) as session:
        [queue] = review_views.review_queue(session)
        assert queue.pairs_to_vote == 5 and queue.posts_to_approve == 1 and queue.runs_to_pick == []


@pytest.mark.postgres
def test_concurrent_votes_on_postgres_lose_nothing_and_match_a_replay(tmp_path):
    url, drop = make_database("postgresql", tmp_path)
    try:
        seed = seed_review(url, tmp_path / "home", candidates=12, posts=0)
        pairs = list(combinations(seed.candidate_ids, 2))  # 66 pairs, each sent by two reviewers at once
        outcomes: list[str] = []
        lock = threading.Lock()

        def reviewer(name: str, order: list[tuple[int, int]]) -> None:
            for a, b in order:
                try:
                    with session_scope(url) as session:
                        review.cast_vote(session, a, b, name)
                    result = "ok"
                except review.DuplicateVote:
                    result = "duplicate"
                with lock:
                    outcomes.append(result)

        threads = []
        for index in range(8):
            order = pairs[:]
            random.Random(index).shuffle(order)
            threads.append(threading.Thread(target=reviewer, args=(f"r{index}", order[: len(order) // 4 + 1] + order)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with session_scope(url) as session:
            votes = session.execute(select(models.Vote.winner_id, models.Vote.loser_id).order_by(models.Vote.id)).all()
            stored = {c.id: c.elo for c in session.scalars(select(models.Candidate))}
            events = session.scalar(select(func.count()).select_from(models.ReviewEvent).where(models.ReviewEvent.kind == "vote"))
        # A pair may be voted more than once: every send is recorded, none lost or doubled.
        assert len(votes) == len(outcomes) == outcomes.count("ok") == events
        assert len({frozenset(v) for v in votes}) == len(pairs)
        replay = elo.replay(seed.candidate_ids, votes)
        assert {cid: s.elo for cid, s in replay.items()} == stored
    finally:
        drop()


def test_a_voted_pair_is_offered_and_voted_on_again(db_url, tmp_path):
    # Two candidates, one pair: its second and third votes are what a close pair needs.
    seed = seed_review(db_url, tmp_path / "home", candidates=2, posts=0)
    offers = []
    for round_ in range(3):
        with session_scope(db_url) as session:
            offer = review.next_pair(session, seed.step_ids[0], "ana", rng=random.Random(round_))
            assert offer is not None and {offer.left_id, offer.right_id} == set(seed.candidate_ids)
            review.cast_vote(session, offer.left_id, offer.right_id, "ana", offer_id=offer.id)
            offers.append(offer.id)
    with session_scope(db_url) as session:
        votes = session.scalars(select(models.Vote).where(models.Vote.step_id == seed.step_ids[0])).all()
        assert sorted(v.offer_id for v in votes) == sorted(offers) and len(set(offers)) == 3
        assert review_views.unvoted_pairs(session, seed.step_ids[0]) == 0      # distinct pairs, not votes
    with pytest.raises(review.DuplicateVote), session_scope(db_url) as session:   # still one vote per offer
        review.cast_vote(session, *seed.candidate_ids, "ana", offer_id=offers[0])


def test_a_skipped_pair_is_not_put_to_the_same_reviewer_again(db_url, tmp_path):
    seed = seed_review(db_url, tmp_path / "home", candidates=2, posts=0)  # one pair only
    with session_scope(db_url) as session:
        offer = review.next_pair(session, seed.step_ids[0], "ana")
        review.skip_offer(session, offer.id, "ana")
    with session_scope(db_url) as session:
        assert review.next_pair(session, seed.step_ids[0], "ana") is None
        other = review.next_pair(session, seed.step_ids[0], "bo")
        assert {other.left_id, other.right_id} == set(seed.candidate_ids)


def test_a_kill_after_the_winner_does_not_reopen_the_run(db_url, tmp_path):
    seed = seed_review(db_url, tmp_path / "home", candidates=3, steps=1, posts=0)
    with session_scope(db_url) as session:
        review.pick_winner(session, seed.run_id, seed.candidate_ids[0], "ana")
        review.kill_candidate(session, seed.candidate_ids[1], "ana")
        run = session.get(models.GenerationRun, seed.run_id)
        assert run.status == "done" and run.steps[0].status == "voting"


@pytest.mark.postgres
def test_concurrent_offers_on_postgres_never_share_a_pair(tmp_path):
    url, drop = make_database("postgresql", tmp_path)
    try:
        seed = seed_review(url, tmp_path / "home", candidates=10, posts=0)
        pairs: list[frozenset] = []
        lock = threading.Lock()
        barrier = threading.Barrier(12)

        def reviewer(name: str) -> None:
            barrier.wait()
            for _ in range(3):
                with session_scope(url) as session:
                    offer = review.next_pair(session, seed.step_ids[0], name, exploration=0.0)
                    pair = frozenset((offer.left_id, offer.right_id))
                with lock:
                    pairs.append(pair)

        threads = [threading.Thread(target=reviewer, args=(f"r{i}",)) for i in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # greedy choice (no exploration) would pick the same best pair for everyone without the step lock
        assert len(pairs) == 36 and len(set(pairs)) == 36
    finally:
        drop()


def test_a_failed_post_waits_for_a_person_to_retry_or_abandon_it(db_url, tmp_path):
    seed = seed_review(db_url, tmp_path / "home", posts=2)
    first, second = seed.post_ids
    with session_scope(db_url) as session:
        for post_id in seed.post_ids:  # as the publisher leaves a spam-blocked post: failed, not retryable
            post = session.get(models.Post, post_id)
            post.status, post.retryable, post.retry_count = "failed", False, 1
            post.failure_reason = "GraphError spam: code 4 subcode 2207051"
    with session_scope(db_url) as session:
        assert [p.id for p in review_views.posts_to_review(session)] == [first, second]
        edited = review_posts.edit_post(session, first, "Fixed words", ["#sun"], "ana")  # a failed post can be fixed
        assert edited.caption == "Fixed words"
        retried = review_posts.retry_post(session, first, "ana")
        assert (retried.status, retried.retryable, retried.next_attempt_at) == ("scheduled", True, None)
        assert "spam" in retried.review_note and retried.retry_count == 1
        abandoned = review_posts.abandon_post(session, second, "bo", "not worth it")
        assert abandoned.status == "abandoned" and abandoned.review_note == "abandoned by bo: not worth it"
    with pytest.raises(review.ReviewError, match="'scheduled' cannot become 'abandoned'"), session_scope(db_url) as session:
        review_posts.abandon_post(session, first, "ana")
    with pytest.raises(review.ReviewError, match="'abandoned' cannot become 'scheduled'"), session_scope(db_url) as session:
        review_posts.retry_post(session, second, "ana")
    assert [(e.kind, e.subject_id) for e in _events(db_url, "retry_post") + _events(db_url, "abandon_post")] == \
        [("retry_post", first), ("abandon_post", second)]


def test_two_identical_votes_at_once_one_is_refused_as_a_duplicate(db_url, tmp_path):
    """Two sessions record the same vote at the same moment (real threads, overlapping for sure):
    one is stored, the other is a DuplicateVote (the form's 409), never a raw database error."""
    seed = seed_review(db_url, tmp_path / "home", candidates=4, posts=0)
    with session_scope(db_url) as session:
        offer = review.next_pair(session, seed.step_ids[0], "ana", rng=random.Random(4))
        offer_id, left, right = offer.id, offer.left_id, offer.right_id
    outcomes: list[object] = []
    lock = threading.Lock()

    def vote() -> None:
        try:
            with session_scope(db_url) as session:
                outcome: object = review.cast_vote(session, left, right, "ana", offer_id=offer_id).id
        except Exception as exc:  # whatever escapes is the outcome the test judges
            outcome = exc
        with lock:
            outcomes.append(outcome)

    with racing_votes(db_url):
        threads = [threading.Thread(target=vote) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    refused = [o for o in outcomes if isinstance(o, Exception)]
    assert len(outcomes) == 2 and len(refused) == 1, outcomes
    assert isinstance(refused[0], review.DuplicateVote), repr(refused[0])
    assert refused[0].status_code == 409 and "already been voted" in str(refused[0])
    with session_scope(db_url) as session:
        [vote] = session.scalars(select(models.Vote)).all()
        assert (vote.offer_id, vote.winner_id, vote.loser_id) == (offer_id, left, right)
        assert (session.get(models.Candidate, left).elo, session.get(models.Candidate, right).elo) == elo.apply_vote(1000, 1000)
    assert len(_events(db_url, "vote")) == 1


def test_a_vote_answers_an_open_offer_shown_to_its_reviewer(db_url, tmp_path):
    """The form's vote carries its offer: it counts only for the reviewer it was offered to, only
    once the page showed it (not while it was the preloaded next pair), and once."""
    seed = seed_review(db_url, tmp_path / "home", candidates=5, posts=0)
    step = seed.step_ids[0]
    with session_scope(db_url) as session:
        shown = review.next_pair(session, step, "ana", rng=random.Random(5))
        preloaded = review.next_pair(session, step, "ana", exclude_offer_ids=[shown.id], shown=False, rng=random.Random(6))
        for_bo = review.next_pair(session, step, "bo", rng=random.Random(7))
        skipped = review.next_pair(session, step, "ana", rng=random.Random(8))
        assert shown.shown_at is not None and preloaded.shown_at is None
        offers = {o.id: (o.left_id, o.right_id) for o in (shown, preloaded, for_bo, skipped)}
    with session_scope(db_url) as session:
        review.skip_offer(session, skipped.id, "ana")

    def vote(offer_id: int, reviewer: str = "ana", reverse: bool = False) -> models.Vote:
        left, right = offers[offer_id]
        with session_scope(db_url) as session:
            return review.cast_vote(session, *((right, left) if reverse else (left, right)), reviewer, offer_id=offer_id)

    with pytest.raises(review.ReviewError, match=f"pair offer {preloaded.id} .*not shown") as refused:
        vote(preloaded.id)
    assert refused.value.status_code == 409
    with pytest.raises(review.ReviewError, match=f"pair offer {for_bo.id} was offered to bo, not ana") as refused:
        vote(for_bo.id)
    assert refused.value.status_code == 403
    with pytest.raises(review.ReviewError, match=rf"pair offer {skipped.id} was already answered \(skipped\)") as refused:
        vote(skipped.id)
    assert refused.value.status_code == 409
    with pytest.raises(review.ReviewError, match=f"pair offer {preloaded.id} was offered to ana, not bo"):
        with session_scope(db_url) as session:
            review.show_offer(session, preloaded.id, "bo")
    with session_scope(db_url) as session:
        assert review.show_offer(session, preloaded.id, "ana").shown_at is not None
    assert vote(preloaded.id).offer_id == preloaded.id  # shown now: it counts
    assert vote(shown.id).offer_id == shown.id
    with pytest.raises(review.DuplicateVote, match=f"pair offer {shown.id} has already been voted on"):
        vote(shown.id, reverse=True)
    assert vote(for_bo.id, "bo").reviewer == "bo"
    with session_scope(db_url) as session:
        assert sorted(session.scalars(select(models.Vote.offer_id))) == sorted([shown.id, preloaded.id, for_bo.id])
        assert session.get(models.PairOffer, skipped.id).outcome == "skipped"


def test_a_kill_from_the_vote_page_answers_an_open_offer_shown_to_its_reviewer(db_url, tmp_path):
    """A kill that names its offer follows the vote's rule: not another reviewer's offer, not the
    preloaded pair, not an offer already answered; a refused kill kills nothing."""
    seed = seed_review(db_url, tmp_path / "home", candidates=6, posts=0)
    step = seed.step_ids[0]
    with session_scope(db_url) as session:
        shown = review.next_pair(session, step, "ana", rng=random.Random(5))
        preloaded = review.next_pair(session, step, "ana", exclude_offer_ids=[shown.id], shown=False, rng=random.Random(6))
        for_bo = review.next_pair(session, step, "bo", rng=random.Random(7))
        offers = {o.id: (o.left_id, o.right_id) for o in (shown, preloaded, for_bo)}
        review.cast_vote(session, *offers[shown.id], "ana", offer_id=shown.id)

    def kill(offer_id: int, reviewer: str = "ana"):
        with session_scope(db_url) as session:
            return review.kill_candidate(session, offers[offer_id][0], reviewer, offer_id=offer_id)

    with pytest.raises(review.ReviewError, match=f"pair offer {preloaded.id} .*not shown") as refused:
        kill(preloaded.id)
    assert refused.value.status_code == 409
    with pytest.raises(review.ReviewError, match=f"pair offer {for_bo.id} was offered to bo, not ana") as refused:
        kill(for_bo.id)
    assert refused.value.status_code == 403
    with pytest.raises(review.DuplicateVote, match=f"pair offer {shown.id} has already been voted on"):
        kill(shown.id)
    with session_scope(db_url) as session:
        assert session.scalar(select(func.count()).select_from(models.Candidate)
                              .where(models.Candidate.status == "killed")) == 0
    assert kill(for_bo.id, "bo").status == "killed"
    with session_scope(db_url) as session:
        assert session.get(models.PairOffer, for_bo.id).outcome == "killed"


def test_the_database_stores_one_vote_per_offer(db_url, tmp_path):
    """Keyed by the offer, not by the pair (a pair may be offered again): a second vote row naming
    an offer that already has one is refused by the database itself."""
    seed = seed_review(db_url, tmp_path / "home", candidates=4, posts=0)
    with session_scope(db_url) as session:
        offer = review.next_pair(session, seed.step_ids[0], "ana", rng=random.Random(9))
        first = review.cast_vote(session, offer.left_id, offer.right_id, "ana", offer_id=offer.id)
        other = sorted(c for c in seed.candidate_ids if c not in (offer.left_id, offer.right_id))
    with pytest.raises(IntegrityError, match="offer_id"), session_scope(db_url) as session:
        session.add(models.Vote(step_id=first.step_id, winner_id=other[0], loser_id=other[1], pair_low_id=other[0],
                                pair_high_id=other[1], winner_elo_before=1000, loser_elo_before=1000, elo_delta=16,
                                reviewer="ana", offer_id=offer.id))
    with session_scope(db_url) as session:
        assert session.scalars(select(models.Vote.offer_id)).all() == [offer.id]
