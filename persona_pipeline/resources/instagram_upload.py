"""The Graph API's resumable upload of a video (the "rupload" flow), for a reel or video story whose MP4
is at no public URL (docs/posting.md#resumable-upload):

1. POST /{user}/media with upload_type=resumable (and the format's fields, no video_url): the container,
   whose id is committed on the post like any other, and the `uri` to send the bytes to;
2. POST the bytes to that uri with `Authorization: OAuth <token>`, `offset` and `file_size` headers, the
   body the file from `offset` on (streamed from disk, never held whole);
3. the container's status (IN_PROGRESS while Instagram processes it), then media_publish, as for a URL.

An upload cut off midway (a reset, a timeout) is resumed, not restarted: the container's video_status
says how many bytes arrived (`uploading_phase.bytes_transferred`), and the next POST starts at that
offset. A run killed during the upload does the same on its rerun, from the committed container.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import urllib3

from persona_pipeline.domain.retry import backoff_wait
from persona_pipeline.resources import instagram
from persona_pipeline.resources.instagram import GraphError, InstagramGraphClient, _thread_pool, scrub

MAX_BACKOFF_S = 30.0


def upload_video(graph: InstagramGraphClient, container_id: str, uri: str, token: str, path: Path,
                 log=lambda message: None) -> int:
    """Send `path` to the container's rupload `uri`, resuming at the offset Instagram reports after any
    interruption; returns the number of interruptions resumed. Raises GraphError: "transient" when the
    upload is still incomplete after `max_retries` resumes (the next run resumes it), "permanent" when
    Instagram refuses the bytes."""
    path = Path(path)
    size = path.stat().st_size
    status, offset = graph.upload_state(container_id, token)
    resumed, problem = 0, None
    for attempt in range(graph.max_retries + 1):
        if status == "complete" or offset >= size:
            return resumed
        if offset:
            log(f"container {container_id}: upload resumes at byte {offset} of {size}")
        problem = _post_bytes(graph, uri, token, path, offset, size)
        status, offset = graph.upload_state(container_id, token)
        if problem is None and status == "complete":
            return resumed
        resumed += 1
        if attempt < graph.max_retries:
            instagram.sleep(backoff_wait(graph.backoff_s, attempt, MAX_BACKOFF_S))  # patched with the fake's clock in tests
    raise GraphError("transient", f"the upload of {path.name} to container {container_id} is at byte {offset} of "
                                  f"{size} after {graph.max_retries + 1} tries ({problem or status}); the next run "
                                  "resumes it there", call=f"POST {_shown(uri)}")


def _post_bytes(graph: InstagramGraphClient, uri: str, token: str, path: Path, offset: int, size: int) -> str | None:
    """One upload POST from `offset`; None when Instagram took it, else what went wrong (a transport error or
    an answer that is no success). A refusal it says will not change (`retriable: false`) raises."""
    parts = urlsplit(uri)
    pool, full_url = _thread_pool(f"{parts.scheme}://{parts.netloc}")
    target = uri if full_url else parts.path + (f"?{parts.query}" if parts.query else "")
    headers = {"Authorization": f"OAuth {token}", "offset": str(offset), "file_size": str(size),
               "Content-Type": "application/octet-stream", "Content-Length": str(size - offset)}
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            response = pool.request("POST", target, body=handle, headers=headers, redirect=False, preload_content=True,
                                    timeout=urllib3.Timeout(connect=graph.timeout_s, read=graph.timeout_s * 10))
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        return f"{type(exc).__name__}: {scrub(str(exc), token)}"
    try:
        body = json.loads(response.data or b"{}")
    except ValueError:
        body = {}
    if response.status == 200 and isinstance(body, dict) and body.get("success"):
        return None
    info = (body.get("debug_info") or {}) if isinstance(body, dict) else {}
    message = scrub(str(info.get("message") or response.data[:200].decode("utf-8", "replace")), token)
    if info and info.get("retriable") is False:
        raise GraphError("permanent", f"Instagram refused the upload of {path.name}: {message}",
                         call=f"POST {_shown(uri)}", http_status=response.status)
    return f"HTTP {response.status}: {message}"


def _shown(uri: str) -> str:
    """The uri as logs and errors show it (its path: no host, no query)."""
    return urlsplit(uri).path
