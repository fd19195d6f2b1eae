"""Reading what a request carries (ids, form text, a local date and time, hashtags), refusing bad
input with a 400 that names the field, and showing times in a persona's timezone."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request

MAX_ID = 2**31 - 1  # ids above this are not ours (and would overflow PostgreSQL's integer)


class BadInput(HTTPException):
    def __init__(self, detail: str) -> None:
        super().__init__(400, detail)


def path_id(request: Request, name: str) -> int:
    """A positive id from the path (the `int` converter already refused non-digits)."""
    value = request.path_params[name]
    if not 1 <= value <= MAX_ID:
        raise HTTPException(404, f"{name.replace('_id', '')} {value} does not exist")
    return value


def int_value(raw: Any, name: str, *, optional: bool = False) -> int | None:
    """A positive id or count from a form or JSON body, else 400 naming the field."""
    if raw is None or raw == "":
        if optional:
            return None
        raise BadInput(f"{name} is missing")
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise BadInput(f"{name} must be a positive integer, got {raw!r}")
    if isinstance(raw, str):
        if not raw.strip().isdigit():
            raise BadInput(f"{name} must be a positive integer, got {raw[:40]!r}")
        raw = int(raw.strip())
    if not 1 <= raw <= MAX_ID:
        raise BadInput(f"{name} must be a positive integer, got {raw}")
    return raw


def form_text(form: FormData, name: str, max_len: int = 5000) -> str:
    value = form.get(name, "")
    if not isinstance(value, str):
        raise BadInput(f"{name} must be text")
    if len(value) > max_len:
        raise BadInput(f"{name} is {len(value)} characters; at most {max_len}")
    return value


def local_zone(name: str) -> ZoneInfo:
    """The persona's timezone; UTC for a name this machine does not know, so the page still shows."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def format_time(dt: datetime | None, zone: ZoneInfo | None = None) -> str:
    if dt is None:
        return ""
    return dt.astimezone(zone or timezone.utc).strftime("%Y-%m-%d %H:%M")


def parse_local_slot(value: str, tz_name: str) -> datetime:
    """A datetime-local value ("2025-06-01T14:30") read in the persona's timezone, as an aware
    datetime. A wall time that does not exist there (the spring DST gap) is refused."""
    try:
        naive = datetime.strptime(value.strip()[:16], "%Y-%m-%dT%H:%M")
    except ValueError:
        raise BadInput(f"new_time {value[:40]!r} is not a date and time like 2025-06-01T14:30") from None
    zone = local_zone(tz_name)
    aware = naive.replace(tzinfo=zone)
    if aware.astimezone(timezone.utc).astimezone(zone).replace(tzinfo=None) != naive:
        raise BadInput(f"new_time {value[:16]} does not exist in {tz_name} (clocks jump over it)")
    return aware


def split_hashtags(raw: str) -> list[str]:
    """Hashtags typed as words separated by spaces or commas; `#` is optional."""
    return [t for t in re.split(r"[\s,]+", raw) if t]
