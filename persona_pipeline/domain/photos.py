"""Decode, check and normalise one source photo (bytes in, PNG bytes out; no file system)."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class AcceptedPhoto:
    png: bytes
    width: int
    height: int
    pixel_sha256: str  # hash of the normalised pixels: catches the same picture saved twice
    original_mode: str
    rotated: bool


@dataclass(frozen=True)
class RejectedPhoto:
    reason: str


def inspect_photo(data: bytes, *, min_side: int, max_side: int) -> AcceptedPhoto | RejectedPhoto:
    """Decode fully (a truncated file fails here, not later), apply EXIF orientation, convert to
    RGB, refuse images whose short side is below `min_side`, and shrink the long side to `max_side`."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        return RejectedPhoto("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except UnidentifiedImageError:
        return RejectedPhoto("not an image: no decoder recognises the file's content")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return RejectedPhoto(f"refused as a decompression bomb: {exc}")
    except (OSError, SyntaxError, ValueError) as exc:
        return RejectedPhoto(f"corrupt image ({type(exc).__name__}: {exc})")

    original_mode = image.mode
    orientation = image.getexif().get(0x0112, 1)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as exc:  # a malformed EXIF block must not stop ingestion
        return RejectedPhoto(f"corrupt EXIF orientation ({type(exc).__name__}: {exc})")
    image = _to_rgb(image)

    width, height = image.size
    if min(width, height) < min_side:
        return RejectedPhoto(f"too small: {width}x{height}, the short side must be at least {min_side} px")
    if max(width, height) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        width, height = image.size

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return AcceptedPhoto(
        png=buffer.getvalue(),
        width=width,
        height=height,
        pixel_sha256=hashlib.sha256(image.tobytes()).hexdigest(),
        original_mode=original_mode,
        rotated=orientation not in (1, None),
    )


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency flattened onto white (dropping alpha would turn it black), and
    high-bit-depth greys scaled by their real range (PIL's convert clips them: see _grey_to_8bit)."""
    from PIL import Image

    if image.mode.startswith("I") or image.mode == "F":
        return _grey_to_8bit(image).convert("RGB")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "CMYK":
        # PIL's CMYK->RGB ignores Adobe's inverted CMYK; this is the plain conversion, good enough
        # for a training photo and far better than refusing it.
        return image.convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def _grey_to_8bit(image: Image.Image) -> Image.Image:
    """One 8-bit grey ("L") from a 16-bit, 32-bit integer or float grey, by the range its values
    really use. PIL's own convert clips at 255 (a 16-bit 30000 becomes white, and two different
    16-bit photos become the same "duplicate") and truncates a float 0.46 to black.

    - I;16, I;16B, I;16L...: 16-bit samples, 0..65535 -> 0..255.
    - I (32-bit integer): values within 0..65535 are 16-bit samples (what a 16-bit file decoded
      as I holds; the file does not say it used less); anything beyond is stretched from the
      image's own minimum..maximum.
    - F (float): values within 0..1 are the usual normalised range; anything else is stretched
      from its own minimum..maximum (NaN and -inf count as the minimum, +inf as the maximum).
    A constant image outside those ranges (no range to stretch) is clipped into 0..255.
    """
    import numpy as np
    from PIL import Image

    values = np.asarray(image).astype(np.float32)  # float32: exact for 16-bit, plenty for an 8-bit result
    finite = np.isfinite(values)
    low, high = (float(values[finite].min()), float(values[finite].max())) if finite.any() else (0.0, 0.0)
    if not finite.all():
        values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= 65535):
        scaled = values * (255.0 / 65535.0)
    elif image.mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:
        scaled = values
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
