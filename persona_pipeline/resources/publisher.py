"""Publishers: the one `publisher` resource the publish op takes.

- `OutboxPublisher` (the default, a dry run): the post's JPEG and a caption JSON under
  PERSONA_HOME/outbox/<persona>/. Idempotent per post id, so a rerun, or a crash between publishing
  and recording it, never posts twice.
- `InstagramPublisher`: the Instagram Graph API (REFERENCES.md §3) through `InstagramGraphClient`.
  It holds the settings and the media steps (the public JPEG and its URL check); the flow itself
  (claims, quota, container, status, publish, crash recovery) is in automation/publishing.py.

Both share `Publisher`: its retry settings and worker count are read by `publish_due`.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import dagster as dg
import requests

from persona_pipeline.domain import media
from persona_pipeline.fileio import atomic_write, sha256_file
from persona_pipeline.resources.instagram import InstagramGraphClient


@dataclass(frozen=True)
class PublishOutcome:
    external_id: str
    already_published: bool
    location: str


class Publisher(dg.ConfigurableResource):
    """What every publisher shares. A failed post waits `retry_wait_s` × 2^(retries − 1) (capped at
    6 h) before its next attempt; after `max_retries` failures it is abandoned."""

    name: str = "publisher"
    workers: int = 32  # PERSONA_PUBLISH_WORKERS: accounts published in parallel
    max_retries: int = 3  # PERSONA_PUBLISH_MAX_RETRIES
    retry_wait_s: float = 300.0


class OutboxPublisher(Publisher):
    home: str
    name: str = "outbox"
    # Outbox failures are local (a missing file): the schedule's own interval spaces the retries.
    retry_wait_s: float = 0.0

    def outbox_dir(self, persona_slug: str) -> Path:
        return Path(self.home) / "outbox" / persona_slug

    def publish(self, *, post_id: int, persona_slug: str, account: str, media_path: Path, caption: str,
                hashtags: list[str], scheduled_at: datetime) -> PublishOutcome:
        folder = self.outbox_dir(persona_slug)
        record = folder / f"post-{post_id:06d}.json"
        if record.is_file():  # written last: its presence means this post went out already
            existing = json.loads(record.read_text())
            return PublishOutcome(existing["external_id"], True, str(record))
        media_path = Path(media_path)
        if not media_path.is_file():
            raise FileNotFoundError(f"post {post_id}: media file {media_path} is missing")
        image_path = folder / f"post-{post_id:06d}.jpg"
        image_sha = atomic_write(image_path, media_path.read_bytes())
        external_id = f"outbox-{persona_slug}-{post_id}"
        atomic_write(record, json.dumps({
            "post_id": post_id, "external_id": external_id, "persona": persona_slug, "account": account,
            "caption": caption, "hashtags": hashtags, "text": caption + ("\n\n" + " ".join(hashtags) if hashtags else ""),
            "image": image_path.name, "image_sha256": image_sha, "source_sha256": sha256_file(media_path),
            "scheduled_at": scheduled_at.isoformat(), "published_at": datetime.now(timezone.utc).isoformat(),
        }, indent=2).encode())
        return PublishOutcome(external_id, False, str(record))


@dataclass(frozen=True)
class StagedMedia:
    path: Path
    url: str
    sha256: str
    exported: bool  # True: re-encoded by export_post_jpeg; False: the source bytes as they were


class MediaProblem(ValueError):
    """The post's image cannot be put online as it is; the message names the file."""


class InstagramPublisher(Publisher):
    """Publishes through the Graph API. Each persona's token is read at publish time from the
    environment variable its persona.yaml names (`instagram.token_env`), never stored."""

    graph: InstagramGraphClient
    media_public_base_url: str  # MEDIA_PUBLIC_BASE_URL: where media_public_dir is served
    media_public_dir: str  # MEDIA_PUBLIC_DIR
    token_warn_days: int = 7  # INSTAGRAM_TOKEN_WARN_DAYS
    name: str = "instagram"
    # Containers prepared ahead of the publish calls, per account (0: strictly one post at a time).
    prepare_ahead: int = 4
    media_check_timeout_s: float = 5.0

    def token(self, token_env: str) -> str | None:
        value = os.environ.get(token_env, "").strip()
        return value or None

    def stage_media(self, persona_slug: str, post_id: int, source: Path) -> StagedMedia:
        """Put the post's JPEG at MEDIA_PUBLIC_DIR/<slug>/<post-id>-<sha12>.jpg: the source bytes
        when they already meet Instagram's rules (domain/media.check_post_jpeg), else an export
        (JPEG ≤ 8 MiB, aspect fitted by padding). The name holds the content hash, so a changed
        image gets a new URL and a CDN never serves a stale copy."""
        source = Path(source)
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise MediaProblem(f"post {post_id}: media file {source} cannot be read ({exc.strerror or exc})") from None
        exported = bool(media.check_post_jpeg(data))
        if exported:
            try:
                data = media.export_post_jpeg(source)
            except media.MediaError as exc:
                raise MediaProblem(f"post {post_id}: {exc}") from None
            problems = media.check_post_jpeg(data)
            if problems:  # export_post_jpeg promises this cannot happen; say so if it does
                raise MediaProblem(f"post {post_id}: the export of {source} still breaks Instagram's rules: "
                                   + "; ".join(problems))
        sha = hashlib.sha256(data).hexdigest()
        name = f"{post_id}-{sha[:12]}.jpg"
        target = Path(self.media_public_dir) / persona_slug / name
        if not (target.is_file() and sha256_file(target) == sha):
            atomic_write(target, data)
        return StagedMedia(target, f"{self.media_public_base_url.rstrip('/')}/{persona_slug}/{name}", sha, exported)

    def check_media_url(self, url: str) -> str | None:
        """None when `url` answers 200 (HEAD, or GET when HEAD is not allowed; up to 3 redirects
        followed), else the problem. Instagram fetches the image itself; an unreachable URL would
        cost a container and an obscure 2207052, so it is checked first. http.client directly
        (a quarter of requests' CPU per call), unless the environment routes this host through a proxy."""
        if not self.media_public_base_url:
            return "MEDIA_PUBLIC_BASE_URL is not set: Instagram needs a public URL to fetch the image from"
        try:
            status = _url_status(url, self.media_check_timeout_s)
        except (OSError, http.client.HTTPException, requests.RequestException, ValueError) as exc:
            return f"media URL {url} is unreachable ({type(exc).__name__}: {exc})"
        if status != 200:
            return f"media URL {url} answered HTTP {status}"
        return None


@lru_cache(maxsize=64)
def _proxied(scheme: str, host: str) -> bool:
    proxies = urllib.request.getproxies()
    return scheme in proxies and not urllib.request.proxy_bypass(host)


def _url_status(url: str, timeout: float) -> int:
    for _hop in range(4):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url}")
        if _proxied(parts.scheme, parts.hostname):
            response = requests.head(url, timeout=timeout, allow_redirects=True)
            if response.status_code in (405, 501):
                with requests.get(url, timeout=timeout, stream=True) as response:
                    pass
            return response.status_code
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        for method in ("HEAD", "GET"):
            connection = kind(parts.hostname, parts.port, timeout=timeout)
            try:
                connection.request(method, path)
                response = connection.getresponse()
                status, location = response.status, response.getheader("Location")
            finally:
                connection.close()  # a GET's body is never read: closing drops it
            if status not in (405, 501):
                break
        if status in (301, 302, 303, 307, 308) and location:
            url = urljoin(url, location)
            continue
        return status
    raise ValueError(f"more than 3 redirects from {url}")
