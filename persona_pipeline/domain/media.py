"""The JPEG a post publishes: what Instagram's content-publishing API accepts (docs/rules.md#graph-api-limits:
JPEG only, at most 8 MiB, aspect ratio between 4:5 and 1.91:1).

`export_post_jpeg` turns any readable image into such a JPEG; `check_post_jpeg` says what is wrong
with bytes that claim to be one (the publisher checks before handing a URL to Meta, whose refusal
would cost an API call and a retry). Pure apart from reading the source file; PIL does the pixels.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: imported where used, not when the code location loads
    from PIL import Image

MAX_MEDIA_BYTES = 8 * 1024 * 1024
MIN_ASPECT = 4 / 5
MAX_ASPECT = 1.91
MAX_SIDE = 1440  # Instagram shows feed photos at most 1440 px wide: more is bytes for nothing
QUALITIES = (92, 86, 80, 74, 67, 60)
MIN_SIDE = 320  # below this a post is not worth publishing: fail instead of shrinking further
PAD_COLOUR = (255, 255, 255)


class MediaError(ValueError):
    """An image that cannot become (or is not) a publishable JPEG; the message names the file."""


def fit_aspect(width: int, height: int) -> tuple[int, int]:
    """The smallest canvas (new_w, new_h) that holds a width x height image and whose ratio lies in
    [MIN_ASPECT, MAX_ASPECT]: too tall gets wider, too wide gets taller, otherwise unchanged.
    Integer arithmetic, so the result is in range exactly, not up to float rounding."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if width * 5 < height * 4:  # ratio < 4/5
        return -(-height * 4 // 5), height  # ceil(height * 4/5)
    if width * 100 > height * 191:  # ratio > 1.91
        return width, -(-width * 100 // 191)  # ceil(width / 1.91)
    return width, height


def open_rgb(source: Path, draft: int | None = None) -> Image.Image:
    """The source as upright RGB: EXIF orientation applied, transparency flattened onto white. With
    `draft`, a JPEG may be decoded at 1/2 to 1/8 scale, still at least `draft` px a side."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(source) as opened:
            if draft:
                opened.draft("RGB", (draft, draft))
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError, SyntaxError) as exc:
        raise MediaError(f"{source}: cannot read the image ({type(exc).__name__}: {exc})") from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, PAD_COLOUR)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits before RGB, which would otherwise clip to white.
        image = image.convert("I").point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def _scaled(image: Image.Image, long_side: int) -> Image.Image:
    from PIL import Image

    if max(image.size) <= long_side:
        return image
    factor = long_side / max(image.size)
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _padded(image: Image.Image) -> Image.Image:
    """Centred on a white canvas of the fitted aspect: padding, never a crop, so the persona is
    never cut out of her own photo."""
    from PIL import Image

    width, height = fit_aspect(*image.size)
    if (width, height) == image.size:
        return image
    canvas = Image.new("RGB", (width, height), PAD_COLOUR)
    canvas.paste(image, ((width - image.width) // 2, (height - image.height) // 2))
    return canvas


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    # Baseline (not progressive) 4:2:0, no EXIF: the orientation is already applied.
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def export_post_jpeg(source: Path, max_bytes: int = MAX_MEDIA_BYTES, max_side: int = MAX_SIDE) -> bytes:
    """The bytes of a publishable JPEG made from `source`: RGB, upright, long side <= `max_side`,
    aspect fitted by padding, at most `max_bytes`. JPEG quality steps down 92 -> 60 first; if even
    60 is too big, the picture is scaled down (by the square root of the size overshoot) and tried
    again. A corrupt or unreadable source, or one that cannot fit, is a MediaError naming it."""
    source = Path(source)
    content = open_rgb(source)
    long_side = min(max_side, max(content.size))
    while True:
        picture = _padded(_scaled(content, long_side))
        for quality in QUALITIES:
            data = _jpeg(picture, quality)
            if len(data) <= max_bytes:
                return data
            if len(data) > 3 * max_bytes:
                break  # no quality step brings 3x down to 1x: save the encodes, scale down now
        if long_side <= MIN_SIDE:
            raise MediaError(f"{source}: even at {picture.width}x{picture.height} and JPEG quality {QUALITIES[-1]} "
                             f"the image is {len(data)} bytes, more than {max_bytes}")
        # Bytes grow about with the pixel count, so shrink each side by the root of the overshoot.
        long_side = max(MIN_SIDE, int(long_side * min(0.9, math.sqrt(max_bytes / len(data)) * 0.95)))


def check_post_jpeg(data: bytes, max_bytes: int = MAX_MEDIA_BYTES) -> list[str]:
    """What stops Instagram from taking `data` as a post image; empty when nothing does."""
    from PIL import Image, UnidentifiedImageError

    problems: list[str] = []
    if len(data) > max_bytes:
        problems.append(f"{len(data)} bytes, more than {max_bytes} ({max_bytes // (1024 * 1024)} MiB)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, (width, height) = image.format, image.size
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError, SyntaxError):
        return problems + ["not an image PIL can read (Instagram takes JPEG only)"]
    if fmt != "JPEG":
        problems.append(f"{fmt} image, Instagram takes JPEG only")
    if width * 5 < height * 4 or width * 100 > height * 191:
        problems.append(f"aspect ratio {width}x{height} = {width / height:.3f} is outside 4:5..1.91:1 "
                        f"(0.8..1.91)")
    return problems


def image_size(path: str | Path | None) -> tuple[int, int]:
    """(width, height) of the image at `path` from its header; (0, 0) when it cannot be read (the
    format rules then name it as no picture)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError, TypeError, SyntaxError):
        return 0, 0


THUMB_SIDE = 120  # a calendar card shows a post at most 48x60 CSS px: 2x for a sharp screen
THUMB_QUALITY = 75


def thumbnail_jpeg(source: Path, max_side: int = THUMB_SIDE) -> bytes:
    """A small JPEG of `source` for pages that show many posts at once (the calendar inlines them):
    upright RGB, long side <= `max_side`, the same aspect as the source (a post's media is already
    the export's padded aspect). A MediaError names a file that cannot be read."""
    from PIL import Image

    picture = open_rgb(Path(source), draft=max_side)
    picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return _jpeg(picture, THUMB_QUALITY)


def export_item_jpeg(source: Path, size: tuple[int, int], focus: tuple[float, float] = (0.5, 0.5),
                     max_bytes: int = MAX_MEDIA_BYTES) -> bytes:
    """A carousel item: `source` cropped to `size`'s aspect around the focus point (the reviewer's
    crop, post_formats.crop_box) and scaled to `size`, as a JPEG of at most `max_bytes`. Every item
    of a carousel goes through this with one size, so they share one aspect exactly."""
    return picture_jpeg(open_rgb(Path(source)), size, focus, max_bytes, source=str(source))


def picture_jpeg(picture: Image.Image, size: tuple[int, int], focus: tuple[float, float] = (0.5, 0.5),
                 max_bytes: int = MAX_MEDIA_BYTES, *, source: str = "picture") -> bytes:
    """`export_item_jpeg` on a picture already decoded (a video clip's frame)."""
    from PIL import Image

    from persona_pipeline.domain.post_formats import crop_box

    box = crop_box(picture.width, picture.height, size, focus)
    picture = picture.resize(size, Image.Resampling.LANCZOS, box=box)
    for quality in QUALITIES:
        data = _jpeg(picture, quality)
        if len(data) <= max_bytes:
            return data
    raise MediaError(f"{source}: even at JPEG quality {QUALITIES[-1]} the {size[0]}x{size[1]} item is "
                     f"{len(data)} bytes, more than {max_bytes}")


def vertical_frame(source: Path, size: tuple[int, int] = (1080, 1920), safe_top: int = 0,
                   safe_bottom: int = 0) -> Image.Image:
    """`source` on a 9:16 canvas for a story: the whole picture fitted between the safe bands
    (`safe_top`, `safe_bottom` px kept clear of the subject, where Instagram draws its own bar and
    reply field) over a darkened, blurred fill of itself, so nothing of the persona is cut or covered."""
    from PIL import Image, ImageEnhance, ImageFilter

    picture = open_rgb(Path(source))
    width, height = size
    cover = max(width / picture.width, height / picture.height)
    fill = picture.resize((max(width, round(picture.width * cover)), max(height, round(picture.height * cover))),
                          Image.Resampling.BILINEAR)
    left, top = (fill.width - width) // 2, (fill.height - height) // 2
    fill = fill.crop((left, top, left + width, top + height)).filter(ImageFilter.GaussianBlur(24))
    canvas = ImageEnhance.Brightness(fill).enhance(0.6)
    room = height - safe_top - safe_bottom
    fit = min(width / picture.width, room / picture.height)
    inner = picture.resize((max(1, round(picture.width * fit)), max(1, round(picture.height * fit))),
                           Image.Resampling.LANCZOS)
    canvas.paste(inner, ((width - inner.width) // 2, safe_top + (room - inner.height) // 2))
    return canvas


def story_jpeg(source: Path, size: tuple[int, int], safe_top: int, safe_bottom: int) -> bytes:
    """An image story's JPEG (vertical_frame), at most MAX_MEDIA_BYTES."""
    picture = vertical_frame(source, size, safe_top, safe_bottom)
    for quality in QUALITIES:
        data = _jpeg(picture, quality)
        if len(data) <= MAX_MEDIA_BYTES:
            return data
    raise MediaError(f"{source}: the {size[0]}x{size[1]} story frame is over {MAX_MEDIA_BYTES} bytes")
