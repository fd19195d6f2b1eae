"""Bradley–Terry ranking (docs/rules.md#bradley-terry): fit, bootstrap intervals, deterministic order."""

import math
import random

import numpy as np
import pytest

from persona_pipeline.domain import bradley_terry as bt
from persona_pipeline.domain import elo


def simulated_votes(strengths: dict[int, float], count: int, seed: int) -> list[tuple[int, int]]:
    """Votes between random pairs, won with the Bradley–Terry probability of the Elo strengths."""
    rng = random.Random(seed)
    ids = sorted(strengths)
    votes = []
    for _ in range(count):
        a, b = rng.sample(ids, 2)
        p_a = 1.0 / (1.0 + 10 ** ((strengths[b] - strengths[a]) / 400))
        votes.append((a, b) if rng.random() < p_a else (b, a))
    return votes


def test_elo_scale_and_curve():
    assert bt.ELO_SCALE == pytest.approx(400 / math.log(10))
    # 200 Elo apart: the stronger wins ~76% of the time, as on the Elo curve.
    assert bt.sigmoid(np.array(200 / bt.ELO_SCALE)) == pytest.approx(0.7597, abs=1e-4)


def test_two_candidates_recover_the_elo_gap():
    # 760 of 1000 votes: the maximum-likelihood gap is 400·log10(76/24) = 200.3 Elo; the prior
    # (worth less than one vote) pulls it in by well under 1 Elo.
    votes = [(1, 2)] * 760 + [(2, 1)] * 240
    scores = bt.fit([1, 2], votes)
    gap = scores[1] - scores[2]
    assert 199.0 < gap < 400 * math.log10(76 / 24)
    assert (scores[1] + scores[2]) / 2 == pytest.approx(1000.0, abs=1e-3)


def test_known_strengths_recovered_from_simulated_votes():
    truth = {cid: 1000 + 100 * (cid - 5) for cid in range(1, 11)}   # 600 .. 1500, 100 apart
    scores = bt.fit(list(truth), simulated_votes(truth, 6000, seed=1))
    assert sorted(scores, key=scores.get) == sorted(truth, key=truth.get)
    # Scale: the fitted spread matches the true 900 Elo, and every score is within 40 Elo.
    assert scores[10] - scores[1] == pytest.approx(900, abs=60)
    mean_truth = sum(truth.values()) / len(truth)
    assert max(abs(scores[c] - (truth[c] - mean_truth + 1000)) for c in truth) < 40
    assert sum(scores.values()) / len(scores) == pytest.approx(1000.0, abs=1e-3)


def test_fit_does_not_depend_on_vote_order_unlike_elo():
    truth = {1: 1200, 2: 1100, 3: 1000, 4: 900}
    votes = simulated_votes(truth, 60, seed=2)
    shuffled = list(votes)
    random.Random(3).shuffle(shuffled)
    assert bt.fit(truth, votes) == pytest.approx(bt.fit(truth, shuffled), abs=2e-3)
    assert bt.fit(truth, votes) == bt.fit(truth, list(votes))            # and is repeatable
    # Online Elo, on the same votes, does depend on their order.
    first = {c: s.elo for c, s in elo.replay(truth, votes).items()}
    second = {c: s.elo for c, s in elo.replay(truth, shuffled).items()}
    assert first != second


def test_confidence_interval_contains_the_truth_and_narrows_with_votes():
    # Truth: 1100 vs 900 (200 apart, 76%). The data hit 76% exactly, at 50 and at 500 votes.
    few = bt.rank([1, 2], [(1, 2)] * 38 + [(2, 1)] * 12, rounds=1000, seed=0)
    many = bt.rank([1, 2], [(1, 2)] * 380 + [(2, 1)] * 120, rounds=1000, seed=0)
    for standings in (few, many):
        best = standings[0]
        assert best.candidate_id == 1
        assert best.ci_low < 1100 < best.ci_high
        assert best.ci_low <= best.score <= best.ci_high
    width_few = few[0].ci_high - few[0].ci_low
    width_many = many[0].ci_high - many[0].ci_low
    # Ten times the votes: about sqrt(10) = 3.2 times narrower.
    assert 2.5 < width_few / width_many < 4.0


def test_bootstrap_is_deterministic_for_a_seed():
    truth = {c: 1000 + 50 * c for c in range(1, 9)}
    votes = simulated_votes(truth, 80, seed=4)
    assert bt.rank(truth, votes, rounds=200, seed=7) == bt.rank(truth, votes, rounds=200, seed=7)
    other = bt.rank(truth, votes, rounds=200, seed=8)
    assert [(s.ci_low, s.ci_high) for s in other] != [(s.ci_low, s.ci_high) for s in bt.rank(truth, votes, rounds=200, seed=7)]
    # rounds=0: no resampling, the interval collapses onto the score.
    assert all(s.ci_low == s.score == s.ci_high for s in bt.rank(truth, votes, rounds=0))


def test_bootstrap_matches_a_direct_resampling_of_the_votes():
    # The multinomial resampling over distinct outcomes is the same distribution as drawing votes
    # with replacement: compare the interval with a slow, literal bootstrap.
    truth = {1: 1150, 2: 1050, 3: 950, 4: 850}
    votes = simulated_votes(truth, 120, seed=5)
    fast = {s.candidate_id: s for s in bt.rank(truth, votes, rounds=600, seed=1)}
    rng = random.Random(9)
    draws = []
    for _ in range(300):
        sample = [votes[rng.randrange(len(votes))] for _ in votes]
        draws.append(bt.fit(truth, sample))
    for cid in truth:
        low, high = np.percentile([d[cid] for d in draws], [2.5, 97.5])
        assert fast[cid].ci_low == pytest.approx(low, abs=40)
        assert fast[cid].ci_high == pytest.approx(high, abs=40)


def test_undefeated_and_unconnected_candidates_get_finite_scores():
    scores = bt.fit([1, 2, 3, 4], [(1, 2), (1, 3), (3, 4)])
    assert all(math.isfinite(s) for s in scores.values())
    assert max(scores, key=scores.get) == 1
    assert scores[1] < 1600          # the prior keeps one undefeated record from running away


def test_candidates_without_votes_are_ranked_from_the_prior():
    standings = bt.rank([1, 2, 3, 4], [(1, 2), (1, 2)], rounds=100)
    by_id = {s.candidate_id: s for s in standings}
    assert len(standings) == 4
    assert by_id[3].score == by_id[4].score == 1000.0
    assert by_id[3].votes == 0
    # No data to resample: the prior's 95% interval, not a zero-width one.
    assert by_id[3].ci_low == pytest.approx(1000 - 1.96 * bt.PRIOR_SD, abs=0.1)
    assert by_id[3].ci_high == pytest.approx(1000 + 1.96 * bt.PRIOR_SD, abs=0.1)
    assert [s.candidate_id for s in standings] == [1, 3, 4, 2]
    assert bt.fit([5, 6], []) == {5: 1000.0, 6: 1000.0}
    assert bt.rank([], []) == []


def test_votes_with_unknown_candidates_are_ignored():
    votes = [(1, 2), (2, 3), (1, 3)]
    with_killed = votes + [(9, 1), (9, 2), (3, 9)]      # candidate 9 was killed
    assert bt.fit([1, 2, 3], with_killed) == bt.fit([1, 2, 3], votes)
    standings = {s.candidate_id: s for s in bt.rank([1, 2, 3], with_killed, rounds=50)}
    assert (standings[1].wins, standings[1].losses) == (2, 0)
    assert standings[3].losses == 2


def test_bad_input_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="cannot win against itself"):
        bt.fit([1, 2], [(1, 1)])
    with pytest.raises(ValueError, match=r"lists \[2\] more than once"):
        bt.fit([1, 2, 2], [])
    with pytest.raises(ValueError, match="rounds"):
        bt.rank([1, 2], [(1, 2)], rounds=-1)
    with pytest.raises(ValueError, match="prior_sd"):
        bt.fit_arrays(2, np.array([0]), np.array([1]), prior_sd=0)


def test_exact_score_ties_break_by_wins_then_id():
    # 1 and 3 split two votes, 2 and 4 split four: all four score exactly 1000. 5 has no votes.
    votes = [(1, 3), (3, 1), (2, 4), (4, 2), (2, 4), (4, 2)]
    standings = bt.rank([5, 4, 3, 2, 1], votes, rounds=20)
    assert {s.score for s in standings} == {1000.0}
    # More wins first (2 and 4: two each, then 1 and 3: one each, then 5), equal records by id.
    assert [s.candidate_id for s in standings] == [2, 4, 1, 3, 5]
    # The order does not depend on the order the candidates were listed in.
    assert bt.rank([1, 2, 3, 4, 5], votes, rounds=20) == standings


def test_sort_standings_tie_break_rules():
    s = bt.BTStanding
    standings = [
        s(7, 1000.0, 900, 1100, 2, 3),
        s(3, 1000.0, 900, 1100, 2, 3),
        s(5, 1000.0000001, 900, 1100, 2, 1),   # float noise above 7 and 3: must not count
        s(9, 1000.0, 900, 1100, 3, 9),
        s(1, 1010.0, 900, 1100, 0, 0),
    ]
    order = [x.candidate_id for x in bt.sort_standings(standings)]
    # score; then more wins (9); then fewer losses (5); then the lower id (3 before 7).
    assert order == [1, 9, 5, 3, 7]
    assert standings[0].votes == 5


def test_fit_arrays_counts_weigh_like_repeated_votes():
    repeated = bt.fit_arrays(3, np.array([0, 0, 0, 1, 2]), np.array([1, 1, 2, 2, 0]))
    weighted = bt.fit_arrays(3, np.array([0, 0, 1, 2]), np.array([1, 2, 2, 0]), counts=np.array([2, 1, 1, 1]))
    np.testing.assert_allclose(repeated, weighted, atol=1e-6)
    # Without a prior, on a strongly connected graph: the plain maximum-likelihood fit exists.
    plain = bt.fit_arrays(2, np.array([0, 1]), np.array([1, 0]), counts=np.array([3, 1]), prior_sd=math.inf)
    assert plain[0] - plain[1] == pytest.approx(400 * math.log10(3), abs=1e-3)
