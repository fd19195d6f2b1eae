"""Draws the demo persona's source photos: one consistent character (teal bob, yellow jacket, red
scarf) in varied framings, poses, backgrounds and lighting. Deterministic, so anyone can make the
same set again with `persona-pipeline demo-photos`."""

from __future__ import annotations

import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

WIDTH, HEIGHT = 384, 480
SKIN, HAIR, JACKET, SCARF, TROUSERS = (224, 172, 140), (28, 150, 150), (238, 196, 40), (200, 30, 40), (40, 50, 90)

BACKGROUNDS = {
    "beach": [((135, 200, 240), 0.0), ((190, 230, 250), 0.55), ((235, 215, 160), 0.56), ((220, 195, 140), 1.0)],
    "city street": [((170, 180, 195), 0.0), ((120, 125, 135), 1.0)],
    "forest": [((120, 170, 110), 0.0), ((40, 90, 50), 1.0)],
    "studio": [((235, 235, 240), 0.0), ((200, 200, 210), 1.0)],
    "sunset rooftop": [((250, 150, 80), 0.0), ((120, 60, 110), 1.0)],
    "cafe": [((150, 110, 80), 0.0), ((90, 60, 45), 1.0)],
}
# framing → (character scale, head top in px)
FRAMINGS = {"close-up portrait": (2.1, 40), "half body shot": (1.45, 90), "full body shot": (1.0, 160)}
# Arm angles (left, right) in degrees: 0 points sideways, 90 up, -90 down.
POSES = {"waving": (-70, 55), "arms down": (-80, -80), "arms outstretched": (0, 0), "arms raised": (60, 60)}
LIGHTING = {"soft daylight": 1.0, "golden hour light": 1.15, "dim evening light": 0.7}


def _gradient(stops: list[tuple[tuple[int, int, int], float]]) -> Image.Image:
    image = Image.new("RGB", (WIDTH, HEIGHT))
    draw = ImageDraw.Draw(image)
    for y in range(HEIGHT):
        t = y / (HEIGHT - 1)
        for (c0, p0), (c1, p1) in zip(stops, stops[1:]):
            if p0 <= t <= p1:
                f = 0.0 if p1 == p0 else (t - p0) / (p1 - p0)
                draw.line([(0, y), (WIDTH, y)], fill=tuple(round(a + (b - a) * f) for a, b in zip(c0, c1)))
                break
    return image


def _scenery(draw: ImageDraw.ImageDraw, background: str, rng: random.Random) -> None:
    if background == "city street":
        for _ in range(7):
            x, w, h = rng.randint(-20, WIDTH), rng.randint(40, 90), rng.randint(150, 330)
            shade = rng.randint(70, 120)
            draw.rectangle([x, HEIGHT - h, x + w, HEIGHT], fill=(shade, shade, shade + 10))
    elif background == "forest":
        for _ in range(9):
            x, h = rng.randint(0, WIDTH), rng.randint(160, 300)
            draw.polygon([(x, HEIGHT - h), (x - 45, HEIGHT - 60), (x + 45, HEIGHT - 60)], fill=(20, rng.randint(70, 110), 40))
    elif background == "sunset rooftop":
        draw.ellipse([260, 60, 340, 140], fill=(255, 220, 120))
        draw.rectangle([0, HEIGHT - 70, WIDTH, HEIGHT], fill=(60, 40, 50))
    elif background == "cafe":
        draw.rectangle([20, 40, 150, 170], fill=(210, 230, 240))
        draw.rectangle([0, HEIGHT - 90, WIDTH, HEIGHT - 80], fill=(70, 45, 30))


def _character(draw: ImageDraw.ImageDraw, cx: float, top: float, scale: float, arms: tuple[int, int], tilt: int) -> None:
    s = scale * 2  # drawn at twice the size, then downscaled (anti-aliasing)
    head_r, neck = 34 * s, 14 * s
    hx, hy = cx + tilt * s, top + head_r
    body_top, body_h, body_w = hy + head_r + neck * 0.4, 120 * s, 78 * s
    # legs and trousers
    for dx in (-0.25, 0.25):
        draw.rectangle([cx + dx * body_w - 12 * s, body_top + body_h - 6 * s, cx + dx * body_w + 12 * s, body_top + body_h + 110 * s], fill=TROUSERS)
    # arms: an angle per side, in degrees from the shoulder
    for side, angle in ((-1, arms[0]), (1, arms[1])):
        sx, sy = cx + side * body_w / 2, body_top + 12 * s
        ex, ey = sx + side * math.cos(math.radians(angle)) * 80 * s, sy - math.sin(math.radians(angle)) * 80 * s
        draw.line([(sx, sy), (ex, ey)], fill=JACKET, width=int(20 * s))
        draw.ellipse([ex - 9 * s, ey - 9 * s, ex + 9 * s, ey + 9 * s], fill=SKIN)
    draw.rounded_rectangle([cx - body_w / 2, body_top, cx + body_w / 2, body_top + body_h], radius=int(18 * s), fill=JACKET)
    draw.rectangle([cx - 10 * s, hy + head_r - 4 * s, cx + 10 * s, body_top + 6 * s], fill=SKIN)
    draw.rounded_rectangle([cx - body_w / 2 + 6 * s, body_top - 4 * s, cx + body_w / 2 - 6 * s, body_top + 18 * s], radius=int(9 * s), fill=SCARF)
    draw.rectangle([cx + 8 * s, body_top + 10 * s, cx + 24 * s, body_top + 60 * s], fill=SCARF)
    # teal bob behind and around the face, then the face
    draw.ellipse([hx - head_r * 1.18, hy - head_r * 1.15, hx + head_r * 1.18, hy + head_r * 1.05], fill=HAIR)
    draw.ellipse([hx - head_r * 0.86, hy - head_r * 0.8, hx + head_r * 0.86, hy + head_r], fill=SKIN)
    draw.chord([hx - head_r * 1.0, hy - head_r * 1.15, hx + head_r * 1.0, hy - head_r * 0.05], 180, 360, fill=HAIR)
    for ex in (-0.35, 0.35):
        draw.ellipse([hx + ex * head_r - 5 * s, hy + 0.05 * head_r - 5 * s, hx + ex * head_r + 5 * s, hy + 0.05 * head_r + 5 * s], fill=(40, 30, 30))
    draw.arc([hx - 0.3 * head_r, hy + 0.3 * head_r, hx + 0.3 * head_r, hy + 0.65 * head_r], 20, 160, fill=(150, 60, 60), width=int(3 * s))
    draw.ellipse([hx + 0.62 * head_r, hy + 0.1 * head_r, hx + 0.78 * head_r, hy + 0.3 * head_r], fill=(240, 200, 60))  # one gold earring: an asymmetric feature


def make_demo_photos(folder: Path, count: int = 18, seed: int = 7, trigger: str = "m1ra") -> list[Path]:
    """Write `count` JPEG photos and a caption sidecar for every other one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    backgrounds, framings, poses, lights = list(BACKGROUNDS), list(FRAMINGS), list(POSES), list(LIGHTING)
    written = []
    for index in range(count):
        background = backgrounds[index % len(backgrounds)]
        framing = framings[(index // 2) % len(framings)]
        pose = poses[(index * 3 + 1) % len(poses)]
        light = lights[(index // 3) % len(lights)]
        small = _gradient(BACKGROUNDS[background])
        _scenery(ImageDraw.Draw(small), background, rng)
        canvas = small.resize((WIDTH * 2, HEIGHT * 2), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(canvas)
        base_scale, base_top = FRAMINGS[framing]
        scale = base_scale * rng.uniform(0.95, 1.05)
        cx = WIDTH + rng.randint(-90, 90)
        top = base_top * 2 * rng.uniform(0.9, 1.1)
        _character(draw, cx, top, scale, POSES[pose], tilt=rng.randint(-6, 6))
        image = canvas.resize((WIDTH, HEIGHT), Image.Resampling.LANCZOS).filter(ImageFilter.GaussianBlur(0.4))
        image = ImageEnhance.Brightness(image).enhance(LIGHTING[light])
        path = folder / f"mira_{index + 1:02d}.jpg"
        image.save(path, format="JPEG", quality=88)
        written.append(path)
        if index % 2 == 0:
            (folder / f"mira_{index + 1:02d}.txt").write_text(f"{trigger}, {framing}, {pose}, {background} background, {light}\n")
    return written
