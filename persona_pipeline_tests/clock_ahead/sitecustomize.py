"""Started by every Python process of the clock-ahead run (`.ci/clock-ahead` puts this folder on
PYTHONPATH): the wall clock (time.time, datetime.now, ...) of the tests and of every Python process
they start (Dagster's daemon and code servers, the review form, killed and resumed runs) moves
PERSONA_TEST_CLOCK_AHEAD_DAYS days ahead and keeps ticking. Monotonic time, sleeps and timeouts stay
real, so only a test that depends on today's date can fail here."""

import os

_days = os.environ.get("PERSONA_TEST_CLOCK_AHEAD_DAYS")
if _days:
    from datetime import datetime, timedelta, timezone

    import time_machine

    _travel = time_machine.travel(datetime.now(timezone.utc) + timedelta(days=int(_days)), tick=True)
    _travel.start()
