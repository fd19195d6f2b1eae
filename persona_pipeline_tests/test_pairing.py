"""Pair selection for the review form: active at the top-K boundary, never a pair twice."""

import itertools
import random
from collections import Counter

import pytest

from persona_pipeline.domain import pairing


def consistent_votes(ids, unvoted):
    """Every pair except `unvoted` voted, the lower id always winning: a clear order 1 > 2 > ..."""
    unvoted = {frozenset(p) for p in unvoted}
    return [(a, b) for a, b in itertools.combinations(sorted(ids), 2) if frozenset((a, b)) not in unvoted]


def play_until_exhausted(choose, ids, strengths_rng):
    votes, shown = [], []
    while (pair := choose(votes)) is not None:
        left, right = pair
        shown.append(frozenset((left, right)))
        votes.append((left, right) if strengths_rng.random() < 0.5 else (right, left))
        assert len(votes) <= len(ids) * (len(ids) - 1) // 2
    return votes, shown


def test_choose_pair_never_repeats_a_voted_or_excluded_pair_and_ends_with_none():
    ids = [3, 7, 11, 12, 20, 21]
    exclude = frozenset({frozenset((3, 7)), frozenset((20, 21))})
    rng = random.Random(1)

    def choose(votes):
        choice = pairing.choose_pair(ids, votes, 2, exclude=exclude, rng=rng)
        if choice is None:
            return None
        assert choice.left_id != choice.right_id
        assert {choice.left_id, choice.right_id} <= set(ids)
        assert 0.0 < choice.probability <= 1.0
        assert choice.strategy in ("active", "explore")
        return choice.left_id, choice.right_id

    votes, shown = play_until_exhausted(choose, ids, random.Random(2))
    assert len(shown) == len(set(shown)) == 15 - 2            # every other pair, each once
    assert not set(shown) & exclude
    # Votes in either order count as voted.
    reversed_votes = [(b, a) for a, b in votes]
    assert pairing.choose_pair(ids, reversed_votes, 2, exclude=exclude, rng=rng) is None
    # Without the exclusions, the excluded pairs are what is left.
    left_over = pairing.choose_pair(ids, votes, 2, rng=rng)
    assert frozenset((left_over.left_id, left_over.right_id)) in exclude


def test_random_unvoted_pair_covers_every_pair_once_then_none():
    ids = [1, 2, 3, 4, 5]
    rng = random.Random(3)
    votes, shown = play_until_exhausted(lambda v: pairing.random_unvoted_pair(ids, v, rng), ids, random.Random(4))
    assert sorted(map(sorted, shown)) == sorted(map(sorted, map(frozenset, itertools.combinations(ids, 2))))
    assert pairing.random_unvoted_pair(ids, votes, rng) is None
    assert pairing.random_unvoted_pair([1], [], rng) is None


def test_killed_candidates_are_left_out_and_their_votes_ignored():
    # 9 was killed: it is not listed; its old votes must neither fail nor block pairs.
    votes = [(9, 1), (2, 9), (1, 2)]
    seen = {frozenset((c.left_id, c.right_id))
            for s in range(40)
            if (c := pairing.choose_pair([1, 2, 3], votes, 1, exploration=1.0, rng=random.Random(s)))}
    assert seen == {frozenset((1, 3)), frozenset((2, 3))}


def test_reported_probabilities_match_the_mixture_and_observed_frequencies():
    ids = list(range(1, 9))
    votes = consistent_votes(ids, [(2, 3), (3, 4), (2, 4), (3, 5), (4, 5), (6, 7), (7, 8), (6, 8), (1, 8), (5, 6),
                                   (1, 6), (2, 7), (3, 8), (4, 7), (5, 8), (1, 7), (2, 8), (4, 8), (2, 6), (1, 5)])
    rng = random.Random(5)
    draws = 3000
    exploration = 0.3
    counts: Counter = Counter()
    reported: dict[frozenset, set] = {}
    strategies: Counter = Counter()
    for _ in range(draws):
        choice = pairing.choose_pair(ids, votes, 3, exploration=exploration, rng=rng)
        pair = frozenset((choice.left_id, choice.right_id))
        counts[pair] += 1
        reported.setdefault(pair, set()).add(round(choice.probability, 12))
        strategies[choice.strategy] += 1
    unvoted = 20
    assert len(counts) == unvoted                                 # exploration reaches every pair
    assert all(len(p) == 1 for p in reported.values())            # one probability per pair
    probability = {pair: next(iter(p)) for pair, p in reported.items()}
    assert sum(probability.values()) == pytest.approx(1.0, abs=1e-9)
    greedy = max(probability, key=probability.get)
    assert probability[greedy] == pytest.approx(1 - exploration + exploration / unvoted)
    assert sorted(probability.values())[-2] == pytest.approx(exploration / unvoted)
    # Observed frequencies agree with the reported probabilities (binomial, 4 standard deviations).
    for pair, p in probability.items():
        sd = (draws * p * (1 - p)) ** 0.5
        assert abs(counts[pair] - draws * p) < 4 * sd + 1
    assert abs(strategies["explore"] - draws * exploration) < 4 * (draws * 0.3 * 0.7) ** 0.5


def test_ties_in_the_greedy_choice_share_its_probability():
    # No votes: nothing tells pairs apart, every pair ties, so the choice is uniform.
    ids = [1, 2, 3, 4, 5, 6]
    for seed in range(5):
        choice = pairing.choose_pair(ids, [], 2, exploration=0.0, rng=random.Random(seed))
        assert choice.probability == pytest.approx(1 / 15)
        assert choice.strategy == "active"
    shown = {frozenset((c.left_id, c.right_id))
             for s in range(200) if (c := pairing.choose_pair(ids, [], 2, exploration=0.0, rng=random.Random(s)))}
    assert len(shown) > 10


def test_no_exploration_is_deterministic_and_focuses_on_the_boundary():
    ids = list(range(1, 11))
    # A clear order 1 > 2 > ... > 10; open pairs around the top-3 boundary and among clear losers.
    open_pairs = [(2, 4), (3, 4), (3, 5), (2, 5), (4, 5), (8, 9), (9, 10), (8, 10), (6, 7)]
    votes = consistent_votes(ids, open_pairs)
    choices = [pairing.choose_pair(ids, votes, 3, exploration=0.0, rng=random.Random(s)) for s in range(6)]
    pairs = {frozenset((c.left_id, c.right_id)) for c in choices}
    assert len(pairs) == 1
    (pair,) = pairs
    assert pair <= {2, 3, 4, 5}                  # around places 3 and 4, not the clear losers
    assert all(c.probability == 1.0 and c.strategy == "active" for c in choices)
    # Sides are a coin flip (a reviewer's left/right bias must not favour older candidates).
    assert {c.left_id for c in choices} == set(pair)


def test_prefers_the_boundary_pair_over_clear_losers():
    ids = list(range(1, 11))
    votes = consistent_votes(ids, [(8, 9), (9, 10), (3, 4)])
    choice = pairing.choose_pair(ids, votes, 3, exploration=0.0, rng=random.Random(0))
    assert {choice.left_id, choice.right_id} == {3, 4}


def test_no_boundary_when_top_k_covers_everyone_still_offers_pairs():
    ids = [1, 2, 3, 4]
    votes = [(1, 2), (3, 4)]
    for top_k in (4, 9):
        choice = pairing.choose_pair(ids, votes, top_k, rng=random.Random(0))
        assert choice.strategy == "explore"
        assert choice.probability == pytest.approx(1 / 4)
        assert frozenset((choice.left_id, choice.right_id)) not in {frozenset((1, 2)), frozenset((3, 4))}


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="top_k"):
        pairing.choose_pair([1, 2, 3], [], 0, rng=random.Random(0))
    with pytest.raises(ValueError, match="exploration"):
        pairing.choose_pair([1, 2, 3], [], 1, exploration=1.5, rng=random.Random(0))
    with pytest.raises(ValueError, match="against itself"):
        pairing.choose_pair([1, 2, 3], [(2, 2)], 1, rng=random.Random(0))
    assert pairing.choose_pair([1], [], 1, rng=random.Random(0)) is None
