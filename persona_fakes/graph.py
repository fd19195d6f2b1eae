"""A local Instagram Graph API for tests: real HTTP on 127.0.0.1 speaking the content-publishing
protocol (docs/rules.md), so `InstagramGraphClient(base_url=fake.url)` runs unchanged.

Endpoints (the token is the `access_token` query parameter or form field):

- POST /{user}/media (image_url, caption): checks the token and the caption, fetches `image_url`
  itself when `fetch_media` (as Meta does) and checks the bytes; returns {"id": container}. The
  container is IN_PROGRESS for `container_ready_after_s`, then FINISHED; EXPIRED 24 h (fake clock)
  after creation.
- GET /{container}?fields=status_code -> {"status_code", "id"}.
- POST /{user}/media_publish (creation_id) -> {"id": media}; counts against the moving 24 h quota.
- GET /{media}?fields=permalink -> {"permalink": "https://www.instagram.com/p/<code>/", "id"}.
- GET /?ids=a,b,c&fields=permalink (the multi-id lookup, at most 50 ids) -> {"a": {"permalink", "id"}, ...};
  one id that is not a media of the token's account fails the whole request (803).
- GET /{user}/media?fields=id,caption,permalink,timestamp[&limit&after] -> {"data": newest first,
  "paging": {"cursors": {"after"}, "next"}} (cursor paging).
- GET /{user}/content_publishing_limit?fields=quota_usage,config ->
  {"data": [{"quota_usage": n, "config": {"quota_total": t, "quota_duration": 86400}}]}.
- GET /debug_token?input_token=&access_token= -> {"data": {"is_valid", "expires_at", "user_id"}}.

Error answers (HTTP 400 with a Graph error body unless said otherwise), picked from Meta's
Instagram error-code table:

| condition                                   | code  | subcode  |
|---------------------------------------------|-------|----------|
| token unknown / not the account's (HTTP 400)| 190   | (none)   |
| caption over 2200 characters                | 36004 | 2207010  |
| more than 20 @mentions / too many hashtags  | 100   | 2207040  |
| image_url unreachable or not HTTP 200       | 9004  | 2207052  |
| fetching image_url timed out                | -2    | 2207003  |
| image over 8 MiB                            | 36000 | 2207004  |
| not a JPEG (undecodable or other format)    | 36001 | 2207005  |
| aspect ratio outside 4:5..1.91:1            | 36003 | 2207009  |
| publish while the container is IN_PROGRESS  | 9007  | 2207027  |
| publish of an EXPIRED container             | -2    | 2207020  |
| publish of a container in ERROR             | -1    | 2207001  |
| publish of an already PUBLISHED container   | 100   | (none)   |  (and recorded: `double_publishes()`)
| 24 h publishing limit reached               | 9     | 2207042  |
| unknown object id / other user's container  | 100   | 33       |
| multi-id lookup: an id not found / > 50 ids | 803 / 100 | (none) |

Faults: `inject(endpoint, fault, times=1, account=None)` answers the next `times` requests to
`endpoint` (one of ENDPOINTS; for one account only when `account` is given) with `fault` instead of
the real answer: `Fault.http(500)`, `Fault.graph(code, subcode, transient=..)`, `Fault.drop()`
(close the socket unanswered; `after=True`: carry the request out first, then drop the answer),
`Fault.status("EXPIRED")` (a status poll answers that code). `latency_s` delays every answer.

Records: `requests` (method, path, params without any token), `published` (user, container, media,
caption), `publish_count(user)`, `double_publishes()`. All state is behind one lock; the lock is
never held while sleeping or fetching, so many clients run in parallel.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from persona_fakes.serving import FaultQueue, HTTPFake

MAX_MEDIA_BYTES = 8 * 1024 * 1024
MIN_ASPECT, MAX_ASPECT = 4 / 5, 1.91
MAX_CAPTION = 2200
MAX_MENTIONS = 20
QUOTA_WINDOW_S = 86400
CONTAINER_TTL_S = 86400
ENDPOINTS = ("create", "status", "publish", "quota", "permalink", "permalinks", "media_list", "debug_token",
             "media_insights", "user_insights", "user")  # the last three: persona_fakes/graph_insights.py
_SECRET_PARAMS = ("access_token", "input_token")


@dataclass(frozen=True)
class Fault:
    """An injected answer. Build with the class methods."""

    kind: str  # "http" | "graph" | "drop" | "status"
    http_status: int = 400
    code: int | None = None
    subcode: int | None = None
    transient: bool = False
    message: str = ""
    status_code: str = ""
    after: bool = False
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def http(cls, status: int, retry_after: float | None = None) -> "Fault":
        """A bare HTTP error with a non-Graph body (a proxy's or load balancer's)."""
        headers = (("Retry-After", str(retry_after)),) if retry_after is not None else ()
        return cls("http", http_status=status, message=f"injected HTTP {status}", headers=headers)

    @classmethod
    def graph(cls, code: int, subcode: int | None = None, transient: bool = False, status: int = 400,
              message: str = "", retry_after: float | None = None) -> "Fault":
        """A Graph API error body {"error": {code, error_subcode, is_transient, message...}}."""
        headers = (("Retry-After", str(retry_after)),) if retry_after is not None else ()
        return cls("graph", http_status=status, code=code, subcode=subcode, transient=transient,
                   message=message or f"injected error {code}/{subcode}", headers=headers)

    @classmethod
    def drop(cls, after: bool = False) -> "Fault":
        """Close the socket without answering; `after`: carry the request out first."""
        return cls("drop", after=after)

    @classmethod
    def status(cls, status_code: str) -> "Fault":
        """For "status": answer this status_code (IN_PROGRESS, ERROR, EXPIRED...) instead of the real one."""
        return cls("status", http_status=200, status_code=status_code)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    params: dict[str, str]  # without access_token / input_token
    endpoint: str
    token_in: str  # where access_token came: "query", "body" or "" (absent); never its value

    def __repr__(self) -> str:
        return f"RecordedRequest({self.method} {self.path} {self.endpoint} {self.params})"


@dataclass
class Account:
    user_id: str
    token: str
    quota_total: int
    token_expires_at: int = 0  # unix seconds; 0 = never
    publish_times: deque = field(default_factory=deque)


@dataclass
class Container:
    id: str
    user_id: str
    image_url: str
    caption: str
    created_at: float
    ready_at: float
    state: str = "IN_PROGRESS"  # IN_PROGRESS until ready_at, then FINISHED, or ERROR/EXPIRED/PUBLISHED
    media_id: str | None = None


@dataclass
class Media:
    id: str
    user_id: str
    container_id: str
    caption: str
    permalink: str
    published_at: float


class _Answer(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status, self.body = status, body


def _graph_error(code: int | None, subcode: int | None, message: str, *, transient: bool = False,
                 status: int = 400, kind: str = "OAuthException") -> _Answer:
    error: dict[str, Any] = {"message": message, "type": kind, "code": code, "is_transient": transient,
                             "fbtrace_id": "FakeTrace"}
    if subcode is not None:
        error["error_subcode"] = subcode
    return _Answer(status, {"error": error})


class FakeGraphAPI(HTTPFake):
    def __init__(self, accounts: dict[str, str] | None = None, quota_total: int = 50, latency_s: float = 0.0,
                 container_ready_after_s: float = 0.0, fetch_media: bool = True, max_hashtags: int = 5,
                 fetch_timeout_s: float = 10.0) -> None:
        self.quota_total = quota_total
        self.latency_s = latency_s
        self.container_ready_after_s = container_ready_after_s
        self.fetch_media = fetch_media
        self.max_hashtags = max_hashtags
        self.fetch_timeout_s = fetch_timeout_s
        self.accounts: dict[str, Account] = {}
        self.containers: dict[str, Container] = {}
        self.media: dict[str, Media] = {}
        self.requests: list[RecordedRequest] = []
        self.published: list[tuple[str, str, str, str]] = []
        self.repeat_publishes: list[str] = []  # containers someone tried to publish again
        self._faults: FaultQueue[Fault] = FaultQueue()
        self._clock_offset = 0.0
        self._next_id = 0
        self._lock = threading.RLock()
        for user_id, token in (accounts or {}).items():
            self.add_account(user_id, token)
        super().__init__(_handler_for(self))

    @property
    def url(self) -> str:
        return f"{self.origin}/v23.0"

    # --- set-up -------------------------------------------------------------------------------

    def add_account(self, user_id: str, token: str, quota_total: int | None = None, usage: int = 0,
                    token_expires_at: int = 0) -> Account:
        """An account; `usage` posts count as published just now (they fill the 24 h window)."""
        with self._lock:
            account = Account(str(user_id), token, self.quota_total if quota_total is None else quota_total,
                              token_expires_at)
            account.publish_times.extend([self.now()] * usage)
            self.accounts[account.user_id] = account
            return account

    def set_token_expiry(self, user_id: str, expires_at: int | datetime) -> None:
        with self._lock:
            value = int(expires_at.timestamp()) if isinstance(expires_at, datetime) else int(expires_at)
            self.accounts[str(user_id)].token_expires_at = value

    def inject(self, endpoint: str, fault: Fault, times: int = 1, account: str | None = None) -> "FakeGraphAPI":
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; one of {ENDPOINTS}")
        self._faults.push(fault, times, endpoint=endpoint, account=None if account is None else str(account))
        return self

    def expire(self, container_id: str) -> None:
        with self._lock:
            self.containers[container_id].state = "EXPIRED"

    def now(self) -> float:
        """The fake's clock (unix seconds): wall time plus `advance`d seconds."""
        return time.time() + self._clock_offset

    def advance(self, seconds: float) -> None:
        """Move the fake's clock on (quota window, container expiry, readiness)."""
        with self._lock:
            self._clock_offset += seconds

    # --- records ------------------------------------------------------------------------------

    def publish_count(self, user_id: str) -> int:
        with self._lock:
            return sum(1 for p in self.published if p[0] == str(user_id))

    def double_publishes(self) -> list[str]:
        """Containers someone tried to publish twice, and captions that went out more than once
        on one account. Empty when every post was published exactly once."""
        with self._lock:
            problems = [f"container {c} published again" for c in self.repeat_publishes]
            seen: dict[tuple[str, str], int] = {}
            for user_id, _container, _media, caption in self.published:
                seen[(user_id, caption)] = seen.get((user_id, caption), 0) + 1
            problems += [f"caption {caption[:40]!r} published {n} times on {user}"
                         for (user, caption), n in seen.items() if n > 1]
            return problems

    def requests_to(self, endpoint: str) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.endpoint == endpoint]

    # --- request handling (called from handler threads) -----------------------------------------

    def _new_id(self, prefix: int) -> str:
        self._next_id += 1
        return str(prefix * 10**13 + self._next_id)

    def _route(self, method: str, path: str, params: dict[str, str]) -> tuple[str, str | None, Any]:
        """(endpoint, account the request is about, handler)."""
        parts = [p for p in path.split("/") if p]
        if parts and parts[0].startswith("v") and parts[0][1:].replace(".", "").isdigit():
            parts = parts[1:]  # the API version
        with self._lock:
            if parts == ["debug_token"] and method == "GET":
                account = self._account_by_token(params.get("input_token", ""))
                return "debug_token", account.user_id if account else None, self._debug_token
            if len(parts) == 2:
                user, edge = parts
                table = {("POST", "media"): ("create", self._create), ("GET", "media"): ("media_list", self._media_list),
                         ("POST", "media_publish"): ("publish", self._publish),
                         ("GET", "content_publishing_limit"): ("quota", self._quota)}
                if (method, edge) in table:
                    endpoint, handler = table[(method, edge)]
                    return endpoint, user, partial(handler, user)
            extra = self._more_routes(method, parts)
            if extra is not None:
                return extra
            if not parts and method == "GET" and "ids" in params:
                first = self.media.get(params["ids"].split(",")[0])
                return "permalinks", first.user_id if first else None, self._media_nodes
            if len(parts) == 1 and method == "GET":
                node = parts[0]
                if node in self.containers:
                    return "status", self.containers[node].user_id, partial(self._status, node)
                if node in self.media:
                    return "permalink", self.media[node].user_id, partial(self._media_node, node)
                return "unknown", None, partial(self._unknown_node, node)
        return "unknown", None, lambda params: self._raise(_graph_error(
            100, None, f"Unknown path components: {method} {path}", kind="GraphMethodException"))

    def _more_routes(self, method: str, parts: list[str]) -> tuple[str, str | None, Any] | None:
        """Endpoints a subclass adds (graph_insights.py), tried before the node lookup."""
        return None

    def _raw_post(self, handler, path: str) -> bool:
        """A subclass's POST whose body is no form (an upload): True when it answered it itself."""
        return False

    def _answer_headers(self, endpoint: str, account: str | None) -> tuple[tuple[str, str], ...]:
        """Headers every answer carries (a subclass's usage headers); called once per request."""
        return ()

    @staticmethod
    def _raise(answer: _Answer):
        raise answer

    def _account_by_token(self, token: str) -> Account | None:
        return next((a for a in self.accounts.values() if token and a.token == token), None)

    def _authorize(self, user_id: str, params: dict[str, str]) -> Account:
        token = params.get("access_token", "")
        with self._lock:
            account = self.accounts.get(user_id)
        if account is None or not token or token != account.token:
            raise _graph_error(190, None, "Invalid OAuth access token - Cannot parse access token")
        if account.token_expires_at and account.token_expires_at <= self.now():
            raise _graph_error(190, 463, "Error validating access token: Session has expired")
        return account

    def _container_state(self, container: Container) -> str:
        now = self.now()
        if container.state == "IN_PROGRESS" and now >= container.ready_at:
            container.state = "FINISHED"
        if container.state in ("IN_PROGRESS", "FINISHED") and now >= container.created_at + CONTAINER_TTL_S:
            container.state = "EXPIRED"
        return container.state

    def _create(self, user_id: str, params: dict[str, str]) -> dict[str, Any]:
        self._authorize(user_id, params)
        image_url, caption = params.get("image_url", ""), params.get("caption", "")
        if not image_url:
            raise _graph_error(100, None, "The parameter image_url is required")
        if len(caption) > MAX_CAPTION:
            raise _graph_error(36004, 2207010, f"The caption is too long ({len(caption)} > {MAX_CAPTION} characters)")
        mentions = sum(1 for word in caption.split() if word.startswith("@") and len(word) > 1)
        hashtags = sum(1 for word in caption.split() if word.startswith("#") and len(word) > 1)
        if mentions > MAX_MENTIONS:
            raise _graph_error(100, 2207040, f"Cannot use more than {MAX_MENTIONS} tags per created media ({mentions})")
        if hashtags > self.max_hashtags:
            raise _graph_error(100, 2207040, f"Cannot use more than {self.max_hashtags} hashtags per created media ({hashtags})")
        if self.fetch_media:
            self._check_media(image_url)  # outside the lock: a slow media host must not stall others
        with self._lock:
            now = self.now()
            container = Container(self._new_id(179), user_id, image_url, caption, now,
                                  now + self.container_ready_after_s)
            self._container_state(container)
            self.containers[container.id] = container
        return {"id": container.id}

    def _fetch(self, url: str, limit: int = MAX_MEDIA_BYTES) -> bytes:
        """The bytes at `url`, fetched as Meta does; the API's errors for a slow, missing or big file."""
        try:
            with urllib.request.urlopen(url, timeout=self.fetch_timeout_s) as response:
                data = response.read(limit + 1)
        except (TimeoutError, socket.timeout):
            raise _graph_error(-2, 2207003, "It takes too long to download the media.", transient=True) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise _graph_error(9004, 2207052, f"The media could not be fetched from this uri: {url} ({exc})") from None
        if len(data) > limit:
            raise _graph_error(36000, 2207004, f"The media size is too large. It should be less than "
                                               f"{limit // (1024 * 1024)} MiB.")
        return data

    def _check_media(self, image_url: str) -> None:
        data = self._fetch(image_url)
        from PIL import Image  # the fake decodes like Meta does; PIL is a project dependency

        try:
            with Image.open(io.BytesIO(data)) as image:
                fmt, (width, height) = image.format, image.size
        except Exception:  # noqa: BLE001 - any decode failure is "format not supported"
            fmt, width, height = None, 0, 0
        if fmt != "JPEG":
            raise _graph_error(36001, 2207005, f"The image format is not supported ({fmt or 'undecodable'}); only JPEG")
        ratio = width / height
        if not MIN_ASPECT <= ratio <= MAX_ASPECT:
            raise _graph_error(36003, 2207009, f"The submitted image with aspect ratio ({width}/{height}) cannot be "
                                               "published. Please submit an image with a valid aspect ratio.")

    def _status(self, container_id: str, params: dict[str, str]) -> dict[str, Any]:
        with self._lock:
            container = self.containers[container_id]
        self._authorize(container.user_id, params)
        with self._lock:
            return {"status_code": self._container_state(container), "id": container_id}

    def _window_usage(self, account: Account) -> int:
        cutoff = self.now() - QUOTA_WINDOW_S
        while account.publish_times and account.publish_times[0] <= cutoff:
            account.publish_times.popleft()
        return len(account.publish_times)

    def _publish(self, user_id: str, params: dict[str, str]) -> dict[str, Any]:
        account = self._authorize(user_id, params)
        container_id = params.get("creation_id", "")
        with self._lock:
            container = self.containers.get(container_id)
            if container is None or container.user_id != user_id:
                raise _graph_error(100, 33, f"Unsupported post request. Object with ID '{container_id}' does not "
                                            "exist, cannot be loaded due to missing permissions, or does not support "
                                            "this operation", kind="GraphMethodException")
            state = self._container_state(container)
            if state == "PUBLISHED":
                self.repeat_publishes.append(container_id)
                raise _graph_error(100, None, f"The media container {container_id} has already been published "
                                              f"(media {container.media_id})")
            if state == "IN_PROGRESS":
                raise _graph_error(9007, 2207027, "Media ID is not available")
            if state == "EXPIRED":
                raise _graph_error(-2, 2207020, "The media you are trying to access has expired. "
                                                "Please try to upload again.")
            if state == "ERROR":
                raise _graph_error(-1, 2207001, "Instagram server error. Try again.")
            if self._window_usage(account) >= account.quota_total:
                raise _graph_error(9, 2207042, "You reached maximum number of posts that is allowed to be "
                                               "published by Content Publishing API.")
            now = self.now()
            media_id = self._new_id(180)
            code = base64.urlsafe_b64encode(int(media_id).to_bytes(8, "big")).decode().rstrip("=")
            self.media[media_id] = Media(media_id, user_id, container_id, container.caption,
                                         f"https://www.instagram.com/p/{code}/", now)
            container.state, container.media_id = "PUBLISHED", media_id
            account.publish_times.append(now)
            self.published.append((user_id, container_id, media_id, container.caption))
        return {"id": media_id}

    def _media_node(self, media_id: str, params: dict[str, str]) -> dict[str, Any]:
        with self._lock:
            media = self.media[media_id]
        self._authorize(media.user_id, params)
        return {"permalink": media.permalink, "id": media_id}

    def _media_nodes(self, params: dict[str, str]) -> dict[str, Any]:
        """The multi-id lookup: every id must be a media of the token's account, as one answer."""
        ids = [i for i in params.get("ids", "").split(",") if i]
        if not ids or len(ids) > 50:
            raise _graph_error(100, None, f"(#100) ids takes 1 to 50 ids, not {len(ids)}")
        with self._lock:
            found = {i: self.media[i] for i in ids if i in self.media}
            caller = self._account_by_token(params.get("access_token", ""))
        if caller is None:
            raise _graph_error(190, None, "Invalid OAuth access token - Cannot parse access token")
        self._authorize(caller.user_id, params)  # an expired token too
        missing = [i for i in ids if i not in found or found[i].user_id != caller.user_id]
        if missing:
            raise _graph_error(803, None, f"(#803) Some of the aliases you requested do not exist: {','.join(missing)}")
        return {i: {"permalink": found[i].permalink, "id": i} for i in ids}

    def _unknown_node(self, node: str, params: dict[str, str]) -> dict[str, Any]:
        raise _graph_error(100, 33, f"Unsupported get request. Object with ID '{node}' does not exist, cannot be "
                                    "loaded due to missing permissions, or does not support this operation",
                           kind="GraphMethodException")

    def _media_list(self, user_id: str, params: dict[str, str]) -> dict[str, Any]:
        self._authorize(user_id, params)
        limit = max(1, min(100, int(params.get("limit") or 25)))
        start = int(params.get("after") or 0)
        with self._lock:
            items = sorted((m for m in self.media.values() if m.user_id == user_id),
                           key=lambda m: (m.published_at, m.id), reverse=True)
        page = items[start:start + limit]
        body: dict[str, Any] = {"data": [
            {"id": m.id, "caption": m.caption, "permalink": m.permalink,
             "timestamp": datetime.fromtimestamp(m.published_at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+0000")}
            for m in page]}
        if page:
            body["paging"] = {"cursors": {"before": str(start), "after": str(start + len(page))}}
            if start + len(page) < len(items):
                body["paging"]["next"] = f"{self.url}/{user_id}/media?after={start + len(page)}&limit={limit}"
        return body

    def _quota(self, user_id: str, params: dict[str, str]) -> dict[str, Any]:
        account = self._authorize(user_id, params)
        with self._lock:
            usage = self._window_usage(account)
        return {"data": [{"quota_usage": usage, "config": {"quota_total": account.quota_total,
                                                           "quota_duration": QUOTA_WINDOW_S}}]}

    def _debug_token(self, params: dict[str, str]) -> dict[str, Any]:
        with self._lock:
            caller = self._account_by_token(params.get("access_token", ""))
            subject = self._account_by_token(params.get("input_token", ""))
        if caller is None:
            raise _graph_error(190, None, "Invalid OAuth access token - Cannot parse access token")
        if subject is None:
            return {"data": {"is_valid": False, "error": {"code": 190, "message": "Invalid OAuth access token"}}}
        valid = not subject.token_expires_at or subject.token_expires_at > self.now()
        return {"data": {"is_valid": valid, "expires_at": subject.token_expires_at, "user_id": subject.user_id,
                         "type": "USER", "scopes": ["instagram_basic", "instagram_content_publish"]}}


def _handler_for(fake: FakeGraphAPI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes; with Nagle on, a kept-alive client waits for the
        # delayed ACK (40 ms) on every answer.
        disable_nagle_algorithm = True

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def _send(self, status: int, body: Any, headers: tuple[tuple[str, str], ...] = (),
                  content_type: str = "application/json; charset=UTF-8") -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for key, value in headers:
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _drop(self) -> None:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

        def _handle(self, method: str) -> None:
            split = urlsplit(self.path)
            params = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
            token_in = "query" if params.get("access_token") else ""
            if method == "POST" and fake._raw_post(self, split.path):
                return  # a binary upload (graph_formats.py: the resumable upload)
            if method == "POST":
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                form = {k: v[-1] for k, v in parse_qs(raw, keep_blank_values=True).items()}
                token_in = "body" if form.get("access_token") else token_in
                params.update(form)
            endpoint, account, handler = fake._route(method, split.path, params)
            with fake._lock:
                fake.requests.append(RecordedRequest(
                    method, split.path, {k: v for k, v in params.items() if k not in _SECRET_PARAMS},
                    endpoint, token_in))
            if fake.latency_s > 0:
                time.sleep(fake.latency_s)
            fault = fake._faults.take(endpoint=endpoint, account=account)
            extra = fake._answer_headers(endpoint, account)
            if fault is not None and not (fault.kind == "drop" and fault.after):
                return self._fault(fault, params, endpoint, account)
            try:
                status, body = 200, handler(params)
            except _Answer as answer:
                status, body = answer.status, answer.body
            if fault is not None:  # a drop after carrying the request out
                return self._drop()
            self._send(status, body, extra)

        def _fault(self, fault: Fault, params: dict[str, str], endpoint: str, account: str | None) -> None:
            if fault.kind == "drop":
                return self._drop()
            if fault.kind == "http":
                return self._send(fault.http_status, f"<html><body>{fault.message}</body></html>".encode(),
                                  fault.headers, "text/html")
            if fault.kind == "status":
                container = urlsplit(self.path).path.rstrip("/").rsplit("/", 1)[-1]
                return self._send(200, {"status_code": fault.status_code, "id": container})
            error = _graph_error(fault.code, fault.subcode, fault.message, transient=fault.transient,
                                 status=fault.http_status)
            self._send(error.status, error.body, fault.headers)

    return Handler


class MediaServer(HTTPFake):
    """Static files from `directory` over real HTTP on 127.0.0.1 (the public image host the fake
    Graph API fetches from). `url_for(name)` gives a file's URL."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        super().__init__(partial(_QuietFiles, directory=str(self.directory)))

    @property
    def url(self) -> str:
        return self.origin

    def url_for(self, name: str) -> str:
        return f"{self.url}/{name}"


class _QuietFiles(SimpleHTTPRequestHandler):
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:
        pass
