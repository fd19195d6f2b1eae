"""Serving candidate and post images from PERSONA_HOME (/media/...), and the URLs pages use for
them. Only an image file whose real path stays inside PERSONA_HOME is served; with an s3://
PERSONA_HOME a file the local cache lacks is fetched first."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response

from persona_pipeline.domain.links import media_path as media_url  # noqa: F401  (pages import it from here)
from persona_pipeline.domain.media import THUMB_SIDE, MediaError, thumbnail_jpeg
from persona_pipeline.fileio import atomic_write
from persona_pipeline.objectstore import ObjectStoreError
from persona_pipeline.review import auth
from persona_pipeline.review.web import config_of, home_of

# Images, and a reel's or video story's MP4 (the Posts page plays it).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".mp4"})
THUMB_CACHE = ".cache/thumbs"  # under PERSONA_HOME
# The data: URLs pages inline, kept in this process by (file, mtime, size): a month view reads the
# same few hundred thumbnails on every load, and hashing, reading and encoding each again was most
# of the page's server time. Bounded: emptied when full (a plain dict's get/set/clear are safe across
# the threadpool's threads).
_DATA_URLS: dict[tuple[str, int, int], str] = {}
DATA_URL_MEMO = 5000


def media_name_ok(raw: str) -> bool:
    """No `..`, `.` or empty segment, no absolute or drive path, no backslash or NUL, an image suffix."""
    if not raw or "\x00" in raw or "\\" in raw or raw.startswith("/") or re.match(r"^[A-Za-z]:", raw):
        return False
    if any(part in ("", ".", "..") for part in raw.split("/")):
        return False
    return Path(raw).suffix.lower() in IMAGE_SUFFIXES


def _lands_inside(home: Path, raw: str) -> bool:
    """Whether home/raw, symlinks followed as far as they exist, stays inside `home`."""
    try:
        return (home / raw).resolve().is_relative_to(home)
    except (OSError, RuntimeError):
        return False


def resolve_media(home: Path, raw: str) -> Path | None:
    """The image file `raw` names relative to `home` (already resolved), or None: no `..`, `.` or
    empty segment, no absolute or drive path, no backslash or NUL, an image suffix, and the real
    path (symlinks followed) inside home."""
    if not media_name_ok(raw):
        return None
    try:
        target = (home / raw).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not target.is_relative_to(home) or not target.is_file() or target.suffix.lower() not in IMAGE_SUFFIXES:
        return None
    return target


async def media(request: Request) -> Response:
    if auth.current_reviewer(request, config_of(request).tokens) is None:
        raise HTTPException(401, "log in first")
    home, raw = home_of(request), request.path_params["path"]
    target = resolve_media(home, raw)
    mirror = config_of(request).mirror
    # Not in the cache: fetch it from object storage, but only a safe name whose real folder is
    # inside PERSONA_HOME (the same containment check as above, before any request leaves).
    if target is None and mirror is not None and media_name_ok(raw) and _lands_inside(home, raw):
        try:
            await run_in_threadpool(mirror.pull, home / raw)
        except ObjectStoreError:
            raise HTTPException(503, "the image is not cached here and object storage did not answer") from None
        target = resolve_media(home, raw)
    if target is None:
        raise HTTPException(404, "no such image")
    # Candidate images never change under their path: let the browser keep them (privately).
    return FileResponse(target, headers={"Cache-Control": "private, max-age=3600"})


def thumbnail_src(home: Path, image_path: str | None) -> str | None:
    """What a page that shows many posts at once puts in an <img src>: the image's small JPEG
    (domain/media.thumbnail_jpeg, made once and kept under PERSONA_HOME/.cache/thumbs) inlined as a
    data: URL, so a month of posts costs no request per image. An image that is not here (not yet
    pulled from object storage) or cannot be read gets its /media URL; one outside home, None."""
    url = media_url(home, image_path)
    target = resolve_media(home, url.removeprefix("/media/")) if url else None
    if target is None:
        return url
    try:
        stat = target.stat()
        memo = (str(target), stat.st_mtime_ns, stat.st_size)
        if (known := _DATA_URLS.get(memo)) is not None:
            return known
        key = hashlib.sha256(f"{target.relative_to(home)}|{stat.st_mtime_ns}|{stat.st_size}|{THUMB_SIDE}".encode()).hexdigest()
        cached = home / THUMB_CACHE / key[:2] / f"{key}.jpg"
        try:
            data = cached.read_bytes()
        except FileNotFoundError:
            data = thumbnail_jpeg(target)
            atomic_write(cached, data)
    except (OSError, MediaError):
        return url
    if len(_DATA_URLS) >= DATA_URL_MEMO:
        _DATA_URLS.clear()
    _DATA_URLS[memo] = src = "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")
    return src
