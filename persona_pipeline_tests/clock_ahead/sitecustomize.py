"""Started by every Python process of the clock-ahead run (`.ci/clock-ahead` puts this folder on
PYTHONPATH): the wall clock (time.time, datetime.now, ...) of the tests and of every Python process
they start (Dagster's daemon, its run workers, the review form, killed and resumed runs) moves
PERSONA_TEST_CLOCK_AHEAD_DAYS days ahead and keeps ticking. Monotonic time, sleeps and timeouts stay
real, so only a test that depends on today's date can fail here.

One exception: a Dagster gRPC code server (`dagster api grpc`) keeps the real clock. gRPC's server
loop takes its poll deadlines from time.time() and hands them to its C core, which reads the real
clock, and under a moved clock it answers no call at all (a bare grpcio server in one process
hangs the same way). It only evaluates what the daemon asks for: schedule ticks arrive with the
daemon's (moved) tick time, and the runs it starts are new processes on the moved clock again."""

import os
import sys

_days = os.environ.get("PERSONA_TEST_CLOCK_AHEAD_DAYS")
_grpc_server = sys.argv[1:3] == ["api", "grpc"]
if _days and not _grpc_server:
    from datetime import datetime, timedelta, timezone

    import time_machine

    _travel = time_machine.travel(datetime.now(timezone.utc) + timedelta(days=int(_days)), tick=True)
    _travel.start()
