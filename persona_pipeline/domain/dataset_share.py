"""The bound on a dataset's generated share (persona.yaml `flywheel.max_generated_share`): at most
that share of a dataset's images may be generated (edits, winners, posts), so a LoRA does not drift
into its own artefacts. training_dataset applies it, here, once, to the accepted candidates."""

from __future__ import annotations

import math
from typing import Sequence, TypeVar

T = TypeVar("T")


def generated_allowance(photos: int, max_share: float) -> int:
    """The most generated images `photos` uploaded photos allow: n / (photos + n) <= max_share."""
    if not 0 <= max_share < 1:
        raise ValueError(f"max_generated_share {max_share} must be at least 0 and below 1")
    return math.floor(max_share * photos / (1 - max_share) + 1e-9)


def bound_generated(photos: int, candidates: Sequence[T], max_share: float) -> tuple[list[T], list[T], str | None]:
    """(included, left out, reason): `candidates` in the order given (already-built ones first, then
    oldest accepted), cut at the allowance. Those left out stay accepted for a later version."""
    allowed = generated_allowance(photos, max_share)
    included, left = list(candidates[:allowed]), list(candidates[allowed:])
    reason = None
    if left:
        reason = (f"generated share bound: {photos} uploaded photo(s) allow at most {allowed} generated image(s) "
                  f"(flywheel.max_generated_share {max_share:g}); {len(left)} accepted candidate(s) wait for a later "
                  "version with more photos")
    return included, left, reason
