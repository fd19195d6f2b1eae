"""Review-form test helpers: review data and the form's server come from persona_fakes (review.py,
serving.py); racing_votes makes two votes overlap for the concurrency tests."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from persona_fakes.review import ReviewSeed, seed_review  # noqa: F401  (the tests import them from here)
from persona_fakes.serving import serve_app  # noqa: F401
from persona_pipeline.db import models
from persona_pipeline.db.session import get_engine


@contextmanager
def racing_votes(url: str, timeout_s: float = 20) -> Iterator[None]:
    """While open, the first flush of each session that adds a vote waits until a second vote is
    racing it, so two votes sent at once really overlap every time: on SQLite (no row locks) until
    a second session reaches its flush too, both having passed every check; on PostgreSQL until
    another connection is blocked on a row lock, i.e. inside its own vote. A vote that never comes
    fails the wait (BrokenBarrierError or TimeoutError) instead of hanging."""
    sqlite = make_url(url).get_backend_name() == "sqlite"
    barrier = threading.Barrier(2, timeout=timeout_s)
    held: weakref.WeakSet = weakref.WeakSet()

    def lock_waiter() -> None:
        deadline = time.monotonic() + timeout_s
        query = text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'")
        with get_engine(url).connect() as conn:
            while not conn.execute(query).scalar():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no second vote blocked on a lock within {timeout_s} s")
                time.sleep(0.01)

    def hold(session, _context, _instances) -> None:
        if session in held or not any(isinstance(row, models.Vote) for row in session.new):
            return
        held.add(session)
        barrier.wait() if sqlite else lock_waiter()

    event.listen(Session, "before_flush", hold)
    try:
        yield
    finally:
        event.remove(Session, "before_flush", hold)
