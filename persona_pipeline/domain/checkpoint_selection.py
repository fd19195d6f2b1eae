"""Pick the best LoRA checkpoint of a training run from two scores per checkpoint: identity (how
much its samples look like the persona) and alignment (how well they follow the prompt).

The two metrics live on different scales, so each is min-max normalised across the run's
checkpoints before mixing: combined = w * identity_norm + (1 - w) * alignment_norm. A metric equal
on every checkpoint carries no information and normalises to 0.5 for all.

Ranking is by combined score, descending. Ties (combined equal to 12 decimals, so float noise
does not decide) go to the higher raw identity score, then the later step (it has seen more of the
data at equal quality), then the file name, so the order never depends on the input order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class CheckpointScore:
    step: int
    file: str
    identity: float
    alignment: float


@dataclass(frozen=True)
class RankedCheckpoint:
    step: int
    file: str
    identity: float
    alignment: float
    combined: float
    rank: int  # 1 = best


def _min_max(values: Sequence[float]) -> list[float]:
    low, high = min(values), max(values)
    if high == low:
        return [0.5] * len(values)
    return [(v - low) / (high - low) for v in values]


def rank_checkpoints(scores: Sequence[CheckpointScore], identity_weight: float = 0.5) -> list[RankedCheckpoint]:
    """All checkpoints, best first, with their combined score and 1-based rank."""
    if not scores:
        raise ValueError("no checkpoint scores to rank")
    if not 0.0 <= identity_weight <= 1.0:
        raise ValueError(f"identity_weight={identity_weight} must be in [0, 1]")
    for s in scores:
        if not (math.isfinite(s.identity) and math.isfinite(s.alignment)):
            raise ValueError(f"checkpoint {s.file} (step {s.step}) has a non-finite score")
    identity = _min_max([s.identity for s in scores])
    alignment = _min_max([s.alignment for s in scores])
    combined = [identity_weight * i + (1.0 - identity_weight) * a for i, a in zip(identity, alignment)]
    order = sorted(range(len(scores)),
                   key=lambda k: (-round(combined[k], 12), -scores[k].identity, -scores[k].step, scores[k].file))
    return [RankedCheckpoint(step=scores[k].step, file=scores[k].file, identity=scores[k].identity,
                             alignment=scores[k].alignment, combined=combined[k], rank=position)
            for position, k in enumerate(order, start=1)]


def select_best(scores: Sequence[CheckpointScore], identity_weight: float = 0.5) -> RankedCheckpoint:
    """The rank-1 checkpoint; ValueError on an empty list."""
    return rank_checkpoints(scores, identity_weight)[0]
