"""The generation tree's pure rules (domain/generation_plan.py)."""

import pytest

from persona_pipeline.domain import generation_plan as plan


def test_a_group_is_filled_up_to_n_with_fresh_slots():
    assert plan.plan_group(4, plan.GroupState(None)).slots == (0, 1, 2, 3)
    # two made, one in flight, one killed earlier (slot 3 used): one new job in slot 4
    state = plan.GroupState(7, filled=2, in_flight=1, failures=0, next_slot=4)
    assert plan.plan_group(4, state) == plan.GroupPlan(7, (4,), False)
    assert plan.plan_group(2, plan.GroupState(7, filled=3)).slots == ()


@pytest.mark.parametrize("failures, exhausted", [(0, False), (2, False), (3, True), (5, True)])
def test_three_failures_close_a_group(failures, exhausted):
    result = plan.plan_group(2, plan.GroupState(9, failures=failures, next_slot=failures))
    assert result.exhausted is exhausted
    assert (result.slots == ()) is exhausted


def test_n_must_be_positive():
    with pytest.raises(ValueError, match="n=0"):
        plan.plan_group(0, plan.GroupState(None))


def test_seeds_are_deterministic_distinct_and_31_bit():
    seeds = {plan.job_seed(run, step, parent, slot) for run in (1, 2) for step in (1, 2)
             for parent in (None, 5) for slot in range(4)}
    assert len(seeds) == 32 and all(0 <= s < 2**31 for s in seeds)
    assert plan.job_seed(3, 1, None, 0) == plan.job_seed(3, 1, None, 0)
    assert plan.job_seed(3, 1, None, 0) == plan.job_seed(3, 1, 0, 0)  # no parent and parent key 0 are one place


def test_keep_best_orders_by_score_then_older_id():
    kept, culled = plan.keep_best([(5, 0.2), (3, 0.9), (4, 0.2), (6, -0.1)], 2)
    assert kept == [3, 4] and culled == [5, 6]
    assert plan.curation_score(0.4, 0.2) == pytest.approx(0.3)
    assert plan.curation_score(None, 0.5) == pytest.approx(-0.25)


def test_identity_gate():
    assert plan.passes_identity_gate(0.1, None) and plan.passes_identity_gate(None, None)
    assert plan.passes_identity_gate(0.3, 0.3) and not plan.passes_identity_gate(0.29, 0.3)
    assert not plan.passes_identity_gate(None, 0.0)
