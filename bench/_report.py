"""The benchmarks' machine-readable results, shared by every `bench/*.py` and by `bench/run_all`.

A benchmark records each comparison it makes with `record(...)` while it prints its own human
report, and `emit()` prints them at the very end, one line each:

    BENCH_RESULT {"name": "bt_fit", "metric": "...", "reference": 0.1, "ours": 0.009, "unit": "s",
                  "better": "lower", "ratio": 11.1, "target": "...", "ok": true, "note": "..."}

- `reference` / `ours`: the two sides' values in `unit`; `reference` is null for a figure of ours
  that has a target but no reference side (then `ratio` is null too).
- `better`: whether a lower or a higher value is better for this metric.
- `ratio`: how many times better ours is, whatever the direction: reference/ours when lower is
  better (times, latencies, votes, memory), ours/reference when higher is better (rates). Above 1
  means ours is better.
- `target` (text) and `ok` (true/false, or null without a target): the benchmark's own target for
  this figure and whether it was met, as its RESULT lines say.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

PREFIX = "BENCH_RESULT "
SKIP_PREFIX = "BENCH_SKIPPED "
_RECORDED: list[dict] = []


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (q in 0..1) as the value at the nearest index of the sorted values (no
    interpolation: a latency reported is one that was measured); NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def ratio(reference: float | None, ours: float | None, better: str) -> float | None:
    """How many times better ours is: reference/ours if lower is better, ours/reference if higher."""
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower' or 'higher', not {better!r}")
    if reference is None or ours is None:
        return None
    numerator, denominator = (reference, ours) if better == "lower" else (ours, reference)
    if denominator == 0:
        return math.inf if numerator else None
    return numerator / denominator


def result(name: str, metric: str, *, reference: float | None, ours: float, unit: str, better: str,
           target: str = "", ok: bool | None = None, note: str = "") -> dict:
    """One result as a dict (the BENCH_RESULT line's content), ratio computed here."""
    reference = None if reference is None else float(reference)
    ours = float(ours)
    value = ratio(reference, ours, better)
    return {"name": name, "metric": metric, "reference": reference, "ours": ours, "unit": unit, "better": better,
            "ratio": None if value is None or not math.isfinite(value) else value, "target": target,
            "ok": None if ok is None else bool(ok), "note": note}


def record(metric: str, *, reference: float | None, ours: float, unit: str, better: str, target: str = "",
           ok: bool | None = None, note: str = "", name: str | None = None) -> dict:
    """Keep a result for `emit()`; the name defaults to the running script's file name."""
    entry = result(name or Path(sys.argv[0]).stem, metric, reference=reference, ours=ours, unit=unit,
                   better=better, target=target, ok=ok, note=note)
    _RECORDED.append(entry)
    return entry


def line(entry: dict) -> str:
    return PREFIX + json.dumps(entry, ensure_ascii=False)


def emit() -> None:
    """Print the recorded results, one BENCH_RESULT line each (the benchmark's last lines)."""
    if _RECORDED:
        print()
    for entry in _RECORDED:
        print(line(entry))
    sys.stdout.flush()
    _RECORDED.clear()


def skip(reason: str) -> None:
    """Say that this machine cannot run the benchmark (a GPU benchmark without CUDA) and why; with
    exit status 0 and no results, run_all shows the row as SKIPPED instead of FAILED."""
    print(SKIP_PREFIX + " ".join(reason.split()), flush=True)


def skipped(text: str) -> str | None:
    """The reason a benchmark gave for skipping, or None."""
    return next((raw[len(SKIP_PREFIX):] for raw in text.splitlines() if raw.startswith(SKIP_PREFIX)), None)


def parse(text: str) -> list[dict]:
    """The BENCH_RESULT entries in a benchmark's output, in order."""
    out = []
    for raw in text.splitlines():
        if raw.startswith(PREFIX):
            out.append(json.loads(raw[len(PREFIX):]))
    return out
