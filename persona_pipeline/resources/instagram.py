"""The Instagram Graph API content-publishing client (docs/rules.md, "Graph API error classes").

Three steps publish a photo: create a container from a public JPEG URL (`create_container`), wait
until Meta has fetched and processed it (`wait_for_container`), publish it (`publish_container`).
Around them: the account's 24 h quota, the permalinks (many ids a request), finding a post whose
media id was lost, and the token's health.

Every call takes the account's token explicitly; it travels as the `access_token` form field (POST)
or query parameter (GET), as the Graph API expects, and never appears in an error: messages and
URLs are scrubbed before they go into a `GraphError` (HTTP libraries may put the full URL, query
included, into their exceptions).

Retries are ours: a failure of kind "transient" (see `persona_pipeline.domain.graph_errors`: the
throttling codes, `is_transient`, HTTP 5xx, connection errors, timeouts, dropped sockets) is tried
again up to `max_retries` times with exponential backoff and jitter, honouring Retry-After (or the
business-use-case header's `estimated_time_to_regain_access`) when the server sends one; a wait
longer than the cap is not slept through but handed to the caller in `GraphError.retry_after_s`.
Every other kind fails at once. (A lost answer to `create_container` is retried too: at worst it
leaves an unused container, which expires by itself after 24 h.)

Publishing is the one call that must not be repeated blindly: when its answer is lost (dropped
socket, read timeout, 5xx) the post may be out already. Before retrying, `publish_container` asks
the container's status: FINISHED means nothing happened and the publish is retried; PUBLISHED means
it went out and the media id was lost, reported as a GraphError with `container_status="PUBLISHED"`
so the caller reconciles with `find_media` instead of publishing twice.

One urllib3 pool per thread and origin (kept-alive connections, no cookies): nothing is shared
between threads, so the publisher may run many accounts in parallel threads over one resource.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import KW_ONLY, dataclass
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any
from urllib.parse import urlencode, urlsplit

import certifi
import dagster as dg
import requests
import urllib3

from persona_pipeline.domain.graph_errors import classify
from persona_pipeline.domain.retry import backoff_wait, parse_retry_after

__all__ = ["GraphError", "Quota", "TokenInfo", "InstagramGraphClient", "classify", "sleep"]

# Indirection so tests can record the waits instead of sleeping through them.
sleep = time.sleep

MAX_BACKOFF_S = 60.0
MAX_POLL_INTERVAL_S = 10.0
POLL_GROWTH = 1.5
MAX_IDS = 50  # ids in one multi-id lookup (GET /?ids=...), the Graph API's limit
# Container status codes the API documents (GET /{container}?fields=status_code).
CONTAINER_STATUSES = ("IN_PROGRESS", "FINISHED", "ERROR", "EXPIRED", "PUBLISHED")
_SECRET_PARAM_RE = re.compile(r"((?:access_token|input_token)=)[^&\s'\"]+")


@dataclass(eq=False)
class GraphError(RuntimeError):
    """A Graph API call that failed for good (after retries where retrying made sense).

    `kind` says what to do (see `persona_pipeline.domain.graph_errors`); `code`, `subcode`,
    `http_status` are as the API answered (None when no answer came). `call` names the request
    ("POST /1784.../media"). `retry_after_s` is the wait the server asked for, when it asked for
    one; `container_status` is set when the client learned the container's state while handling
    the failure (e.g. "PUBLISHED" after a publish whose answer was lost). str() never holds a token.
    """

    kind: str
    message: str
    _: KW_ONLY
    call: str = ""
    code: int | None = None
    subcode: int | None = None
    http_status: int | None = None
    is_transient: bool = False
    retry_after_s: float | None = None
    container_status: str | None = None
    attempts: int = 1

    def __post_init__(self) -> None:
        super().__init__(self._text())

    def _text(self) -> str:
        facts = [f"HTTP {self.http_status}" if self.http_status is not None else "no HTTP answer"]
        if self.code is not None:
            facts.append(f"code {self.code}")
        if self.subcode is not None:
            facts.append(f"subcode {self.subcode}")
        if self.is_transient:
            facts.append("is_transient")
        if self.attempts > 1:
            facts.append(f"{self.attempts} attempts")
        if self.retry_after_s is not None:
            facts.append(f"retry after {self.retry_after_s:.0f} s")
        where = f"{self.call}: " if self.call else ""
        return f"{where}{self.message} ({', '.join(facts)}; kind {self.kind})"

    def __reduce__(self):  # picklable (Dagster ships exceptions between processes)
        return (_rebuild_graph_error, (self.kind, self.message, dict(
            call=self.call, code=self.code, subcode=self.subcode, http_status=self.http_status,
            is_transient=self.is_transient, retry_after_s=self.retry_after_s,
            container_status=self.container_status, attempts=self.attempts)))


def _rebuild_graph_error(kind: str, message: str, fields: dict[str, Any]) -> GraphError:
    return GraphError(kind, message, **fields)


@dataclass(frozen=True)
class Quota:
    """Posts published in the moving 24 h window (`usage`) and the account's limit (`total`)."""

    usage: int
    total: int

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.usage)


@dataclass(frozen=True)
class TokenInfo:
    """Whether Meta accepts the token, and when it expires (None: never, or unknown)."""

    valid: bool
    expires_at: datetime | None


def scrub(text: str, *secrets: str) -> str:
    """`text` without the given secrets and without any access_token=/input_token= value."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _SECRET_PARAM_RE.sub(r"\1***", text)


def _retry_after(response: urllib3.BaseHTTPResponse) -> float | None:
    """The wait the server asked for: Retry-After (seconds or an HTTP date), else the largest
    `estimated_time_to_regain_access` (minutes) of the X-Business-Use-Case-Usage header."""
    wait = parse_retry_after(response.headers.get("Retry-After"))
    if wait is not None:
        return wait
    usage = response.headers.get("X-Business-Use-Case-Usage")
    if usage:
        try:
            minutes = [float(item.get("estimated_time_to_regain_access") or 0)
                       for items in json.loads(usage).values() for item in items]
        except (ValueError, AttributeError, TypeError):
            return None
        if minutes and max(minutes) > 0:
            return max(minutes) * 60
    return None


def _parse_graph_time(value: str) -> datetime:
    """Graph timestamps look like 2025-05-01T12:34:56+0000."""
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S%z")


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def _same_caption(a: str | None, b: str) -> bool:
    # Instagram may trim or re-flow whitespace; the words are what identify the post.
    return " ".join((a or "").split()) == " ".join(b.split())


_local = threading.local()
_FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def _thread_pool(origin: str) -> tuple[urllib3.PoolManager | urllib3.HTTPConnectionPool, bool]:
    """This thread's connections to `origin`, kept alive between calls and never shared between
    threads, and whether they take a full URL (through a proxy) rather than a path. urllib3
    directly: requests cost about twice its CPU per call (preparing, merging settings, hooks), and
    a batch makes four calls a post; without a proxy the origin's own connection pool is asked,
    not a PoolManager, which parsed every URL and keyed its pools again on each call (a quarter of
    urllib3's CPU per call). No cookies are kept, so nothing of one account's answers rides along
    on another account's requests. Redirects are not followed (the Graph API answers where it is
    asked)."""
    pools = getattr(_local, "pools", None)
    if pools is None:
        pools = _local.pools = {}
    pool = pools.get(origin)
    if pool is None:
        proxies, ca_bundle = _environment(origin)
        proxy = proxies.get(urlsplit(origin).scheme) or proxies.get("all")
        settings = dict(retries=False, cert_reqs="CERT_REQUIRED", ca_certs=ca_bundle)
        pool = pools[origin] = ((urllib3.ProxyManager(proxy, **settings), True) if proxy else
                                (urllib3.PoolManager(**settings).connection_from_url(origin), False))
    return pool


@lru_cache(maxsize=64)
def _environment(origin: str) -> tuple[dict[str, str], str]:
    """(proxies, CA bundle) for `origin` as requests reads them from the environment (HTTP(S)_PROXY
    and NO_PROXY; REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE, else certifi's), read once per process,
    not on every call."""
    proxies = requests.utils.get_environ_proxies(origin)
    return proxies, os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or certifi.where()


class _Failure(Exception):
    """One attempt's failure, before the retry decision (internal)."""

    def __init__(self, error: GraphError, ambiguous: bool) -> None:
        super().__init__(str(error))
        self.error = error
        # True when the request may have been carried out although no usable answer came back.
        self.ambiguous = ambiguous


class InstagramGraphClient(dg.ConfigurableResource):
    """Instagram Graph API content publishing with retries (see the module docstring)."""

    base_url: str = "https://graph.facebook.com/v23.0"
    timeout_s: float = 30
    max_retries: int = 4
    backoff_s: float = 1.0
    poll_interval_s: float = 1.0
    poll_timeout_s: float = 120
    video_poll_timeout_s: float = 900  # a reel stays IN_PROGRESS for seconds to minutes
    name: str = "instagram"

    # --- the calls -----------------------------------------------------------------------------

    def quota(self, user_id: str, token: str) -> Quota:
        """The account's publishing usage over the moving 24 h and its limit (read, never assumed)."""
        body = self._call("GET", f"/{user_id}/content_publishing_limit", token,
                          {"fields": "quota_usage,config"})
        try:
            entry = body["data"][0]
            config = entry.get("config") or {}
            return Quota(usage=int(entry.get("quota_usage") or 0), total=int(config["quota_total"]))
        except (KeyError, IndexError, TypeError, ValueError):
            raise self._malformed(f"GET /{user_id}/content_publishing_limit", body, "data[0].quota_usage/config") from None

    def create_container(self, user_id: str, token: str, image_url: str, caption: str) -> str:
        """POST /{user}/media: a container for the JPEG at `image_url` (Meta fetches it) -> its id."""
        return self.create_media(user_id, token, {"image_url": image_url, "caption": caption})

    def create_media(self, user_id: str, token: str, fields: dict[str, str]) -> str:
        """POST /{user}/media with a format's fields -> the container id: a carousel item
        (`is_carousel_item=true`, image_url), a carousel (`media_type=CAROUSEL`, `children`,
        caption), a reel (`media_type=REELS`, video_url, caption, share_to_feed, cover_url or
        thumb_offset) or a story (`media_type=STORIES`, image_url or video_url)."""
        body = self._call("POST", f"/{user_id}/media", token, dict(fields))
        return self._field(body, "id", f"POST /{user_id}/media")

    def create_resumable(self, user_id: str, token: str, fields: dict[str, str]) -> tuple[str, str]:
        """POST /{user}/media upload_type=resumable: a video container whose bytes come by upload, not by URL ->
        (container id, the rupload `uri` to POST the bytes to: instagram_upload.py)."""
        body = self._call("POST", f"/{user_id}/media", token, {**fields, "upload_type": "resumable"})
        return self._field(body, "id", f"POST /{user_id}/media"), self._field(body, "uri", f"POST /{user_id}/media")

    def upload_state(self, container_id: str, token: str) -> tuple[str, int]:
        """A resumable container's upload: (uploading_phase status, bytes_transferred), from its video_status."""
        body = self._call("GET", f"/{container_id}", token, {"fields": "status_code,video_status"})
        phase = (body.get("video_status") or {}).get("uploading_phase") or {}
        return str(phase.get("status") or "not_started"), int(phase.get("bytes_transferred") or 0)

    def container_status(self, container_id: str, token: str) -> str:
        """IN_PROGRESS | FINISHED | ERROR | EXPIRED | PUBLISHED."""
        body = self._call("GET", f"/{container_id}", token, {"fields": "status_code"})
        return self._field(body, "status_code", f"GET /{container_id}")

    def container_error(self, container_id: str, token: str) -> str:
        """Why a container is in ERROR: its `status` field, as the API words it (empty if it says nothing)."""
        body = self._call("GET", f"/{container_id}", token, {"fields": "status_code,status"})
        return scrub(str(body.get("status") or ""), token)

    def wait_for_container(self, container_id: str, token: str, timeout_s: float | None = None) -> str:
        """Poll the container until it leaves IN_PROGRESS and return that status. The interval
        starts at `poll_interval_s` and grows x1.5 up to 10 s; after `timeout_s` (default
        `poll_timeout_s`; a video takes minutes: `video_poll_timeout_s`), counted as the longer of
        wall time and time slept, a GraphError of kind "transient"."""
        start = time.monotonic()
        interval = self.poll_interval_s
        slept = 0.0
        limit = self.poll_timeout_s if timeout_s is None else timeout_s
        while True:
            status = self.container_status(container_id, token)
            if status != "IN_PROGRESS":
                return status
            spent = max(time.monotonic() - start, slept)
            if spent + interval > limit:
                raise GraphError("transient", f"container {container_id} still IN_PROGRESS after {spent:.0f} s",
                                 call=f"GET /{container_id}")
            sleep(interval)
            slept += interval
            interval = min(interval * POLL_GROWTH, MAX_POLL_INTERVAL_S)

    def publish_container(self, user_id: str, token: str, container_id: str) -> str:
        """POST /{user}/media_publish creation_id=container -> the media id. A lost answer is not
        retried blindly: the container's status decides (module docstring)."""
        call = f"POST /{user_id}/media_publish"
        body = self._call("POST", f"/{user_id}/media_publish", token, {"creation_id": container_id},
                          on_ambiguous=lambda failure: self._after_lost_publish(failure, container_id, token))
        return self._field(body, "id", call)

    def permalink(self, media_id: str, token: str) -> str:
        """The post's public URL (https://www.instagram.com/p/<code>/)."""
        body = self._call("GET", f"/{media_id}", token, {"fields": "permalink"})
        return self._field(body, "permalink", f"GET /{media_id}")

    def permalinks(self, media_ids: list[str], token: str) -> dict[str, str]:
        """Media id -> permalink for many posts at once: the multi-id lookup (GET /?ids=a,b,c
        &fields=permalink), MAX_IDS ids a request. One id the API does not find (code 803) fails
        its whole request: the caller falls back to `permalink` per id."""
        links: dict[str, str] = {}
        for start in range(0, len(media_ids), MAX_IDS):
            part = media_ids[start:start + MAX_IDS]
            call = f"GET /?ids={','.join(part)}"
            body = self._call("GET", "/", token, {"ids": ",".join(part), "fields": "permalink"})
            for media_id in part:
                node = body.get(media_id)
                links[media_id] = self._field(node if isinstance(node, dict) else {}, "permalink", call)
        return links

    def find_media(self, user_id: str, token: str, caption: str, since: datetime) -> tuple[str, str] | None:
        """(media_id, permalink) of the newest post whose caption equals `caption` (whitespace
        normalised) and whose timestamp is at or after `since`; None if there is none. Reads the
        media list newest first, page by page (50 a page), until a page holds only posts older
        than `since`. For reconciling a container that is PUBLISHED when its media id was lost."""
        since = _utc(since)
        params: dict[str, Any] = {"fields": "id,caption,permalink,timestamp", "limit": 50}
        call = f"GET /{user_id}/media"
        for _ in range(20):  # 1000 posts back at most: reconciling looks at hours, not years
            body = self._call("GET", f"/{user_id}/media", token, params)
            items = body.get("data")
            if not isinstance(items, list):
                raise self._malformed(call, body, "data")
            recent = 0
            for item in items:
                try:
                    stamp = _parse_graph_time(item["timestamp"])
                except (KeyError, TypeError, ValueError):
                    raise self._malformed(call, body, "data[].timestamp") from None
                if stamp < since:
                    continue  # older (a pinned post may head the list, so do not stop at the first)
                recent += 1
                if _same_caption(item.get("caption"), caption):
                    return str(item["id"]), str(item.get("permalink") or "")
            if not recent:
                return None  # a whole page older than `since`: the rest is older still
            after = ((body.get("paging") or {}).get("cursors") or {}).get("after")
            if not items or not after or not (body.get("paging") or {}).get("next"):
                return None
            # The cursor, not paging.next: that URL carries the token.
            params = {**params, "after": after}
        return None

    def token_info(self, token: str) -> TokenInfo:
        """GET /debug_token for the token itself. A token Meta rejects (code 190) is reported as
        TokenInfo(valid=False) rather than raised; other failures raise GraphError."""
        try:
            body = self._call("GET", "/debug_token", token, {"input_token": token})
        except GraphError as exc:
            if exc.kind == "auth" and exc.code == 190:
                return TokenInfo(valid=False, expires_at=None)
            raise
        data = body.get("data")
        if not isinstance(data, dict):
            raise self._malformed("GET /debug_token", body, "data")
        expires = data.get("expires_at")
        expires_at = datetime.fromtimestamp(int(expires), timezone.utc) if expires else None  # 0 = never
        return TokenInfo(valid=bool(data.get("is_valid")), expires_at=expires_at)

    # --- plumbing ------------------------------------------------------------------------------

    def _call(self, method: str, path: str, token: str, params: dict[str, Any], on_ambiguous=None,
              on_headers=None) -> dict[str, Any]:
        """One Graph request with retries for kind "transient". `on_ambiguous(failure)` decides for
        a failure whose request may have been carried out: it raises, or returns to retry.
        `on_headers(headers)` sees every answer's headers (the usage headers, for pacing)."""
        call = f"{method} {path}"
        url = self.base_url.rstrip("/") + path
        payload = {**params, "access_token": token}
        for attempt in range(self.max_retries + 1):
            # The failure is handled outside the except block, so that no exception chain
            # (__context__) leads back to the HTTP library's exceptions, whose text may hold the URL and token.
            failure = None
            try:
                return self._attempt(method, url, call, token, payload, on_headers)
            except _Failure as caught:
                failure = caught
            error = failure.error
            error.attempts = attempt + 1
            if error.kind != "transient":
                raise GraphError(**_fields(error))
            if failure.ambiguous and on_ambiguous is not None:
                on_ambiguous(failure)  # raises unless a retry is safe
            if attempt == self.max_retries:
                raise GraphError(**{**_fields(error), "message": f"gave up after {attempt + 1} attempts; "
                                                                 f"last error: {error.message}"})
            wait = backoff_wait(self.backoff_s, attempt, MAX_BACKOFF_S)
            if error.retry_after_s is not None:
                if error.retry_after_s > MAX_BACKOFF_S:
                    # Not worth holding a worker for: the caller reschedules.
                    raise GraphError(**_fields(error))
                wait = max(wait, error.retry_after_s)
            sleep(wait)
        raise AssertionError("unreachable")


    def _attempt(self, method: str, url: str, call: str, token: str, payload: dict[str, Any],
                 on_headers=None) -> dict[str, Any]:
        """One request. Raises _Failure (built outside any except block: see _call)."""
        transport: tuple[str, bool] | None = None  # (message, ambiguous)
        try:
            parts = urlsplit(url)
            pool, full_url = _thread_pool(f"{parts.scheme}://{parts.netloc}")
            target = url if full_url else parts.path
            timeout = urllib3.Timeout(connect=self.timeout_s, read=self.timeout_s)
            form = urlencode(payload)
            if method == "GET":
                response = pool.urlopen("GET", f"{target}?{form}", timeout=timeout, redirect=False, retries=False)
            else:
                response = pool.urlopen(method, target, body=form, headers=_FORM, timeout=timeout, redirect=False,
                                        retries=False)
            raw = response.data
        except urllib3.exceptions.NewConnectionError as exc:  # refused, or no such host: nothing was sent
            transport = f"connection error: {scrub(str(exc), token)}", False
        except urllib3.exceptions.ConnectTimeoutError as exc:  # nothing was sent
            transport = f"connect timeout: {scrub(str(exc), token)}", False
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            # A reset, a closed socket or a read timeout may come after the server carried the
            # request out.
            what = "connection error" if isinstance(exc, urllib3.exceptions.ProtocolError) else type(exc).__name__
            transport = f"{what}: {scrub(str(exc), token)}", True
        if transport is not None:
            raise _Failure(GraphError("transient", transport[0], call=call), transport[1])
        status = response.status
        if on_headers is not None:
            on_headers(response.headers)
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            error = body["error"]
            code, subcode = _int_or_none(error.get("code")), _int_or_none(error.get("error_subcode"))
            transient = bool(error.get("is_transient"))
            text = " ".join(str(error.get(k)) for k in ("message", "error_user_msg") if error.get(k)) or "Graph API error"
            kind = classify(status, code, subcode, transient)
            raise _Failure(GraphError(kind, scrub(text, token), call=call, code=code, subcode=subcode,
                                      http_status=status, is_transient=transient,
                                      retry_after_s=_retry_after(response)),
                           # A Graph error body is a definite answer, unless the server says it failed itself.
                           status >= 500)
        if status >= 400 or not isinstance(body, dict):
            kind = classify(status, None, None, False)
            snippet = scrub(raw[:200].decode("utf-8", "replace"), token).strip()
            what = f"HTTP {status}" if status >= 400 else "an answer that is not a JSON object"
            if status < 400:
                kind = "transient"  # a proxy's garbage page: the call's outcome is unknown
            raise _Failure(GraphError(kind, f"{what}: {snippet!r}", call=call, http_status=status,
                                      retry_after_s=_retry_after(response)),
                           status >= 500 or status < 400)
        return body

    def _after_lost_publish(self, failure: _Failure, container_id: str, token: str) -> None:
        """A publish whose answer was lost: retry only if the container is still FINISHED."""
        error = failure.error
        try:
            status = self.container_status(container_id, token)
        except GraphError as exc:
            raise GraphError(**{**_fields(error), "message": f"{error.message}; the container's status is unknown "
                                                             f"({exc.message}), so the publish was not repeated"}) from None
        if status == "FINISHED":
            return  # not published: repeating is safe
        kind = {"EXPIRED": "recreate", "ERROR": "media"}.get(status, "transient")
        raise GraphError(**{**_fields(error), "kind": kind, "container_status": status,
                            "message": f"{error.message}; container {container_id} is now {status}"
                                       + (", so the post went out and its media id was lost: reconcile with find_media"
                                          if status == "PUBLISHED" else "")}) from None

    @staticmethod
    def _field(body: dict[str, Any], key: str, call: str) -> str:
        value = body.get(key)
        if value in (None, ""):
            raise InstagramGraphClient._malformed(call, body, key)
        return str(value)

    @staticmethod
    def _malformed(call: str, body: Any, what: str) -> GraphError:
        return GraphError("permanent", f"answer lacks {what}: {scrub(json.dumps(body)[:200])}", call=call, http_status=200)


def _fields(error: GraphError) -> dict[str, Any]:
    return dict(kind=error.kind, message=error.message, call=error.call, code=error.code, subcode=error.subcode,
                http_status=error.http_status, is_transient=error.is_transient, retry_after_s=error.retry_after_s,
                container_status=error.container_status, attempts=error.attempts)


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
