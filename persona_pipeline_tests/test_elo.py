"""Elo exactly as docs/rules.md#elo states it, worked values included."""

import pytest

from persona_pipeline.domain import elo


@pytest.mark.parametrize("winner, loser, expected", [
    (1000, 1000, (1016, 984)),
    (800, 1200, (829, 1171)),
    (1200, 800, (1203, 797)),
])
def test_reference_check_values(winner, loser, expected):
    assert elo.apply_vote(winner, loser) == expected


def test_halves_round_away_from_zero_not_to_even():
    assert elo.round_half_away_from_zero(2.5) == 3  # Python's round gives 2
    assert elo.round_half_away_from_zero(-2.5) == -3
    assert elo.round_half_away_from_zero(0.5) == 1
    assert elo.round_half_away_from_zero(-0.4) == 0


def test_both_changes_use_pre_vote_scores():
    # 1016 beats 984: E = 1/(1+10^(-32/400)) = 0.5460; change round(32*0.4540) = 15 both ways
    assert elo.apply_vote(1016, 984) == (1031, 969)


def test_replay_is_ordered_and_rejects_self_votes():
    # 1000v1000 → 1016/984; 1016 beats 1000 → +15 (1031/985); 984 beats 985 → +16 (1000/969)
    standings = elo.replay([1, 2, 3], [(1, 2), (1, 3), (2, 3)])
    assert {s.candidate_id: s.elo for s in standings.values()} == {1: 1031, 2: 1000, 3: 969}
    assert standings[1].wins == 2 and standings[3].losses == 2
    with pytest.raises(ValueError, match="against itself"):
        elo.replay([1], [(1, 1)])


def test_rank_breaks_ties_deterministically():
    standings = {
        5: elo.Standing(5, 1016, 1, 0),
        2: elo.Standing(2, 1016, 1, 0),
        9: elo.Standing(9, 1016, 2, 1),
        1: elo.Standing(1, 984, 0, 1),
    }
    assert [s.candidate_id for s in elo.rank(standings)] == [9, 2, 5, 1]
