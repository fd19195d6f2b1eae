"""The generation tree's rules (docs/rules.md#generation-tree), as pure functions over counts.

- Step 1 makes `n` roots; step k+1 makes `n` children for each of step k's approved top-K.
- Every image is one job in a numbered slot under its parent. A slot is never reused, so a
  failure stays countable and a rerun never makes the same image twice.
- A killed candidate frees its place: the next plan adds one replacement job.
- Three failures under one parent (failed jobs, or images the identity gate turned away) reject
  that parent; for step 1 they close the root group, and the step goes on with what it has.
- A broken workflow fails its step once; nothing is planned for a failed step again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

MAX_FAILURES_PER_PARENT = 3


@dataclass(frozen=True)
class GroupState:
    """What exists under one parent (None: the roots of step 1)."""

    parent_id: int | None
    filled: int = 0  # images that hold a place: active, winner or culled by keep-best
    in_flight: int = 0  # pending or running jobs
    failures: int = 0  # failed jobs + images rejected by the identity gate
    next_slot: int = 0  # one past the highest slot used so far


@dataclass(frozen=True)
class GroupPlan:
    parent_id: int | None
    slots: tuple[int, ...]  # new jobs to create
    exhausted: bool  # three failures: no more jobs under this parent


def plan_group(n: int, state: GroupState) -> GroupPlan:
    """New job slots that bring the group up to `n` images, unless it has failed three times."""
    if n < 1:
        raise ValueError(f"n={n} must be at least 1")
    if state.failures >= MAX_FAILURES_PER_PARENT:
        return GroupPlan(state.parent_id, (), True)
    missing = max(0, n - state.filled - state.in_flight)
    return GroupPlan(state.parent_id, tuple(range(state.next_slot, state.next_slot + missing)), False)


def job_seed(run_id: int, step_position: int, parent_id: int | None, slot: int) -> int:
    """Deterministic per place in the tree, so a manifest's seed reproduces its image and a
    replacement (a new slot) gets a new seed. 31 bits: every backend takes it."""
    key = f"{run_id}:{step_position}:{parent_id or 0}:{slot}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big") & 0x7FFFFFFF


def curation_score(alignment: float | None, identity: float | None) -> float:
    """The order of "generate N, keep the best M": the mean of prompt alignment and identity
    similarity (a missing score counts as the worst possible, -1)."""
    a = -1.0 if alignment is None else alignment
    i = -1.0 if identity is None else identity
    return (a + i) / 2


def keep_best(scored: Sequence[tuple[int, float]], keep: int) -> tuple[list[int], list[int]]:
    """Split (candidate id, score) into (kept, culled): the `keep` highest scores, ties to the
    older (lower) id so the split is the same on every run."""
    ordered = sorted(scored, key=lambda item: (-item[1], item[0]))
    return [cid for cid, _ in ordered[:keep]], [cid for cid, _ in ordered[keep:]]


def passes_identity_gate(identity: float | None, threshold: float | None) -> bool:
    """No threshold: everything passes. A missing score never passes a set threshold."""
    if threshold is None:
        return True
    return identity is not None and identity >= threshold
