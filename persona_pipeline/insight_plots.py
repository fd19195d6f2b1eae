"""The audience plots as small PNGs, drawn with PIL only (no matplotlib in the runtime image), like
training/loss_curve.py: engagement by group with intervals, an hour × weekday heatmap, and lines
over time (reach, or a benchmark's regret). Each takes plain numbers and returns PNG bytes; a
`title` ending in "(simulated)" is how callers label simulated data.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from persona_pipeline.domain.insight_stats import WEEKDAYS, GroupStat

if TYPE_CHECKING:  # annotations only: imported where used, not when the code location loads
    from PIL import Image

BACKGROUND, AXIS, TEXT, BAR, WHISKER, EMPTY = (255, 255, 255), (90, 90, 90), (40, 40, 40), (31, 90, 180), (20, 20, 20), (235, 235, 235)
LINE_COLOURS = ((31, 90, 180), (220, 120, 30), (40, 150, 70), (170, 40, 40))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _font() -> ImageFont.ImageFont:
    from PIL import ImageFont

    return ImageFont.load_default()


def engagement_bars_png(stats: Sequence[GroupStat], title: str, width: int = 520, row: int = 22) -> bytes:
    """Horizontal bars of each group's engagement rate with its 95 % interval and n."""
    from PIL import Image, ImageDraw

    font = _font()
    label_w, top = 150, 24
    height = top + row * max(1, len(stats)) + 24
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((6, 4), title, fill=TEXT, font=font)
    highs = [s.engagement_high or s.engagement_rate or 0 for s in stats]
    top_value = max([h for h in highs if h] or [0.01]) * 1.1
    plot_w = width - label_w - 70

    def x_of(value: float) -> float:
        return label_w + plot_w * value / top_value

    for i, stat in enumerate(stats):
        y = top + i * row
        draw.text((6, y + 4), f"{stat.key[:22]} (n={stat.n})", fill=TEXT, font=font)
        if stat.engagement_rate is None:
            continue
        draw.rectangle([label_w, y + 4, x_of(stat.engagement_rate), y + row - 4], fill=BAR)
        if stat.engagement_low is not None and stat.engagement_high is not None:
            lo, hi, mid = x_of(stat.engagement_low), x_of(stat.engagement_high), y + row / 2
            draw.line([lo, mid, hi, mid], fill=WHISKER, width=1)
            draw.line([lo, mid - 4, lo, mid + 4], fill=WHISKER)
            draw.line([hi, mid - 4, hi, mid + 4], fill=WHISKER)
        draw.text((x_of(stat.engagement_high or stat.engagement_rate) + 4, y + 4),
                  f"{stat.engagement_rate * 100:.1f}%", fill=TEXT, font=font)
    axis_y = top + row * max(1, len(stats)) + 2
    draw.line([label_w, axis_y, label_w + plot_w, axis_y], fill=AXIS)
    draw.text((label_w, axis_y + 4), "0%", fill=TEXT, font=font)
    draw.text((label_w + plot_w - 30, axis_y + 4), f"{top_value * 100:.1f}%", fill=TEXT, font=font)
    return _png(image)


def heatmap_png(rates: np.ndarray, counts: np.ndarray, title: str, cell: int = 18) -> bytes:
    """7 × 24 engagement rates (NaN: no post) as shades of blue, weekdays down, local hours across."""
    import numpy as np
    from PIL import Image, ImageDraw

    font = _font()
    left, top = 34, 34
    image = Image.new("RGB", (left + 24 * cell + 10, top + 7 * cell + 30), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((6, 4), title, fill=TEXT, font=font)
    finite = rates[np.isfinite(rates)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    span = high - low or 1.0
    for hour in range(0, 24, 3):
        draw.text((left + hour * cell, top - 12), f"{hour:02d}", fill=TEXT, font=font)
    for day in range(7):
        draw.text((4, top + day * cell + 4), WEEKDAYS[day], fill=TEXT, font=font)
        for hour in range(24):
            box = [left + hour * cell, top + day * cell, left + (hour + 1) * cell - 1, top + (day + 1) * cell - 1]
            value = rates[day, hour]
            if not math.isfinite(value):
                draw.rectangle(box, fill=EMPTY)
                continue
            shade = (value - low) / span
            draw.rectangle(box, fill=(int(235 - 200 * shade), int(240 - 150 * shade), 255))
    draw.text((left, top + 7 * cell + 8), f"light {low * 100:.1f}% .. dark {high * 100:.1f}%; grey: no post",
              fill=TEXT, font=font)
    return _png(image)


def lines_png(series: dict[str, Sequence[float]], title: str, x_label: str, width: int = 560,
              height: int = 260) -> bytes:
    """One line per named series over a shared x (index), with the y range labelled."""
    from PIL import Image, ImageDraw

    font = _font()
    left, right, top, bottom = 60, 110, 24, 30
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((6, 4), title, fill=TEXT, font=font)
    values = [v for s in series.values() for v in s if math.isfinite(v)]
    low, high = (min(values + [0.0]), max(values + [1.0])) if values else (0.0, 1.0)
    span = high - low or 1.0
    length = max((len(s) for s in series.values()), default=1)
    plot_w, plot_h = width - left - right, height - top - bottom

    def point(i: int, v: float) -> tuple[float, float]:
        return left + plot_w * i / max(1, length - 1), top + plot_h * (1 - (v - low) / span)

    draw.line([left, top, left, top + plot_h, left + plot_w, top + plot_h], fill=AXIS)
    draw.text((4, top), f"{high:,.0f}" if span > 10 else f"{high:.3g}", fill=TEXT, font=font)
    draw.text((4, top + plot_h - 10), f"{low:,.0f}" if span > 10 else f"{low:.3g}", fill=TEXT, font=font)
    draw.text((left, top + plot_h + 8), f"{x_label}: 0 .. {length - 1}", fill=TEXT, font=font)
    for k, (name, ys) in enumerate(series.items()):
        colour = LINE_COLOURS[k % len(LINE_COLOURS)]
        points = [point(i, v) for i, v in enumerate(ys) if math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        elif points:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=colour)
        draw.text((left + plot_w + 8, top + 14 * k), name, fill=colour, font=font)
    return _png(image)
