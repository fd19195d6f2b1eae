"""Calendar render time in the browser: how long the review form's month view of 300 posts takes
from navigation until the grid is on screen with every thumbnail drawn.

    python bench/calendar_render.py [--quick] [--runs N] [--posts P] [--personas K]

Set-up: a fresh, migrated PostgreSQL database (`make_database("postgresql", ...)`), K personas
(default 3) with P posts (default 300) in one month two months ahead, spread over the month's days
at distinct hours, a third each awaiting approval, scheduled and published. Each post's image is a
1080x1350 JPEG (the size the export makes of a portrait photo) of noise and a gradient, so its bytes
are those of a real photo (~0.4 MB), under PERSONA_HOME. The form runs as `persona-pipeline review`
(uvicorn in a subprocess, bench/review_load.FormServer) and Debian's Chromium loads the month across
all personas (`/calendar?view=month&date=YYYY-MM`), 1400x900.

Each run opens a fresh browser context (no cached pages or images; the session cookie is copied in)
and navigates to the month. In the page, t = `performance.now()` (milliseconds since the navigation
started) at the first animation frame after the grid exists and every thumbnail is loaded: the page
shows them as tiles of one sprite image per page (`img#cal-sprite`, each card's `.cal-tile` showing
it as its background at its tile), or, where a card has no tile, as an `img.cal-thumb`; the images
must be `complete`, and a thumbnail counts when its image has a natural width or its tile shows the
loaded sprite. The run also checks that P post cards and P loaded thumbnails are on the page, else
FAIL.

1. Cold: the first load, which makes the thumbnails and the sprite on the server (kept under
   PERSONA_HOME/.cache).
2. Warm: N more loads (default 15; --quick 5), thumbnails already made, as a reviewer meets the
   page every day after the posts' first showing.

Reported: the cold time, and the warm runs' median and p95 (nearest rank); the target is the
issue's: the month view of 300 posts renders in <= 1 s, held here to the p95 of the warm runs.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from PIL import Image  # noqa: E402
from sqlalchemy import select  # noqa: E402

import _report  # noqa: E402
from persona_fakes.review import CalendarPost, seed_calendar  # noqa: E402
from persona_pipeline.db import models  # noqa: E402
from persona_pipeline.db.session import session_scope  # noqa: E402
from _browser import CHROMIUM, CHROMIUM_ARGS, Workspace, require_chromium  # noqa: E402
from _report import percentile  # noqa: E402

TARGET_MS = 1000.0
STATUSES = ("awaiting_approval", "scheduled", "published")

# Wait for the grid with every thumbnail loaded -- each <img class="cal-thumb"> and the page's sprite
# (img#cal-sprite, whose tiles the cards show) -- then one animation frame (it is drawn); the time
# since the navigation started, and what the page holds. A thumbnail counts as loaded when it is an
# <img class="cal-thumb"> with a natural width, or a card's .cal-tile on the page whose background
# is the loaded sprite, placed at its tile.
MEASURE = """async () => {
  await new Promise((resolve) => {
    function check() {
      const grid = document.getElementById('calendar');
      const images = grid ? [...grid.querySelectorAll('img.cal-thumb, img.cal-sprite')] : [];
      if (grid && document.readyState !== 'loading' && images.every((i) => i.complete)) requestAnimationFrame(() => resolve());
      else requestAnimationFrame(check);
    }
    check();
  });
  const thumbs = [...document.querySelectorAll('#calendar img.cal-thumb')];
  const sprite = document.getElementById('cal-sprite');
  const ready = sprite && sprite.complete && sprite.naturalWidth > 0;
  const tiles = ready ? [...document.querySelectorAll('#calendar .cal-tile')].filter((t) => t.offsetWidth > 0
    && getComputedStyle(t).backgroundImage.includes(sprite.src) && t.style.backgroundPosition !== '') : [];
  const nav = performance.getEntriesByType('navigation')[0];
  return {ms: performance.now(), first_byte: nav.responseStart, last_byte: nav.responseEnd, cards: document.querySelectorAll('#calendar .cal-post').length,
          loaded: thumbs.filter((i) => i.naturalWidth > 0).length + tiles.length};
}"""


def photo(path: Path, index: int) -> None:
    """A 1080x1350 JPEG with the bytes of a photo: a colour gradient under noise."""
    noise = Image.effect_noise((1080, 1350), 40 + index % 20)
    base = Image.linear_gradient("L").resize((1080, 1350))
    picture = Image.merge("RGB", (noise, base, Image.eval(noise, lambda v: (v + index * 7) % 256)))
    picture.save(path, format="JPEG", quality=88)


def seed(url: str, home: Path, posts: int, personas: int, month: datetime) -> int:
    """`posts` posts over `personas` personas in `month`; returns the bytes of their images."""
    total = 0
    for k in range(personas):
        mine = [i for i in range(posts) if i % personas == k]
        specs = []
        for n, i in enumerate(mine):
            day, hour = n % 28, 10 + (n // 28) % 5  # distinct (day, hour) per persona: one account, one slot
            at = month + timedelta(days=day, hours=hour, minutes=10 * k)
            specs.append(CalendarPost(STATUSES[i % 3], at, caption=f"Post {i} of the bench month."))
        ids = seed_calendar(url, home, specs, slug=f"bench{k}", posting_windows=["00:00-24:00"])
        with session_scope(url) as session:
            for post in session.scalars(select(models.Post).where(models.Post.id.in_(ids))):
                photo(Path(post.media_path), post.id)
                total += Path(post.media_path).stat().st_size
    return total


def load(browser, base: str, cookies: list[dict], path: str) -> dict:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.add_cookies(cookies)
    page = context.new_page()
    page.goto(base + path, wait_until="commit")
    result = page.evaluate(MEASURE)
    context.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 warm runs instead of 15")
    parser.add_argument("--runs", type=int, help="warm runs (default 15, quick 5)")
    parser.add_argument("--posts", type=int, default=300)
    parser.add_argument("--personas", type=int, default=3)
    args = parser.parse_args()
    runs = args.runs or (5 if args.quick else 15)
    require_chromium()
    if args.posts > args.personas * 28 * 5:
        raise SystemExit(f"--posts {args.posts}: at most {args.personas * 28 * 5} fit {args.personas} personas' distinct slots")

    with Workspace("bench-calendar-render-") as ws:
        url, home = ws.url, ws.home
        today = datetime.now(timezone.utc)
        month = (today.replace(day=1) + timedelta(days=62)).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        began = time.monotonic()
        size = seed(url, home, args.posts, args.personas, month)
        print(f"Calendar month view in Chromium: {args.posts} posts of {args.personas} personas in {month:%B %Y}, "
              f"1080x1350 JPEGs ({size / args.posts / 1e6:.2f} MB each), PostgreSQL; seeded in {time.monotonic() - began:.0f} s")
        print(f"  machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start")
        token = secrets.token_urlsafe(18)
        server = ws.serve({token: "bench"})
        path = f"/calendar?view=month&date={month:%Y-%m}"
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context()
            page = context.new_page()
            page.goto(server.base + "/login")
            page.fill("#token", token)
            page.click("button:has-text('Log in')")
            page.wait_for_url(server.base + "/")
            cookies = context.cookies()
            context.close()
            cold = load(browser, server.base, cookies, path)
            warm = [load(browser, server.base, cookies, path) for _ in range(runs)]
            browser.close()
        complete = all(r["cards"] == args.posts and r["loaded"] == args.posts for r in [cold, *warm])
        ms = [r["ms"] for r in warm]
        median, p95 = statistics.median(ms), percentile(ms, 0.95)
        print(f"  1. cold (thumbnails and sprite made on the server): {cold['ms']:.0f} ms")
        print(f"  2. warm, {runs} runs: median {median:.0f} ms, p95 {p95:.0f} ms, min {min(ms):.0f} ms, max {max(ms):.0f} ms")
        print(f"     of which the page's first byte (server) median {statistics.median(r['first_byte'] for r in warm):.0f} ms, "
              f"its last byte {statistics.median(r['last_byte'] for r in warm):.0f} ms")
        print(f"  every run showed {args.posts} posts with {args.posts} thumbnails loaded -> {'PASS' if complete else 'FAIL'}"
              + ("" if complete else f": {[(r['cards'], r['loaded']) for r in [cold, *warm]]}"))
        clean = ws.server_clean()
        met = p95 <= TARGET_MS
        print(f"RESULT month view of {args.posts} posts on screen with thumbnails: p95 {p95:.0f} ms, median {median:.0f} ms "
              f"(target <= {TARGET_MS:.0f} ms) -> {'PASS' if met else 'FAIL'}")
        note = f"{args.posts} posts, {args.personas} personas, Chromium 1400x900, PostgreSQL, {runs} warm runs; cold {cold['ms']:.0f} ms"
        _report.record(f"calendar month of {args.posts} posts on screen with thumbnails, p95", reference=None, ours=p95,
                       unit="ms", better="lower", target=f"p95 <= {TARGET_MS:.0f} ms", ok=met, note=note)
        _report.record(f"calendar month of {args.posts} posts on screen with thumbnails, median", reference=None,
                       ours=median, unit="ms", better="lower", note=note)
        ws.ok = ok = met and complete and clean
    _report.emit()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
