"""A post's JPEG put online for Instagram to fetch: staged under MEDIA_PUBLIC_DIR (served at
MEDIA_PUBLIC_BASE_URL), and its URL checked before a container is made for it."""

from __future__ import annotations

import hashlib
import http.client
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests

from persona_pipeline.domain import media
from persona_pipeline.fileio import atomic_write, sha256_file


@dataclass(frozen=True)
class StagedMedia:
    path: Path
    url: str
    sha256: str
    exported: bool  # True: re-encoded by export_post_jpeg; False: the source bytes as they were


class MediaProblem(ValueError):
    """The post's image cannot be put online as it is; the message names the file."""


def stage_jpeg(public_dir: str, base_url: str, persona_slug: str, post_id: int, source: Path) -> StagedMedia:
    """Put the post's JPEG at <public_dir>/<slug>/<post-id>-<sha12>.jpg: the source bytes when they
    already meet Instagram's rules (domain/media.check_post_jpeg), else an export (JPEG ≤ 8 MiB,
    aspect fitted by padding). The name holds the content hash, so a changed image gets a new URL
    and a CDN never serves a stale copy."""
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
    target = Path(public_dir) / persona_slug / name
    if not (target.is_file() and sha256_file(target) == sha):
        atomic_write(target, data)
    return StagedMedia(target, f"{base_url.rstrip('/')}/{persona_slug}/{name}", sha, exported)


def stage_file(public_dir: str, base_url: str, persona_slug: str, stem: str, source: Path) -> StagedMedia:
    """Put a file as it is (a carousel item or story JPEG already exported to its format, a
    reel's MP4, a cover) at <public_dir>/<slug>/<stem>-<sha12><suffix>: the name holds the content
    hash, as stage_jpeg's does. A file that cannot be read is a MediaProblem naming it."""
    source = Path(source)
    try:
        sha = sha256_file(source)
    except OSError as exc:
        raise MediaProblem(f"{stem}: media file {source} cannot be read ({exc.strerror or exc})") from None
    name = f"{stem}-{sha[:12]}{source.suffix.lower()}"
    target = Path(public_dir) / persona_slug / name
    if not (target.is_file() and sha256_file(target) == sha):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{name}.partial")
        with open(source, "rb") as reader, open(tmp, "wb") as writer:
            for block in iter(lambda: reader.read(1 << 20), b""):
                writer.write(block)
        tmp.replace(target)
    return StagedMedia(target, f"{base_url.rstrip('/')}/{persona_slug}/{name}", sha, False)


def url_problem(url: str, timeout: float) -> str | None:
    """None when `url` answers 200 (HEAD, or GET when HEAD is not allowed; up to 3 redirects
    followed), else the problem. Instagram fetches the image itself; an unreachable URL would cost
    a container and an obscure 2207052, so it is checked first. http.client directly (a quarter of
    requests' CPU per call), unless the environment routes this host through a proxy."""
    try:
        status = _url_status(url, timeout)
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
