"""Render the reliability figures (JSON lines written by the suite's `figure` fixture) as the markdown
list of docs/reliability.md: `python -m persona_pipeline_tests.reliability.report figures.jsonl`.

One numbered item per case (area, seconds, case), with what held and the measured figures under it,
wrapped so that no line is longer than the docs allow (200 characters)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

AREAS = ["fault", "load", "bad input", "security"]
WIDTH = 110  # well under the docs' 200-character line limit, and readable as plain text


def render(rows: list[dict]) -> str:
    rows = sorted(rows, key=lambda r: (AREAS.index(r["area"]) if r["area"] in AREAS else len(AREAS), r["case"]))
    lines = []
    for number, row in enumerate(rows, 1):
        figures = ", ".join(f"{k}={v}" for k, v in row["numbers"].items())
        marker = f"{number}. "
        inner = " " * len(marker)  # nested items line up with the item's text, as markdown wants
        lines += _wrapped(f"**{row['area']}** ({row['seconds']} s): {row['case']}", marker, inner)
        lines += _wrapped(f"held: {row['outcome']}", inner + "- ", inner + "  ")
        lines += _wrapped(f"figures: {figures}", inner + "- ", inner + "  ")
    return "\n".join(lines)


def _wrapped(text: str, first: str, rest: str) -> list[str]:
    """`text` as a markdown list item: `first` opens it, `rest` indents its continuation lines."""
    return textwrap.wrap(text, width=WIDTH, initial_indent=first, subsequent_indent=rest,
                         break_long_words=False, break_on_hyphens=False)


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
