"""EXPLAIN for bench/scale.py and its test: capture the statements some work runs on PostgreSQL,
then ask the planner how it would run each one, and report sequential scans on the tables that
grow with history."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence

from sqlalchemy import event

from persona_pipeline.db.session import get_engine


@contextlib.contextmanager
def capture(url: str) -> Iterator[list[tuple[str, object]]]:
    """The SELECT statements (with their parameters) run on `url`'s engine inside the block."""
    engine = get_engine(url)
    seen: list[tuple[str, object]] = []

    def keep(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("SELECT") and not executemany:
            seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", keep)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", keep)


def _scans(node: dict, tables: Sequence[str]) -> Iterator[str]:
    if node.get("Node Type") == "Seq Scan" and node.get("Relation Name") in tables:
        yield node["Relation Name"]
    for child in node.get("Plans", []):
        yield from _scans(child, tables)


def seq_scans(url: str, statements: list[tuple[str, object]], tables: Sequence[str], *,
              allow_seqscan: bool) -> list[str]:
    """"<table> in: <statement>" for each planned sequential scan on `tables`. With
    `allow_seqscan=False` the planner avoids them wherever an index can serve (the check on a small
    fixture, where a scan of a few rows would win anyway); what remains has no usable index."""
    found = []
    raw = get_engine(url).raw_connection()
    try:
        with raw.cursor() as cur:
            if not allow_seqscan:
                cur.execute("SET enable_seqscan = off")
            for statement, parameters in dict.fromkeys((s, repr(p)) for s, p in statements):
                params = next(p for s, p in statements if s == statement and repr(p) == parameters)
                cur.execute("EXPLAIN (FORMAT JSON) " + statement, params)
                plan = cur.fetchone()[0]
                plan = json.loads(plan) if isinstance(plan, str) else plan
                for table in _scans(plan[0]["Plan"], tables):
                    text = " ".join(statement.split())
                    found.append(f"{table} in: ... {text[text.find(' FROM '):][:300]}")
        raw.rollback()
    finally:
        raw.close()
    return found
