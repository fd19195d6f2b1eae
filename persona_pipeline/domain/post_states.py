"""The one post status model. Every status change goes through `check_transition`."""

from __future__ import annotations

DRAFT = "draft"
AWAITING_APPROVAL = "awaiting_approval"
SCHEDULED = "scheduled"
PUBLISHING = "publishing"
PUBLISHED = "published"
FAILED = "failed"
ABANDONED = "abandoned"
CANCELLED = "cancelled"

TRANSITIONS: dict[str, frozenset[str]] = {
    DRAFT: frozenset({AWAITING_APPROVAL, CANCELLED}),
    AWAITING_APPROVAL: frozenset({SCHEDULED, DRAFT, CANCELLED}),
    SCHEDULED: frozenset({PUBLISHING, AWAITING_APPROVAL, CANCELLED}),
    PUBLISHING: frozenset({PUBLISHED, FAILED}),
    FAILED: frozenset({SCHEDULED, ABANDONED}),
    PUBLISHED: frozenset(),
    ABANDONED: frozenset(),
    CANCELLED: frozenset(),
}

# A post in one of these still holds its image: the image is not offered to another post.
HOLDS_IMAGE = frozenset({DRAFT, AWAITING_APPROVAL, SCHEDULED, PUBLISHING, PUBLISHED, FAILED})


class IllegalTransition(ValueError):
    pass


def check_transition(current: str, new: str) -> None:
    if current not in TRANSITIONS:
        raise IllegalTransition(f"unknown post status {current!r}")
    if new not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "none (final)"
        raise IllegalTransition(f"post status {current!r} cannot become {new!r}; allowed: {allowed}")
