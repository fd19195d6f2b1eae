"""Serving candidate and post images from PERSONA_HOME (/media/...), and the URLs pages use for
them. Only an image file whose real path stays inside PERSONA_HOME is served; with an s3://
PERSONA_HOME a file the local cache lacks is fetched first."""

from __future__ import annotations

import base64
import hashlib
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response

from persona_pipeline.domain.links import media_path as media_url  # noqa: F401  (pages import it from here)
from persona_pipeline.domain.media import THUMB_QUALITY, THUMB_SIDE, MediaError, thumbnail_jpeg
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
# The calendar's sprites: one JPEG per page of the thumbnails of its posts, tiles of TILE px
# (4:5, a card's frame, cropped to fill) in rows of up to SPRITE_COLUMNS, so the browser fetches and
# decodes one image instead of hundreds (most of a month view's time in the browser). Kept under
# PERSONA_HOME/.cache/sprites by the set of its images' (file, mtime, size) keys, and in this process:
# a sprite's key -> the keys of its tiles, in order.
SPRITE_CACHE = ".cache/sprites"
SPRITE_COLUMNS = 20
SPRITE_MAX = 1000  # tiles; a page with more inlines each thumbnail instead (thumbnail_src)
TILE = (THUMB_SIDE * 4 // 5, THUMB_SIDE)
_SPRITES: dict[str, tuple[tuple[str, int, int], ...]] = {}
_SPRITE_NAME = re.compile(r"^[0-9a-f]{64}$")


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


def _thumbnail_key(home: Path, image_path: str | None) -> tuple[str | None, tuple[str, int, int] | None]:
    """(its /media URL, its (file, mtime, size) key) of a post's image, without reading it: an image
    that is not here (not yet pulled from object storage) has no key; one outside home not even a URL."""
    url = media_url(home, image_path)
    target = resolve_media(home, url.removeprefix("/media/")) if url else None
    if target is None:
        return url, None
    try:
        stat = target.stat()
    except OSError:
        return url, None
    return url, (str(target), stat.st_mtime_ns, stat.st_size)


def _thumbnail(home: Path, image_path: str | None) -> tuple[str | None, tuple[str, int, int] | None, bytes | None]:
    """(its /media URL, its key, its small JPEG) for a post's image: the JPEG made once
    (domain/media.thumbnail_jpeg) and kept under PERSONA_HOME/.cache/thumbs. An image that cannot
    be read has no key and no JPEG."""
    url, memo = _thumbnail_key(home, image_path)
    if memo is None:
        return url, None, None
    target, mtime, size = Path(memo[0]), memo[1], memo[2]
    key = hashlib.sha256(f"{target.relative_to(home)}|{mtime}|{size}|{THUMB_SIDE}".encode()).hexdigest()
    cached = home / THUMB_CACHE / key[:2] / f"{key}.jpg"
    try:
        try:
            data = cached.read_bytes()
        except FileNotFoundError:
            data = thumbnail_jpeg(target)
            atomic_write(cached, data)
    except (OSError, MediaError):
        return url, None, None
    return url, memo, data


@dataclass(frozen=True)
class Sprite:
    """One page's thumbnails in one JPEG: served at `url`, `columns` x `rows` tiles."""

    key: str
    columns: int
    rows: int

    @property
    def url(self) -> str:
        return f"/calendar/sprites/{self.key}.jpg"


def _sprite_key(keys: list[tuple[str, int, int]] | tuple[tuple[str, int, int], ...]) -> str:
    text = "\n".join(f"{name}|{mtime}|{size}" for name, mtime, size in keys)
    return hashlib.sha256(f"{TILE}|{SPRITE_COLUMNS}|{THUMB_SIDE}\n{text}".encode()).hexdigest()


def _sprite_shape(tiles: int) -> tuple[int, int]:
    columns = min(tiles, SPRITE_COLUMNS)
    return columns, math.ceil(tiles / columns)


def _compose(home: Path, sources: dict[tuple[str, int, int], str | None]) -> tuple[tuple[str, int, int], ...]:
    """Make the sprite of `sources` (key -> image path) under SPRITE_CACHE; returns the keys it
    holds, in tile order (those whose thumbnail could be read)."""
    thumbs = []
    for key, path in sources.items():
        _url, memo, data = _thumbnail(home, path)
        if memo == key and data is not None:
            try:
                with Image.open(io.BytesIO(data)) as opened:
                    thumbs.append((key, ImageOps.fit(opened.convert("RGB"), TILE, Image.Resampling.LANCZOS)))
            except OSError:
                continue
    keys = tuple(key for key, _ in thumbs)
    if not keys:
        return keys
    columns, rows = _sprite_shape(len(keys))
    sheet = Image.new("RGB", (columns * TILE[0], rows * TILE[1]), (233, 231, 226))
    for index, (_key, thumb) in enumerate(thumbs):
        sheet.paste(thumb, ((index % columns) * TILE[0], (index // columns) * TILE[1]))
    buffer = io.BytesIO()
    sheet.save(buffer, format="JPEG", quality=THUMB_QUALITY, optimize=True)
    atomic_write(home / SPRITE_CACHE / f"{_sprite_key(keys)}.jpg", buffer.getvalue())
    return keys


def thumbnail_sprite(home: Path, images: list[str | None]) -> tuple[Sprite | None, list[int | str | None]]:
    """The sprite of these posts' images (made once, kept), and for each image its tile's index in
    it, or, for one not in it (not here, unreadable), what thumbnail_src gives: its /media URL or
    None. More than SPRITE_MAX images: no sprite, each one's data: URL (thumbnail_src)."""
    found = [_thumbnail_key(home, image) for image in images]
    sources: dict[tuple[str, int, int], str | None] = {}
    for image, (_url, key) in zip(images, found):
        if key is not None:
            sources.setdefault(key, image)
    if not sources or len(sources) > SPRITE_MAX:
        return None, [thumbnail_src(home, image) for image in images]
    # Tiles in the order of their keys, not of the posts: a moved post finds the same sprite.
    sources = {key: sources[key] for key in sorted(sources)}
    wanted = _sprite_key(list(sources))
    keys = _SPRITES.get(wanted)
    if keys and not (home / SPRITE_CACHE / f"{_sprite_key(keys)}.jpg").is_file():
        keys = None  # the cache was emptied
    if keys is None:
        keys = tuple(sources) if (home / SPRITE_CACHE / f"{wanted}.jpg").is_file() else _compose(home, sources)
        if len(_SPRITES) >= DATA_URL_MEMO:
            _SPRITES.clear()
        _SPRITES[wanted] = keys
    if not keys:
        return None, [url for url, _key in found]
    index = {key: i for i, key in enumerate(keys)}
    tiles = [index[key] if key in index else url for url, key in found]
    return Sprite(_sprite_key(keys), *_sprite_shape(len(keys))), tiles


async def sprite(request: Request) -> Response:
    """A calendar sprite (thumbnail_sprite) by its key: its content never changes under its name."""
    if auth.current_reviewer(request, config_of(request).tokens) is None:
        raise HTTPException(401, "log in first")
    name = request.path_params["name"]
    target = home_of(request) / SPRITE_CACHE / f"{name}.jpg"
    if not _SPRITE_NAME.match(name) or not target.is_file():
        raise HTTPException(404, "no such sprite")
    return FileResponse(target, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})


def thumbnail_src(home: Path, image_path: str | None) -> str | None:
    """What a page that shows a post's small image puts in an <img src>: its thumbnail inlined as a
    data: URL (no request per image). An image that is not here (not yet pulled from object storage)
    or cannot be read gets its /media URL; one outside home, None."""
    url, memo = _thumbnail_key(home, image_path)
    if memo is not None and (known := _DATA_URLS.get(memo)) is not None:
        return known
    url, memo, data = _thumbnail(home, image_path)
    if memo is None or data is None:
        return url
    if len(_DATA_URLS) >= DATA_URL_MEMO:
        _DATA_URLS.clear()
    _DATA_URLS[memo] = src = "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")
    return src
