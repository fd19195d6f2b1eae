"""Reviewer login and CSRF for the review form.

A reviewer token (settings: `REVIEW_TOKENS=alice:tok1,bob:tok2`) is exchanged once for a session
cookie signed with itsdangerous (Starlette's SessionMiddleware: HttpOnly, SameSite=Lax). The
session also holds a random CSRF token, created before login so the login form carries one too;
every form POST sends it in a hidden field and every fetch() POST in the `X-CSRF-Token` header.
"""

from __future__ import annotations

import hmac
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable

from starlette.requests import Request

SESSION_REVIEWER = "reviewer"
SESSION_CSRF = "csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


def reviewer_for_token(tokens: dict[str, str], given: str) -> str | None:
    """The reviewer whose token is `given`, or None. Every configured token is compared in
    constant time (hmac.compare_digest) and none is skipped, so the timing tells nothing."""
    found = None
    given_bytes = given.encode("utf-8")
    for token, name in tokens.items():
        if hmac.compare_digest(token.encode("utf-8"), given_bytes) and token:
            found = name
    return found


def current_reviewer(request: Request, tokens: dict[str, str]) -> str | None:
    """The logged-in reviewer, while their name is still configured (dropping a reviewer from
    REVIEW_TOKENS ends their sessions too)."""
    name = request.session.get(SESSION_REVIEWER)
    if not isinstance(name, str) or not name or name not in tokens.values():
        return None
    return name


def csrf_token(request: Request) -> str:
    """The session's CSRF token, made on first use (also for a visitor who is not logged in)."""
    token = request.session.get(SESSION_CSRF)
    if not isinstance(token, str) or len(token) < 32:
        token = secrets.token_urlsafe(32)
        request.session[SESSION_CSRF] = token
    return token


def csrf_ok(request: Request, submitted: str | None) -> bool:
    """True when `submitted` is this session's CSRF token (constant-time compare)."""
    expected = request.session.get(SESSION_CSRF)
    if not isinstance(expected, str) or not expected or not submitted:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), submitted.encode("utf-8"))


def log_in(request: Request, reviewer: str) -> None:
    """Start a fresh session for `reviewer`: nothing from before login survives (no fixation),
    and the CSRF token is new."""
    request.session.clear()
    request.session[SESSION_REVIEWER] = reviewer
    request.session[SESSION_CSRF] = secrets.token_urlsafe(32)


def log_out(request: Request) -> None:
    request.session.clear()


def safe_next(target: str | None) -> str:
    """Where to go after login: only a local path (never `//host` or a scheme), else `/`."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


class LoginThrottle:
    """Failed logins per client address in a sliding window. Past `max_failures` failures within
    `window_s`, every login from that address, right token or not, is refused (429, Retry-After)
    until the oldest failure leaves the window: a guesser gets `max_failures` tries a window, and a
    real reviewer behind the same address waits at most `window_s`. A success clears the address."""

    MAX_ADDRESSES = 10_000  # past this, addresses with no failure left in the window are forgotten

    def __init__(self, max_failures: int = 10, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        if max_failures < 1 or window_s <= 0:
            raise ValueError(f"login throttle needs max_failures >= 1 and window_s > 0 (got {max_failures}, {window_s})")
        self.max_failures, self.window_s, self.clock = max_failures, window_s, clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, address: str, now: float) -> deque[float]:
        times = self._failures.get(address, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def retry_after(self, address: str) -> int | None:
        """Whole seconds until `address` may try again, or None when it may try now."""
        with self._lock:
            now = self.clock()
            times = self._recent(address, now)
            if len(times) < self.max_failures:
                return None
            return max(1, math.ceil(times[0] + self.window_s - now))

    def failed(self, address: str) -> None:
        with self._lock:
            now = self.clock()
            if len(self._failures) >= self.MAX_ADDRESSES:
                for known in [a for a in self._failures if not self._recent(a, now)]:
                    del self._failures[known]
            times = self._recent(address, now)
            times.append(now)
            self._failures[address] = times

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)
