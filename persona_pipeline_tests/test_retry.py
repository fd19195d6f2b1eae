"""The shared retry waits: exponential backoff with bounded jitter, and Retry-After parsing."""

from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

from persona_pipeline.domain.retry import backoff_wait, parse_retry_after


def test_backoff_doubles_with_at_most_a_quarter_of_jitter_and_is_capped():
    for attempt in range(5):
        wait = backoff_wait(0.5, attempt, cap_s=60)
        assert 0.5 * 2 ** attempt <= wait <= 0.5 * 2 ** attempt * 1.25
    assert backoff_wait(10, 10, cap_s=60) == 60


def test_retry_after_takes_seconds_or_an_http_date_and_ignores_garbage():
    now = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after("-3", now) == 0.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=90), usegmt=True), now) == 90.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=90), usegmt=True), now) == 0.0
    assert parse_retry_after("soon", now) is None and parse_retry_after(None, now) is None and parse_retry_after("", now) is None
