"""Where insights come from: one protocol, two sources (docs/insights.md#collection).

`InsightSource.read(account, token, reads)` reads one account's due posts and its day's numbers and
returns an `AccountReading`: per post the metric values, or why there are none (deleted on
Instagram, another account's media, a refused metric), and why the account stopped early (token
expired, throttled). It never raises for one post's problem: each is recorded and the rest go on.

- `GraphInsightSource`: the Instagram Graph API (v23.0 metric names, domain/insight_reads.py)
  through `InstagramGraphClient`, pacing itself by the usage headers.
- `SimulatedInsightSource`: the outbox's dry run, from the seeded simulated audience
  (domain/audience.py); everything it returns is marked simulated.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Protocol
from zoneinfo import ZoneInfo

from persona_pipeline.domain import insight_reads as rules
from persona_pipeline.domain.audience import SimulatedAudience, local_hour
from persona_pipeline.resources import instagram
from persona_pipeline.resources.instagram import GraphError, InstagramGraphClient


@dataclass(frozen=True)
class DueRead:
    """One post's read that is due: its media id on Instagram, when it went out, which age."""

    post_id: int
    media_id: str
    account: str
    published_at: datetime
    age_hours: int
    pillar: str | None = None
    tz: str = "UTC"
    followers: float | None = None


@dataclass
class AccountReading:
    values: dict[int, dict[str, int]] = field(default_factory=dict)  # post id -> metric -> value
    refused: dict[int, dict[str, str]] = field(default_factory=dict)  # post id -> metric -> why
    deleted: dict[int, str] = field(default_factory=dict)  # post id -> why polling stops
    foreign: dict[int, str] = field(default_factory=dict)  # post id -> why (another account's media)
    account_day: dict[str, float] = field(default_factory=dict)  # followers, reach
    stopped: str | None = None  # why the account's reads stopped early (the rest stay due)
    simulated: bool = False
    calls: int = 0
    max_usage: float = 0.0


class InsightSource(Protocol):
    def read(self, account: str, token: str | None, reads: list[DueRead], day: date) -> AccountReading: ...


class GraphInsightSource:
    """Insights from the Graph API, one account per call (threads run accounts in parallel), with
    up to `in_flight` of the account's reads at once: usage limits count calls per hour, not
    concurrency, and one read after another would spend most of its time waiting for answers."""

    def __init__(self, client: InstagramGraphClient, max_pause_s: float = 30.0, in_flight: int = 4) -> None:
        self.client = client
        self.max_pause_s = max_pause_s
        self.in_flight = max(1, in_flight)

    def read(self, account: str, token: str | None, reads: list[DueRead], day: date) -> AccountReading:
        result = AccountReading()
        if not token:
            result.stopped = "no token: the persona's instagram.token_env variable is empty"
            return result
        usage = {"now": rules.Usage()}
        lock = threading.Lock()
        stops: list[str] = []

        def seen(headers) -> None:
            with lock:
                usage["now"] = rules.parse_usage(headers)
                result.max_usage = max(result.max_usage, usage["now"].percent)

        def one(read: DueRead) -> None:
            if stops:
                return  # the account stopped: this read stays due for the next run
            if read.account != account:
                result.foreign[read.post_id] = (f"media {read.media_id} belongs to account {read.account}, not "
                                                f"{account}: its insights are not read with this account's token")
                return
            with lock:
                now = usage["now"]
            wait = rules.pace(now, self.max_pause_s)
            if wait is None:
                stops.append(f"usage at {now.percent:.0f}% (regain in {now.regain_s:.0f} s): "
                             "the remaining reads wait for the next run")
                return
            if wait:
                instagram.sleep(wait)
            stop = self._read_media(read, token, result, seen, lock)
            if stop:
                stops.append(stop)

        with ThreadPoolExecutor(max_workers=self.in_flight, thread_name_prefix="insights-read") as pool:
            list(pool.map(one, reads))
        if stops:
            result.stopped = stops[0]
            return result
        try:
            result.account_day = self._account(account, token, seen)
            result.calls += 2
        except GraphError as exc:
            result.stopped = f"account insights: {exc}"
        return result

    def _read_media(self, read: DueRead, token: str, result: AccountReading, seen, lock=None) -> str | None:
        """Read one post into `result`; the reason the whole account must stop, if it must."""
        metrics = rules.MEDIA_METRICS
        while metrics:
            try:
                with lock or threading.Lock():
                    result.calls += 1
                body = self.client._call("GET", f"/{read.media_id}/insights", token,
                                         {"metric": ",".join(metrics)}, on_headers=seen)
            except GraphError as exc:
                if exc.kind == "auth" and exc.code in (190, 102):
                    return f"token rejected (code {exc.code}{'/' + str(exc.subcode) if exc.subcode else ''}): {exc.message}"
                if exc.kind == "auth":  # code 10 / 200-299: no permission for this media
                    result.foreign[read.post_id] = f"not this account's media: {exc.message}"
                    return None
                if exc.kind == "transient":
                    return f"throttled: {exc}"
                if exc.code == 100 and exc.subcode == 33:
                    result.deleted[read.post_id] = f"media {read.media_id} no longer exists on Instagram: {exc.message}"
                    return None
                metric = rules.refused_metric(exc.message, metrics) if exc.code == 100 else None
                if metric is None:
                    result.refused.setdefault(read.post_id, {})["*"] = str(exc)
                    return None
                replacement = rules.DEPRECATED_METRICS.get(metric)
                result.refused.setdefault(read.post_id, {})[metric] = (
                    f"unsupported in Graph API {rules.GRAPH_API_VERSION}: {exc.message}"
                    + (f" (use {replacement})" if replacement else ""))
                metrics = tuple(m for m in metrics if m != metric)
                continue
            values = result.values.setdefault(read.post_id, {})
            for entry in body.get("data") or []:
                try:
                    values[str(entry["name"])] = int(entry["values"][0]["value"])
                except (KeyError, IndexError, TypeError, ValueError):
                    result.refused.setdefault(read.post_id, {})[str(entry.get("name"))] = "answer without a value"
            return None
        return None

    def _account(self, account: str, token: str, seen) -> dict[str, float]:
        profile = self.client._call("GET", f"/{account}", token, {"fields": "followers_count"}, on_headers=seen)
        insights = self.client._call("GET", f"/{account}/insights", token, {"metric": "reach", "period": "day"},
                                     on_headers=seen)
        out = {"followers": float(profile.get("followers_count") or 0)}
        for entry in insights.get("data") or []:
            if entry.get("name") == "reach" and entry.get("values"):
                out["reach"] = float(entry["values"][-1].get("value") or 0)
        return out


class SimulatedInsightSource:
    """The outbox's insights from the seeded simulated audience (one audience per persona), all
    marked simulated. Reach scales with the simulated followers, which grow with interactions."""

    def __init__(self, audiences: dict[str, SimulatedAudience]) -> None:
        self.audiences = audiences  # by account (outbox:<slug>)
        self._lock = threading.Lock()

    def read(self, account: str, token: str | None, reads: list[DueRead], day: date) -> AccountReading:
        result = AccountReading(simulated=True)
        audience = self.audiences.get(account)
        if audience is None:
            result.stopped = f"no simulated audience for {account}"
            return result
        for read in reads:
            followers = read.followers or float(audience.params.start_followers)
            moment = read.published_at.astimezone(ZoneInfo(read.tz))
            final = audience.post(f"post-{read.post_id}", pillar=read.pillar, hour=local_hour(moment, ZoneInfo(read.tz)),
                                  day=moment.date(), followers=followers)
            result.values[read.post_id] = audience.at_age(final, read.age_hours).as_metrics()
            result.calls += 1
        return result
