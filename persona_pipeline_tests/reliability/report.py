"""Render the reliability figures (JSON lines written by the suite's `figure` fixture) as one
markdown table: `python -m persona_pipeline_tests.reliability.report figures.jsonl`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

AREAS = ["fault", "load", "bad input", "security"]


def render(rows: list[dict]) -> str:
    rows = sorted(rows, key=lambda r: (AREAS.index(r["area"]) if r["area"] in AREAS else len(AREAS), r["case"]))
    lines = ["| area | case | what held | figures | s |", "|---|---|---|---|---:|"]
    for row in rows:
        numbers = ", ".join(f"{k}={v}" for k, v in row["numbers"].items())
        lines.append(f"| {row['area']} | {row['case']} | {row['outcome']} | {numbers} | {row['seconds']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m persona_pipeline_tests.reliability.report FIGURES.jsonl", file=sys.stderr)
        return 2
    path = Path(args[0])
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    print(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
