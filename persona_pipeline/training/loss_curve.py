"""A small PNG of a training loss curve, drawn with PIL only (no matplotlib in the runtime image),
for Dagster asset metadata: raw per-step losses as light points, a centred moving average over
them, vertical ticks at the checkpoint steps, and the min/max loss and first/last step labelled.
"""

from __future__ import annotations

import io
import math
from typing import Sequence, TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: imported where used, not when the code location loads
    from PIL import Image

BACKGROUND, AXIS, RAW, SMOOTH, TEXT = (255, 255, 255), (90, 90, 90), (190, 190, 200), (31, 90, 180), (40, 40, 40)
CHECKPOINT, CHECKPOINT_LIGHT = (220, 120, 30), (245, 220, 195)
MIN_WIDTH, MIN_HEIGHT = 64, 48


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    """Centred moving average, the window shrinking at the ends (no lag, unlike an EMA)."""
    half = window // 2
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def loss_curve_png(losses: Sequence[float], *, checkpoints: Sequence[int] = (), width: int = 480,
                   height: int = 200) -> bytes:
    """PNG bytes of `losses` (one per step, step = index + 1) at exactly width x height.
    Non-finite losses are skipped; no steps (or none finite) gives a PNG that says so."""
    from PIL import Image, ImageDraw, ImageFont

    if width < MIN_WIDTH or height < MIN_HEIGHT:
        raise ValueError(f"loss curve must be at least {MIN_WIDTH}x{MIN_HEIGHT}, got {width}x{height}")
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()

    points = [(step, float(v)) for step, v in enumerate(losses, start=1) if math.isfinite(v)]
    if not points:
        message = "no steps" if len(losses) == 0 else "no finite loss values"
        box = draw.textbbox((0, 0), message, font=font)
        draw.text(((width - (box[2] - box[0])) / 2, (height - (box[3] - box[1])) / 2), message, fill=TEXT, font=font)
        return _png(image)

    # Plot area: room on the left for the loss labels, below for the step labels.
    left, right, top, bottom = 52, width - 8, 8, height - 18
    last_step = len(losses)
    values = [v for _, v in points]
    low, high = min(values), max(values)
    pad = (high - low) * 0.05 or max(abs(high) * 0.1, 0.5)  # a flat curve still gets a visible band
    y_low, y_high = low - pad, high + pad

    def x_of(step: float) -> float:
        return left + (right - left) * ((step - 1) / (last_step - 1) if last_step > 1 else 0.5)

    def y_of(value: float) -> float:
        return bottom - (bottom - top) * (value - y_low) / (y_high - y_low)

    for step in sorted({s for s in checkpoints if 1 <= s <= last_step}):
        x = x_of(step)
        draw.line([(x, top), (x, bottom)], fill=CHECKPOINT_LIGHT, width=1)
        draw.line([(x, bottom), (x, bottom + 4)], fill=CHECKPOINT, width=2)

    raw_xy = [(x_of(s), y_of(v)) for s, v in points]
    if len(raw_xy) <= (right - left) // 3:
        for x, y in raw_xy:
            draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=RAW)
    else:
        draw.line(raw_xy, fill=RAW, width=1)
    smooth = _moving_average(values, max(1, round(len(values) / 20)) | 1)
    smooth_xy = [(x_of(s), y_of(v)) for (s, _), v in zip(points, smooth)]
    if len(smooth_xy) > 1:
        draw.line(smooth_xy, fill=SMOOTH, width=2)
    else:
        x, y = smooth_xy[0]
        draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=SMOOTH)

    draw.line([(left, top), (left, bottom), (right, bottom)], fill=AXIS, width=1)
    draw.text((2, y_of(high) - 6), f"{high:.4g}", fill=TEXT, font=font)
    draw.text((2, y_of(low) - 6), f"{low:.4g}", fill=TEXT, font=font)
    draw.text((left, bottom + 5), "1", fill=TEXT, font=font)
    last_label = f"step {last_step}"
    box = draw.textbbox((0, 0), last_label, font=font)
    draw.text((right - (box[2] - box[0]), bottom + 5), last_label, fill=TEXT, font=font)
    return _png(image)
