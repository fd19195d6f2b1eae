"""The reliability suite: faults, load, bad input and security, each measured. Every test records
what it measured with the `figure` fixture; with PERSONA_RELIABILITY_FIGURES=<file> set, the
figures are appended there as JSON lines, and `python -m persona_pipeline_tests.reliability.report
<file>` turns them into the list in docs/reliability.md."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest


@pytest.fixture
def figure(request):
    """figure(area, case, outcome, **numbers): one row of the reliability table.

    `area` is fault|load|bad input|security; `case` says what was done; `outcome` says what held,
    in words, from the measured values (never a constant written in advance)."""
    started = time.perf_counter()

    def record(area: str, case: str, outcome: str, **numbers) -> None:
        row = {"test": request.node.nodeid, "area": area, "case": case, "outcome": outcome,
               "numbers": numbers, "seconds": round(time.perf_counter() - started, 2)}
        request.node.user_properties.append(("reliability", row))
        target = os.environ.get("PERSONA_RELIABILITY_FIGURES")
        if target:
            with Path(target).open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row, default=str) + "\n")

    return record
