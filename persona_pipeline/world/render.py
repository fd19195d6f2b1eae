"""Draws a `Shot` with PIL: a scene (gradient + a few shapes of its own), then the character (legs,
jacket, scarf, head, hair, accessory), at twice the size and box-downscaled (anti-aliasing), then
the lighting as a per-channel gain. Deterministic: the same shot, size and seed give the same
pixels on the same Pillow.

Sizes are fractions of the image height, so one drawing serves the 96 px world and the 512 px demo
photos. The hair, jacket and scarf are drawn large on purpose: they must stay readable at 64-96 px,
where a full-body head is about 8 px across; the hair styles differ in silhouette (a tail out to
one side, two out to both, strands down the chest, a blunt chin-length block, a cap alone) rather
than in detail, which would not survive the downscale.
"""

from __future__ import annotations

import math
import random
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from persona_pipeline.world.attributes import (
    FRAMINGS, HAIR_COLOURS, JACKET_COLOURS, LIGHTING, NO_SCARF, POSES, SCARF_COLOURS, SKIN_TONES, Character, Shot,
)

SUPERSAMPLE = 2
TROUSERS, SHOES, EYES, GOLD = (44, 52, 88), (30, 24, 24), (36, 28, 28), (240, 200, 60)
HATS = ((120, 80, 50), (200, 176, 128), (40, 50, 90))

# scene -> gradient stops (colour, position from the top, 0..1)
GRADIENTS: dict[str, list[tuple[tuple[int, int, int], float]]] = {
    "city street": [((168, 184, 206), 0.0), ((206, 210, 218), 0.8), ((72, 72, 78), 0.81), ((60, 60, 66), 1.0)],
    "beach": [((112, 184, 240), 0.0), ((188, 226, 250), 0.5), ((28, 104, 186), 0.51), ((40, 130, 200), 0.62),
              ((234, 212, 150), 0.63), ((220, 192, 132), 1.0)],
    "forest": [((150, 196, 128), 0.0), ((60, 112, 60), 0.75), ((58, 84, 36), 0.76), ((46, 66, 30), 1.0)],
    "rooftop": [((252, 150, 80), 0.0), ((196, 96, 110), 0.55), ((122, 64, 118), 1.0)],
    "cafe": [((164, 118, 82), 0.0), ((118, 78, 52), 1.0)],
    "bedroom": [((228, 204, 226), 0.0), ((206, 182, 212), 1.0)],
    "snowy landscape": [((196, 212, 230), 0.0), ((226, 236, 246), 0.58), ((248, 250, 255), 0.59), ((236, 240, 248), 1.0)],
    "market": [((140, 196, 236), 0.0), ((196, 224, 244), 0.34), ((204, 182, 150), 0.35), ((184, 160, 128), 1.0)],
}


@lru_cache(maxsize=64)
def _gradient(scene: str, side: int) -> Image.Image:
    stops = GRADIENTS[scene]
    t = np.linspace(0.0, 1.0, side)
    column = np.stack([np.interp(t, [p for _, p in stops], [c[k] for c, _ in stops]) for k in range(3)], axis=1)
    return Image.fromarray(np.repeat(column.round().astype(np.uint8)[:, None, :], side, axis=1), "RGB")


def _shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, round(c * factor))) for c in colour)


def _scenery(draw: ImageDraw.ImageDraw, scene: str, side: int, rng: random.Random) -> None:
    """The shapes that make each scene recognisable at 64 px, not just its palette."""
    S, u = side, rng.uniform
    if scene == "city street":
        x = -u(0, 0.1) * S
        while x < S:
            w, h, grey = u(0.14, 0.24) * S, u(0.3, 0.62) * S, rng.randint(88, 130)
            draw.rectangle([x, 0.8 * S - h, x + w, 0.8 * S], fill=(grey, grey, grey + 12))
            for wy in np.arange(0.8 * S - h + 0.05 * S, 0.76 * S, 0.09 * S):
                for wx in (x + 0.2 * w, x + 0.6 * w):
                    draw.rectangle([wx, wy, wx + 0.2 * w, wy + 0.04 * S], fill=(236, 214, 120))
            x += w + u(0.0, 0.04) * S
        for dx in np.arange(u(0, 0.2) * S, S, 0.25 * S):
            draw.rectangle([dx, 0.89 * S, dx + 0.12 * S, 0.91 * S], fill=(236, 236, 236))
    elif scene == "beach":
        sx = u(0.1, 0.9) * S
        draw.ellipse([sx - 0.06 * S, 0.1 * S, sx + 0.06 * S, 0.22 * S], fill=(255, 236, 150))
        for wy in (0.55, 0.59):
            for wx in np.arange(u(0, 0.1) * S, S, 0.16 * S):
                draw.line([(wx, wy * S), (wx + 0.08 * S, wy * S)], fill=(236, 246, 255), width=max(1, S // 90))
    elif scene == "forest":
        for _ in range(8):
            x, h = u(-0.05, 1.05) * S, u(0.35, 0.6) * S
            draw.rectangle([x - 0.02 * S, 0.66 * S, x + 0.02 * S, 0.8 * S], fill=(92, 60, 34))
            draw.polygon([(x, 0.76 * S - h), (x - 0.13 * S, 0.7 * S), (x + 0.13 * S, 0.7 * S)], fill=(22, rng.randint(70, 104), 42))
    elif scene == "rooftop":
        draw.ellipse([0.62 * S, 0.1 * S, 0.82 * S, 0.3 * S], fill=(255, 214, 120))
        x = -u(0, 0.05) * S
        while x < S:
            w, h = u(0.06, 0.14) * S, u(0.12, 0.34) * S
            draw.rectangle([x, 0.74 * S - h, x + w, 0.74 * S], fill=(76, 46, 92))
            x += w
        draw.rectangle([0, 0.74 * S, S, S], fill=(150, 78, 58))
        for y in np.arange(0.78 * S, S, 0.06 * S):
            draw.line([(0, y), (S, y)], fill=(200, 170, 150), width=max(1, S // 120))
    elif scene == "cafe":
        wx = u(0.04, 0.5) * S
        draw.rectangle([wx, 0.08 * S, wx + 0.4 * S, 0.5 * S], fill=(110, 80, 56))
        draw.rectangle([wx + 0.02 * S, 0.1 * S, wx + 0.38 * S, 0.48 * S], fill=(204, 230, 242))
        draw.rectangle([0, 0.8 * S, S, S], fill=(74, 46, 30))
        for cx in (u(0.05, 0.3) * S, u(0.65, 0.9) * S):
            draw.ellipse([cx - 0.07 * S, 0.78 * S, cx + 0.07 * S, 0.82 * S], fill=(240, 240, 236))
            draw.rectangle([cx - 0.04 * S, 0.72 * S, cx + 0.04 * S, 0.8 * S], fill=(250, 250, 250))
        for lx in (0.2 * S, 0.8 * S):
            draw.ellipse([lx - 0.03 * S, 0.02 * S, lx + 0.03 * S, 0.08 * S], fill=(255, 220, 120))
    elif scene == "bedroom":
        px = u(0.1, 0.7) * S
        draw.rectangle([px, 0.12 * S, px + 0.2 * S, 0.3 * S], fill=(140, 100, 70))
        draw.rectangle([px + 0.02 * S, 0.14 * S, px + 0.18 * S, 0.28 * S], fill=(120, 176, 210))
        draw.rectangle([0, 0.5 * S, S, 0.66 * S], fill=(132, 88, 60))
        draw.rectangle([0, 0.66 * S, S, S], fill=(246, 246, 250))
        for y in np.arange(0.72 * S, S, 0.08 * S):
            draw.rectangle([0, y, S, y + 0.025 * S], fill=(120, 150, 220))
    elif scene == "snowy landscape":
        for _ in range(4):
            x, h = u(-0.05, 1.05) * S, u(0.25, 0.4) * S
            draw.polygon([(x, 0.6 * S - h), (x - 0.1 * S, 0.6 * S), (x + 0.1 * S, 0.6 * S)], fill=(40, 84, 66))
            draw.polygon([(x, 0.6 * S - h), (x - 0.04 * S, 0.6 * S - 0.6 * h), (x + 0.04 * S, 0.6 * S - 0.6 * h)], fill=(250, 252, 255))
        flake = max(1.0, S / 110)
        for _ in range(40):
            fx, fy = u(0, 1) * S, u(0, 1) * S
            draw.ellipse([fx - flake, fy - flake, fx + flake, fy + flake], fill=(255, 255, 255))
    elif scene == "market":
        x = -u(0, 0.15) * S
        while x < S:
            w = u(0.3, 0.42) * S
            draw.rectangle([x + 0.02 * S, 0.4 * S, x + w - 0.02 * S, 0.7 * S], fill=(124, 86, 52))
            for k, stripe in enumerate(np.arange(x, x + w, w / 6)):
                fill = (214, 40, 40) if k % 2 == 0 else (250, 246, 236)
                draw.polygon([(stripe, 0.28 * S), (stripe + w / 6, 0.28 * S), (stripe + w / 6 + 0.02 * S, 0.4 * S),
                              (stripe + 0.02 * S, 0.4 * S)], fill=fill)
            for fx in np.arange(x + 0.06 * S, x + w - 0.04 * S, 0.06 * S):
                fruit = rng.choice(((240, 140, 20), (90, 170, 40), (200, 30, 40)))
                draw.ellipse([fx - 0.025 * S, 0.44 * S, fx + 0.025 * S, 0.49 * S], fill=fruit)
            x += w


def _hair_back(draw: ImageDraw.ImageDraw, style: str, hx: float, hy: float, r: float, hair, side: int) -> None:
    """What of the hair lies behind the face: the bob's block, the long hair's crown, the tails. Every
    piece has a dark outline, so the silhouette reads on any background (silver hair on snow)."""
    line = dict(fill=hair, outline=_shade(hair, 0.45), width=max(1, round(0.12 * r)))
    if style == "bob":
        draw.rounded_rectangle([hx - 1.38 * r, hy - 1.2 * r, hx + 1.38 * r, hy + 0.95 * r], radius=0.45 * r, **line)
    elif style == "long":
        draw.rounded_rectangle([hx - 1.15 * r, hy - 1.2 * r, hx + 1.15 * r, hy + 0.8 * r], radius=0.5 * r, **line)
    elif style == "ponytail":
        tx = hx + side * 1.45 * r
        draw.ellipse([tx - 0.45 * r, hy - 0.6 * r, tx + 0.45 * r, hy + 2.3 * r], **line)
        draw.ellipse([hx + side * 1.0 * r - 0.35 * r, hy - 1.0 * r, hx + side * 1.0 * r + 0.35 * r, hy - 0.3 * r], **line)
    elif style == "pigtails":
        for s in (-1, 1):
            tx = hx + s * 1.6 * r
            draw.ellipse([tx - 0.42 * r, hy - 0.4 * r, tx + 0.42 * r, hy + 1.2 * r], **line)
            draw.ellipse([hx + s * 1.08 * r - 0.25 * r, hy - 0.45 * r, hx + s * 1.08 * r + 0.25 * r, hy + 0.05 * r], **line)
    if style in ("short", "ponytail", "pigtails"):  # sideburns, so a hat never hides the colour
        for s in (-1, 1):
            draw.rounded_rectangle([hx + s * 0.78 * r - 0.22 * r, hy - 0.75 * r, hx + s * 0.78 * r + 0.22 * r, hy + 0.3 * r],
                                   radius=0.15 * r, **line)


def _character(draw: ImageDraw.ImageDraw, c: Character, arms: tuple[int, int], cx: float, top: float, r: float,
               rng: random.Random) -> None:
    skin, hair = SKIN_TONES[c.skin_tone], HAIR_COLOURS[c.hair_colour]
    jacket = JACKET_COLOURS[c.jacket_colour]
    hx, hy = cx + rng.uniform(-0.15, 0.15) * r, top + r
    side = rng.choice((-1, 1))
    bt, bh, half = hy + 1.2 * r, 3.4 * r, 1.25 * r
    for dx in (-0.45, 0.45):  # legs, shoes
        draw.rectangle([cx + dx * r - 0.32 * r, bt + bh - 0.3 * r, cx + dx * r + 0.32 * r, bt + bh + 3.2 * r], fill=TROUSERS)
        draw.ellipse([cx + dx * r - 0.45 * r, bt + bh + 3.0 * r, cx + dx * r + 0.45 * r, bt + bh + 3.45 * r], fill=SHOES)
    for s, angle in ((-1, arms[0]), (1, arms[1])):
        sx, sy = cx + s * (half - 0.2 * r), bt + 0.4 * r
        ex = sx + s * math.cos(math.radians(angle)) * 2.6 * r
        ey = sy - math.sin(math.radians(angle)) * 2.6 * r
        draw.line([(sx, sy), (ex, ey)], fill=jacket, width=max(1, round(0.62 * r)))
        draw.ellipse([ex - 0.32 * r, ey - 0.32 * r, ex + 0.32 * r, ey + 0.32 * r], fill=skin)
    draw.rounded_rectangle([cx - half, bt, cx + half, bt + bh], radius=0.45 * r, fill=jacket)
    draw.line([(cx, bt + 0.5 * r), (cx, bt + bh)], fill=_shade(jacket, 0.72), width=max(1, round(0.1 * r)))
    _hair_back(draw, c.hair_style, hx, hy, r, hair, side)
    draw.rectangle([hx - 0.28 * r, hy + 0.6 * r, hx + 0.28 * r, bt + 0.3 * r], fill=skin)  # neck
    if c.hair_style == "long":  # strands down over the shoulders and chest
        for s in (-1, 1):
            draw.rounded_rectangle([hx + s * 0.9 * r - 0.38 * r, hy - 0.3 * r, hx + s * 0.9 * r + 0.38 * r, hy + 3.6 * r],
                                   radius=0.3 * r, fill=hair, outline=_shade(hair, 0.45), width=max(1, round(0.12 * r)))
    if c.scarf_colour != NO_SCARF:
        scarf = SCARF_COLOURS[c.scarf_colour]
        draw.rounded_rectangle([cx - 0.95 * r, bt - 0.25 * r, cx + 0.95 * r, bt + 0.5 * r], radius=0.3 * r, fill=scarf)
        draw.rectangle([cx + side * 0.45 * r - 0.24 * r, bt + 0.3 * r, cx + side * 0.45 * r + 0.24 * r, bt + 2.0 * r], fill=scarf)
    draw.ellipse([hx - 0.86 * r, hy - 0.85 * r, hx + 0.86 * r, hy + r], fill=skin)  # face
    draw.chord([hx - 1.06 * r, hy - 1.2 * r, hx + 1.06 * r, hy + 0.5 * r], 180, 360, fill=hair, outline=_shade(hair, 0.45),
               width=max(1, round(0.12 * r)))  # cap and fringe
    eye_y, eye = hy + 0.05 * r, 0.1 * r
    for ex in (hx - 0.35 * r, hx + 0.35 * r):
        draw.ellipse([ex - eye, eye_y - eye, ex + eye, eye_y + eye], fill=EYES)
    draw.arc([hx - 0.3 * r, hy + 0.3 * r, hx + 0.3 * r, hy + 0.65 * r], 20, 160, fill=(150, 60, 60), width=max(1, round(0.08 * r)))
    if c.accessory == "glasses":
        for ex in (hx - 0.35 * r, hx + 0.35 * r):
            draw.ellipse([ex - 0.24 * r, eye_y - 0.2 * r, ex + 0.24 * r, eye_y + 0.2 * r], outline=(20, 20, 20),
                         width=max(1, round(0.08 * r)))
        draw.line([(hx - 0.12 * r, eye_y), (hx + 0.12 * r, eye_y)], fill=(20, 20, 20), width=max(1, round(0.08 * r)))
    elif c.accessory == "sunglasses":
        draw.rounded_rectangle([hx - 0.65 * r, eye_y - 0.18 * r, hx + 0.65 * r, eye_y + 0.2 * r], radius=0.12 * r, fill=(18, 18, 22))
    elif c.accessory == "hat":
        colour = rng.choice(HATS)
        draw.rounded_rectangle([hx - 0.8 * r, hy - 1.7 * r, hx + 0.8 * r, hy - 0.8 * r], radius=0.25 * r, fill=colour)
        draw.ellipse([hx - 1.45 * r, hy - 1.0 * r, hx + 1.45 * r, hy - 0.66 * r], fill=_shade(colour, 0.85))
    elif c.accessory == "gold earring":  # one, on the persona's left: an asymmetric feature
        draw.ellipse([hx + 0.8 * r, hy + 0.2 * r, hx + 1.0 * r, hy + 0.4 * r], fill=GOLD)


def render_shot(shot: Shot, size: int = 96, seed: int = 0) -> Image.Image:
    """A `size` x `size` RGB image of `shot`; `seed` places the scenery and jitters the character's
    position, scale and head tilt within the framing."""
    rng = random.Random(f"render:{seed}")
    side = size * SUPERSAMPLE
    canvas = _gradient(shot.scene, side).copy()
    draw = ImageDraw.Draw(canvas)
    _scenery(draw, shot.scene, side, rng)
    radius, top = FRAMINGS[shot.framing]
    r = radius * side * rng.uniform(0.92, 1.08)
    spread = 0.08 if shot.framing == "close-up portrait" else 0.16
    cx = side * (0.5 + rng.uniform(-spread, spread))
    _character(draw, shot.character, POSES[shot.pose], cx, top * side * rng.uniform(0.8, 1.2), r, rng)
    image = canvas.reduce(SUPERSAMPLE)
    gain = LIGHTING[shot.lighting]
    if gain != (1.0, 1.0, 1.0):
        pixels = np.asarray(image, dtype=np.float32) * np.asarray(gain, dtype=np.float32)
        image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")
    return image
