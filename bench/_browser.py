"""What the browser benchmarks share: Debian's Chromium and its flags, the nearest-rank percentile,
and a workspace (a fresh PostgreSQL database, a PERSONA_HOME and, once started, the form in a
subprocess) that is removed when the benchmark passed and kept, with the form's log, when not."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from persona_fakes.databases import make_database
from review_load import FormServer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic", "--disable-renderer-backgrounding",
                 "--disable-background-timer-throttling", "--disable-backgrounding-occluded-windows"]


def require_chromium() -> None:
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} is missing: apt-get install -y chromium")


class Workspace:
    """`with Workspace("bench-x-") as ws:` gives ws.url (a migrated PostgreSQL database) and ws.home;
    `ws.serve(tokens)` starts the form. Set `ws.ok` when the benchmark passed: the folder is removed
    then, and kept (its path printed) otherwise."""

    def __init__(self, prefix: str) -> None:
        self.work = Path(tempfile.mkdtemp(prefix=prefix))
        self.url, self._drop = make_database("postgresql", self.work)
        self.home = self.work / "home"
        self.home.mkdir()
        self.server: FormServer | None = None
        self.ok = False

    def serve(self, tokens: dict[str, str]) -> FormServer:
        self.server = FormServer(self.url, self.home, tokens, self.work / "server.log")
        return self.server

    def server_clean(self) -> bool:
        """No 5xx answer and no exception in the form's log; prints them when there are."""
        fives, crashes, errors = self.server.log_problems()
        if fives or crashes:
            print(f"  server log: {fives} 5xx answers, {crashes} exceptions:\n    " + "\n    ".join(errors))
        return not fives and not crashes

    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.stop()
        self._drop()
        if self.ok:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            print(f"  kept {self.work} (server.log)")
