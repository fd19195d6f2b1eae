"""When a post's insights are read, which metrics the targeted Graph API version knows, and how fast
the collector may call: the pure rules of insight collection (docs/insights.md#collection).

- Reads at about +1 h, +24 h, +72 h and +7 d after publishing (READ_AGES_H); a run that comes late
  reads the latest age that has passed (a value read at 30 h is not the 1-hour value, so the
  1-hour read is skipped rather than mislabelled). After the 7-day read the post is frozen.
- Graph API v23.0 media metrics (Instagram API with Facebook Login, `GET /{ig-media-id}/insights`):
  reach, views, likes, comments, saved, shares, total_interactions. `impressions`, `plays`,
  `video_views` and the reels play counts were deprecated in v22.0 in favour of `views`.
- Usage: every answer carries X-App-Usage ({"call_count", "total_cputime", "total_time"}, percent
  of the app's hourly allowance) and X-Business-Use-Case-Usage ({id: [{"type", "call_count",
  "total_cputime", "total_time", "estimated_time_to_regain_access"}]}, per account). Below
  SLOW_FROM percent the collector calls freely; between SLOW_FROM and 100 it waits longer the
  closer it gets (linear up to `max_pause_s`); at 100 percent, or when Meta names a time to
  regain access, that account stops for this run and resumes at the next (nothing is lost: its
  reads stay due).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

GRAPH_API_VERSION = "v23.0"
READ_AGES_H = (1, 24, 72, 168)
MEDIA_METRICS = ("reach", "views", "likes", "comments", "saved", "shares", "total_interactions")
DEPRECATED_METRICS = {"impressions": "views", "plays": "views", "video_views": "views",
                      "clips_replays_count": "views", "ig_reels_aggregated_all_plays_count": "views"}
ACCOUNT_METRICS = ("followers", "reach")
SLOW_FROM = 75.0


def due_age(published_at: datetime, now: datetime, last_age: int | None) -> int | None:
    """The scheduled age (hours) to read now, or None when no new one has passed."""
    age_h = (now - published_at).total_seconds() / 3600
    passed = [a for a in READ_AGES_H if a <= age_h and (last_age is None or a > last_age)]
    return passed[-1] if passed else None


def is_final(age_hours: int) -> bool:
    return age_hours >= READ_AGES_H[-1]


def refused_metric(message: str, requested: tuple[str, ...]) -> str | None:
    """Which of `requested` a Graph error about metrics names: "the impressions metric is no longer
    supported" names it; "metric[2] must be one of ..." names it by position."""
    position = re.search(r"metric\[(\d+)\]", message)
    if position and int(position.group(1)) < len(requested):
        return requested[int(position.group(1))]
    for metric in sorted(requested, key=len, reverse=True):
        if re.search(rf"\b{re.escape(metric)}\b", message):
            return metric
    return None


@dataclass(frozen=True)
class Usage:
    """The highest percentage any usage header reports, and the wait Meta asks for (seconds)."""

    percent: float = 0.0
    regain_s: float = 0.0


def parse_usage(headers: Mapping[str, str]) -> Usage:
    """Usage from X-App-Usage and X-Business-Use-Case-Usage; unreadable headers count as unknown (0)."""
    percents: list[float] = []
    regain = 0.0
    try:
        app = json.loads(headers.get("X-App-Usage") or "{}")
        percents += [float(app.get(k) or 0) for k in ("call_count", "total_cputime", "total_time")]
    except (ValueError, AttributeError, TypeError):
        pass
    try:
        business = json.loads(headers.get("X-Business-Use-Case-Usage") or "{}")
        for entries in business.values():
            for entry in entries:
                percents += [float(entry.get(k) or 0) for k in ("call_count", "total_cputime", "total_time")]
                regain = max(regain, float(entry.get("estimated_time_to_regain_access") or 0) * 60)
    except (ValueError, AttributeError, TypeError):
        pass
    return Usage(max(percents, default=0.0), regain)


def pace(usage: Usage, max_pause_s: float) -> float | None:
    """Seconds to wait before the next call; None: stop this account for this run."""
    if usage.regain_s > 0 or usage.percent >= 100:
        return None
    if usage.percent < SLOW_FROM:
        return 0.0
    return max_pause_s * (usage.percent - SLOW_FROM) / (100 - SLOW_FROM)
