"""Waits between retries of an outside service, shared by the Gemini and Instagram clients."""

from __future__ import annotations

import random
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime


def backoff_wait(base_s: float, attempt: int, cap_s: float) -> float:
    """base · 2^attempt, plus up to 25 % jitter so parallel workers do not retry in step, capped."""
    return min(cap_s, base_s * 2 ** attempt * random.uniform(1.0, 1.25))


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds a Retry-After header asks for: delay-seconds or an HTTP date (RFC 9110). None when
    absent or unparseable, so the caller's own backoff decides."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (moment - (now or datetime.now(timezone.utc))).total_seconds())
