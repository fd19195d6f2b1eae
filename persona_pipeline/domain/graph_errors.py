"""What to do about an Instagram Graph API error: the pure part of the publisher's error handling.

`classify(http_status, code, subcode, is_transient)` maps an answer (or its absence) to one kind:

- "transient": try the same call again after a backoff. Throttling codes 1, 2, 4, 17, 32, 613 and
  80002 (business-use-case rate limit), anything the API marks `is_transient`, the server-side
  subcodes 2207001, 2207003, 2207032, 2207027 ("media not ready": the container is still being
  processed), HTTP 429 and 5xx, and no answer at all (connection error, timeout, dropped socket).
- "recreate": the container is gone (2207020 expired, 2207053 unknown upload error, 2207008 container
  not found): create a new container, then publish that.
- "window": the account's 24 h publishing limit is reached (code 9 or subcode 2207042): wait for the
  moving window to free a slot, never hammer.
- "spam": 2207051, or code 368 (action deemed abusive): Instagram restricts the account; stop
  publishing to it until a person looks.
- "media": the image itself is refused (2207004 over 8 MiB, 2207005 format, 2207009 / code 36003
  aspect ratio, 2207052 / code 9004 not fetchable, 2207026 and 2207023 unsupported media): export or
  host the file again; retrying the same bytes cannot help.
- "auth": the token is rejected or expired (190, 102) or lacks a permission (10, 200-299).
- "permanent": anything else (a bad parameter, a caption over the limits...): a person decides.

Subcodes are checked before codes because Instagram puts a specific subcode under a generic code:
2207051 (spam) comes with code 4, which alone means throttling. Source: Meta's "Instagram Platform
error codes" table and the Graph API error handling guide (docs/rules.md#graph-api-errors).
"""

from __future__ import annotations

KINDS = ("transient", "recreate", "window", "spam", "media", "auth", "permanent")

# code -> kind, for codes whose meaning does not depend on the subcode.
THROTTLING_CODES = frozenset({1, 2, 4, 17, 32, 613, 80002})
WINDOW_CODES = frozenset({9})
AUTH_CODES = frozenset({10, 102, 190}) | frozenset(range(200, 300))
SPAM_CODES = frozenset({368})
# 36000 image too large, 36001 format, 36003 aspect ratio, 9004 media not fetchable.
MEDIA_CODES = frozenset({36000, 36001, 36003, 9004})

# subcode -> kind; these win over the code.
SUBCODE_KINDS: dict[int, str] = {
    2207001: "transient",  # Instagram server error
    2207003: "transient",  # downloading the media took too long
    2207032: "transient",  # creating the container failed
    2207027: "transient",  # "Media ID is not available": container not FINISHED yet (with code 9007)
    2207020: "recreate",   # container expired (24 h)
    2207053: "recreate",   # unknown upload error: a new container is the documented fix
    2207008: "recreate",   # container (media builder) not found
    2207042: "window",     # maximum posts per 24 h reached (with code 9)
    2207051: "spam",       # "We restrict certain activity..." (with code 4)
    2207004: "media",      # image over 8 MiB (with code 36000)
    2207005: "media",      # image format not supported (with code 36001)
    2207009: "media",      # aspect ratio not supported (with code 36003)
    2207052: "media",      # media could not be fetched from the URI (with code 9004)
    2207026: "media",      # unsupported media format
    2207023: "media",      # unknown media type
}


def classify(http_status: int | None, code: int | None, subcode: int | None, is_transient: bool) -> str:
    """The kind of a Graph API failure (one of `KINDS`). `http_status` None with `code` None
    means no answer came (connection refused or dropped, timeout): transient."""
    if subcode is not None and subcode in SUBCODE_KINDS:
        return SUBCODE_KINDS[subcode]
    if code is not None:
        if code in WINDOW_CODES:
            return "window"
        if code in AUTH_CODES:
            return "auth"
        if code in SPAM_CODES:
            return "spam"
        if code in MEDIA_CODES:
            return "media"
        if code in THROTTLING_CODES:
            return "transient"
    if is_transient:
        return "transient"
    if http_status is None:
        # No error code and no HTTP status: the request never got an answer.
        return "transient" if code is None else "permanent"
    if http_status == 429 or 500 <= http_status <= 599:
        return "transient"
    return "permanent"


def is_retryable(kind: str) -> bool:
    """Whether the same call may simply be repeated after a backoff."""
    return kind == "transient"
