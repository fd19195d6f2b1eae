"""The fake Graph API with insights and usage headers: `FakeInsightsGraphAPI` is a FakeGraphAPI
(persona_fakes/graph.py) that also answers, as Graph API v23.0 does:

- GET /{media}/insights?metric=a,b,.. -> {"data": [{"name", "period": "lifetime", "values":
  [{"value"}], "title", "id"}]}. A metric deprecated in v22+ (impressions, plays, video_views, or
  one named with `deprecate`) -> code 100 "Starting from version v22.0 and above, the <m> metric is
  no longer supported"; an unknown metric -> code 100 "metric[i] must be one of the following
  values: ..."; a media deleted on Instagram (`delete_media`) -> code 100 subcode 33; another
  account's media (the token is a different known account's) -> code 10; an expired token -> 190/463.
- GET /{user}?fields=followers_count -> {"followers_count", "id"}.
- GET /{user}/insights?metric=reach&period=day -> {"data": [{"name": "reach", "period": "day",
  "values": [{"value", "end_time"}]}]}.

Usage: every request counts against the app (`app_limit` calls per `window_s`, fake clock) and
against its account (`account_limit`); every answer carries X-App-Usage and
X-Business-Use-Case-Usage with the percentages. An insights request beyond 100 % is refused with
code 4 (app) or 80002 (account) and `estimated_time_to_regain_access` in the header; `throttled`
counts those refusals and `max_usage` records the highest percentage ever reported.

Values: `set_insights(media, {...})` fixes a media's numbers; otherwise they are made up from the
media id and grow with its age on the fake clock (so later reads see more).
"""

from __future__ import annotations

import json
from collections import defaultdict, deque
from datetime import datetime, timezone
from functools import partial
from typing import Any

from persona_fakes.graph import FakeGraphAPI, Media, _graph_error

V23_MEDIA_METRICS = ("reach", "views", "likes", "comments", "saved", "shares", "total_interactions", "follows",
                     "profile_visits", "profile_activity", "navigation", "replies")
DEPRECATED = ("impressions", "plays", "video_views", "clips_replays_count", "ig_reels_aggregated_all_plays_count")


class FakeInsightsGraphAPI(FakeGraphAPI):
    def __init__(self, *args, app_limit: int = 100_000, account_limit: int = 100_000, window_s: float = 3600.0,
                 **kwargs) -> None:
        self.app_limit, self.account_limit, self.window_s = app_limit, account_limit, window_s
        self.deprecated: set[str] = set(DEPRECATED)
        self.deleted: set[str] = set()
        self.values: dict[str, dict[str, int]] = {}
        self.followers: dict[str, int] = {}
        self.throttled = 0
        self.max_usage = 0.0
        self._app_calls: deque[float] = deque()
        self._account_calls: dict[str, deque[float]] = defaultdict(deque)
        super().__init__(*args, **kwargs)

    # --- set-up -------------------------------------------------------------------------------

    def add_media(self, user_id: str, published_at: datetime | None = None, caption: str = "") -> str:
        """A media of `user_id` as if published at `published_at` (default now), without the container flow."""
        with self._lock:
            media_id = self._new_id(181)
            stamp = published_at.timestamp() if published_at else self.now()
            self.media[media_id] = Media(media_id, str(user_id), "", caption, f"https://www.instagram.com/p/{media_id}/",
                                         stamp)
            return media_id

    def delete_media(self, media_id: str) -> None:
        """The media is deleted on Instagram: every later request about it gets code 100 / 33."""
        with self._lock:
            self.media.pop(media_id, None)
            self.deleted.add(media_id)

    def deprecate(self, metric: str) -> None:
        with self._lock:
            self.deprecated.add(metric)

    def set_insights(self, media_id: str, values: dict[str, int]) -> None:
        with self._lock:
            self.values[media_id] = dict(values)

    # --- routing and usage --------------------------------------------------------------------

    def _more_routes(self, method: str, parts: list[str]):
        if method != "GET":
            return None
        if len(parts) == 2 and parts[1] == "insights":
            node = parts[0]
            if node in self.accounts:
                return "user_insights", node, partial(self._user_insights, node)
            owner = self.media[node].user_id if node in self.media else None
            return "media_insights", owner, partial(self._media_insights, node)
        if len(parts) == 1 and parts[0] in self.accounts:
            return "user", parts[0], partial(self._user, parts[0])
        return None

    def _usage(self, account: str | None) -> tuple[float, float]:
        now = self.now()
        for calls in (self._app_calls, *self._account_calls.values()):
            while calls and calls[0] <= now - self.window_s:
                calls.popleft()
        app = 100.0 * len(self._app_calls) / self.app_limit
        mine = 100.0 * len(self._account_calls[account]) / self.account_limit if account else 0.0
        return app, mine

    def _regain_minutes(self, calls: deque) -> float:
        return max(0.0, (calls[0] + self.window_s - self.now()) / 60) if calls else 0.0

    def _answer_headers(self, endpoint: str, account: str | None) -> tuple[tuple[str, str], ...]:
        with self._lock:
            now = self.now()
            self._app_calls.append(now)
            if account:
                self._account_calls[account].append(now)
            app, mine = self._usage(account)
            self.max_usage = max(self.max_usage, app, mine)
            headers = [("X-App-Usage", json.dumps({"call_count": round(app), "total_cputime": round(app / 2),
                                                   "total_time": round(app / 2)}))]
            if account:
                regain = self._regain_minutes(self._account_calls[account]) if mine > 100 else 0
                headers.append(("X-Business-Use-Case-Usage", json.dumps({account: [{
                    "type": "instagram", "call_count": round(mine), "total_cputime": round(mine / 2),
                    "total_time": round(mine / 2), "estimated_time_to_regain_access": round(regain)}]})))
            return tuple(headers)

    def _check_usage(self, account: str) -> None:
        with self._lock:
            app, mine = self._usage(account)
            if app > 100 or mine > 100:
                self.throttled += 1
        if app > 100:
            raise _graph_error(4, None, "(#4) Application request limit reached", transient=True)
        if mine > 100:
            raise _graph_error(80002, None, "(#80002) There have been too many calls to this Instagram account. "
                                            "Wait a bit and try again.", transient=True)

    # --- handlers -----------------------------------------------------------------------------

    def _caller(self, params: dict[str, str]):
        return self._account_by_token(params.get("access_token", ""))

    def _media_insights(self, media_id: str, params: dict[str, str]) -> dict[str, Any]:
        with self._lock:
            media = self.media.get(media_id)
            caller = self._caller(params)
        if media is None:
            raise _graph_error(100, 33, f"Unsupported get request. Object with ID '{media_id}' does not exist, cannot "
                                        "be loaded due to missing permissions, or does not support this operation",
                               kind="GraphMethodException")
        if caller is not None and caller.user_id != media.user_id:
            raise _graph_error(10, None, "(#10) Application does not have permission for this action")
        self._authorize(media.user_id, params)
        self._check_usage(media.user_id)
        requested = [m.strip() for m in (params.get("metric") or "").split(",") if m.strip()]
        with self._lock:
            for index, metric in enumerate(requested):
                if metric in self.deprecated:
                    raise _graph_error(100, None, f"(#100) Starting from version v22.0 and above, the {metric} metric "
                                                  "is no longer supported for this media. Please use views instead.")
                if metric not in V23_MEDIA_METRICS:
                    raise _graph_error(100, None, f"(#100) metric[{index}] must be one of the following values: "
                                                  + ", ".join(m for m in V23_MEDIA_METRICS if m not in self.deprecated))
            values = self.values.get(media_id) or self._made_up(media)
        return {"data": [{"name": m, "period": "lifetime", "values": [{"value": int(values.get(m, 0))}],
                          "title": m.replace("_", " ").title(), "id": f"{media_id}/insights/{m}/lifetime"}
                         for m in requested]}

    def _made_up(self, media: Media) -> dict[str, int]:
        age_h = max(0.0, (self.now() - media.published_at) / 3600)
        share = min(1.0, 0.3 + 0.7 * age_h / 168)
        reach = int((800 + int(media.id) % 700) * share)
        likes, comments, saved, shares = int(reach * 0.04), int(reach * 0.003), int(reach * 0.004), int(reach * 0.002)
        return {"reach": reach, "views": int(reach * 1.3), "likes": likes, "comments": comments, "saved": saved,
                "shares": shares, "total_interactions": likes + comments + saved + shares}

    def _user(self, user_id: str, params: dict[str, str]) -> dict[str, Any]:
        self._authorize(user_id, params)
        self._check_usage(user_id)
        with self._lock:
            return {"followers_count": self.followers.get(user_id, 1000), "id": user_id}

    def _user_insights(self, user_id: str, params: dict[str, str]) -> dict[str, Any]:
        self._authorize(user_id, params)
        self._check_usage(user_id)
        end = datetime.fromtimestamp(self.now(), timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+0000")
        with self._lock:
            reach = sum(v.get("reach", 0) for m, v in self.values.items()
                        if m in self.media and self.media[m].user_id == user_id)
        return {"data": [{"name": "reach", "period": "day", "values": [{"value": reach, "end_time": end}],
                          "title": "Reach", "id": f"{user_id}/insights/reach/day"}]}
