"""Elo exactly as the older voting system computed it (docs/rules.md#elo).

K = 32, every candidate starts at 1000, scores are whole numbers, the change is
round(32·(S − E)) with halves rounded away from zero, and both sides use the pre-vote scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

K_FACTOR = 32
START_RATING = 1000


def expected_score(rating_self: int, rating_opponent: int) -> float:
    return 1.0 / (1.0 + 10 ** ((rating_opponent - rating_self) / 400))


def round_half_away_from_zero(value: float) -> int:
    # Python's round() rounds halves to even, which the older system did not do.
    return int(math.copysign(math.floor(abs(value) + 0.5), value))


def elo_delta(winner_rating: int, loser_rating: int) -> int:
    """Points the winner gains (and the loser loses) for one vote."""
    return round_half_away_from_zero(K_FACTOR * (1.0 - expected_score(winner_rating, loser_rating)))


def apply_vote(winner_rating: int, loser_rating: int) -> tuple[int, int]:
    """New (winner, loser) ratings after one vote, both computed from the pre-vote ratings."""
    winner_gain = elo_delta(winner_rating, loser_rating)
    loser_change = round_half_away_from_zero(K_FACTOR * (0.0 - expected_score(loser_rating, winner_rating)))
    return winner_rating + winner_gain, loser_rating + loser_change


@dataclass(frozen=True)
class Standing:
    candidate_id: int
    elo: int
    wins: int
    losses: int

    @property
    def votes(self) -> int:
        return self.wins + self.losses


def replay(candidate_ids: Iterable[int], votes: Iterable[tuple[int, int]]) -> dict[int, Standing]:
    """Replay (winner, loser) votes in order from 1000 for every candidate."""
    ratings = {cid: START_RATING for cid in candidate_ids}
    wins = {cid: 0 for cid in ratings}
    losses = {cid: 0 for cid in ratings}
    for winner, loser in votes:
        if winner == loser:
            raise ValueError(f"candidate {winner} cannot win against itself")
        for cid in (winner, loser):
            ratings.setdefault(cid, START_RATING)
            wins.setdefault(cid, 0)
            losses.setdefault(cid, 0)
        ratings[winner], ratings[loser] = apply_vote(ratings[winner], ratings[loser])
        wins[winner] += 1
        losses[loser] += 1
    return {cid: Standing(cid, ratings[cid], wins[cid], losses[cid]) for cid in ratings}


def rank(standings: Mapping[int, Standing]) -> list[Standing]:
    """Best first. Ties are broken deterministically: higher Elo, then more wins, then fewer
    losses, then the older candidate (lower id), never at random."""
    return sorted(standings.values(), key=lambda s: (-s.elo, -s.wins, s.losses, s.candidate_id))
