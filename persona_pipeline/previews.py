"""Contact sheets for the Dagster UI: a grid of thumbnails with each image's label drawn under that
image, and the markdown that shows a sheet.

Dagster has no image metadata type; an image is markdown. The asset page shows a markdown entry
inline only while it is under 1000 characters (longer ones hide behind "[Show Markdown]"), so a
sheet shown directly is a short link to a PNG the review form serves, and a base64 copy (always
longer) is the fallback that needs no form. The labels are drawn into the PNG because markdown
cannot put text under each image of one picture, and one row of labels under the whole sheet
cannot be matched to the tiles."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path


DAGSTER_INLINE_LIMIT = 1000  # characters: the UI shows a shorter markdown entry without a click
# 3 x 124 px: the sheet fits the metadata value column of the asset page at a 1400 px wide window
# (markdown cannot size an image, and a wider one is cut off behind a scroll bar).
THUMB = 124
COLUMNS = 3
LABEL_LINES = 3
FONT_SIZE = 11
LINE_HEIGHT = 13
BACKGROUND = (245, 245, 245)
INK = (30, 30, 30)


def _font() -> ImageFont.ImageFont:
    from PIL import ImageFont

    return ImageFont.load_default(size=FONT_SIZE)


def wrap_label(label: str, width: float, measure, lines: int = LABEL_LINES) -> list[str]:
    """`label` broken at spaces into at most `lines` lines of at most `width` pixels (`measure` gives
    a text's width); a word too long for a line is cut, and text that does not fit ends in "…"."""
    out: list[str] = []
    current = ""
    for word in label.split():
        candidate = f"{current} {word}" if current else word
        if measure(candidate) <= width:
            current = candidate
            continue
        if current:
            out.append(current)
        current = word
        while len(current) > 1 and measure(current) > width:
            current = current[:-1]
    if current:
        out.append(current)
    if len(out) <= lines:
        return out
    kept = out[:lines]
    last = kept[-1]
    while last and measure(last + "…") > width:
        last = last[:-1]
    kept[-1] = last + "…"
    return kept


def contact_sheet_png(paths: Sequence[Path], labels: Sequence[str] | None = None, thumb: int = THUMB,
                      columns: int = COLUMNS) -> bytes | None:
    """A grid of `paths` as PNG bytes, each label (when given) under its image; None for no paths.
    An unreadable image leaves its tile empty under its label: a preview must never fail the asset."""
    from PIL import Image, ImageDraw

    paths = list(paths)
    if not paths:
        return None
    labels = list(labels) if labels else []
    font = _font()
    label_height = LINE_HEIGHT * LABEL_LINES + 4 if labels else 0
    cell_h = thumb + label_height
    columns = max(1, min(columns, len(paths)))
    rows = (len(paths) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * thumb, rows * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for index, path in enumerate(paths):
        x, y = (index % columns) * thumb, (index // columns) * cell_h
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                scale = (thumb - 4) / max(image.width, image.height)  # up too: a tiny render stays visible
                image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                     Image.Resampling.LANCZOS)
                sheet.paste(image, (x + (thumb - image.width) // 2, y + 2))
        except OSError:
            pass
        if index < len(labels):
            lines = wrap_label(labels[index], thumb - 6, lambda text: draw.textlength(text, font=font))
            for line_no, line in enumerate(lines):
                draw.text((x + 3, y + thumb + 1 + line_no * LINE_HEIGHT), line, fill=INK, font=font)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def image_md(source: str, alt: str) -> str:
    """One markdown image; `alt` is cut short and stripped of what would end it early."""
    alt = " ".join(alt.replace("[", "(").replace("]", ")").split())
    if len(alt) > 160:
        alt = alt[:159] + "…"
    return f"![{alt}]({source})"


def shown_inline(markdown: str) -> bool:
    """Whether the Dagster UI shows this markdown entry on the asset page without a click."""
    return len(markdown) < DAGSTER_INLINE_LIMIT
