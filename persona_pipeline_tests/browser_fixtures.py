"""What every browser test of the review form shares: Debian's Chromium (a module fixture), the two
screen sizes, the form served under real uvicorn on a fresh SQLite database, logging in, and
screenshots. The test modules import these instead of each keeping its own copy."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from persona_pipeline.review.app import ReviewConfig, create_app
from persona_pipeline_tests.conftest import make_database
from persona_pipeline_tests.review_fixtures import serve_app

# How long a page may take to show what a step led to: generous, since on 2 shared cores a busy
# machine stalls Chromium for seconds (each wait returns as soon as its condition holds).
PAGE_WAIT_MS = 20_000

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
TOKEN = "alice-browser-token"
SECRET = "browser-test-secret-0123456789"

# The two sizes: a desktop with a mouse, and a phone with a touch screen.
SIZES = {
    "desktop": {"viewport": {"width": 1400, "height": 900}},
    "phone": {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True},
}


@dataclass
class Served:
    base: str
    url: str
    home: Path


@contextmanager
def serve_form(folder: Path, **config) -> Iterator[Served]:
    """The form on a fresh, migrated SQLite database in `folder`, PERSONA_HOME `folder/home`, one
    reviewer (alice, TOKEN); `config` adds ReviewConfig fields (e.g. max_body_bytes)."""
    url, cleanup = make_database("sqlite", folder)
    home = folder / "home"
    home.mkdir()
    app = create_app(ReviewConfig(database_url=url, home=home, tokens={TOKEN: "alice"}, secret_key=SECRET, **config))
    try:
        with serve_app(app, start_timeout_s=15) as (base, _):
            yield Served(base, url, home)
    finally:
        cleanup()


@pytest.fixture(scope="module")
def chromium():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's browser with `apt-get install -y chromium`", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(params=sorted(SIZES))
def size(request) -> str:
    return request.param


class Shots:
    """Screenshots under the test's output, copied to $PERSONA_TEST_ARTIFACTS when it is set."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        stable = os.environ.get("PERSONA_TEST_ARTIFACTS")
        self.stable = Path(stable) / "review_screenshots" if stable else None
        self.taken: list[Path] = []

    def __call__(self, page, name: str) -> None:
        path = self.folder / f"{len(self.taken) + 1:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        self.taken.append(path)
        if self.stable:
            self.stable.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, self.stable / path.name)


def log_in(page, base: str) -> None:
    page.goto(base + "/")
    assert page.url.startswith(base + "/login")
    assert page.locator("h1").inner_text() == "Log in"
    page.fill("#token", TOKEN)
    page.click("button:has-text('Log in')")
    page.wait_for_url(base + "/")


def open_page(chromium, size: str, problems: list[str]):
    """A fresh context at `size`; page errors and console errors (other than 4xx/5xx answers the
    test provokes) are collected into `problems`."""
    context = chromium.new_context(**SIZES[size])
    page = context.new_page()
    page.set_default_timeout(PAGE_WAIT_MS)
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: problems.append(f"console: {msg.text}")
            if msg.type == "error" and "status of 4" not in msg.text and "status of 5" not in msg.text else None)
    return context, page


def fits(page, size: str) -> None:
    """Nothing on the page is wider than the screen (no sideways scrolling)."""
    width = SIZES[size]["viewport"]["width"]
    assert page.evaluate("document.documentElement.scrollWidth") <= width, page.url
