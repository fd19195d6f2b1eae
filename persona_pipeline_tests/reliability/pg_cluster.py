"""A private, throw-away PostgreSQL cluster for fault tests that stop and restart the server.

The shared server at 127.0.0.1:5432 is never touched: `initdb` makes a cluster in a fresh folder
under /tmp (owned by the `postgres` user, since initdb and postgres refuse to run as root), and
`pg_ctl` starts it on a free port with its socket in that folder. `stop()`/`start()` are the
outage; `close()` stops it (immediate) and removes the folder, also after a failure."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from persona_fakes.serving import free_port


def _bin(name: str) -> str:
    """The newest installed PostgreSQL's binary `name` (Debian layout, then PATH)."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    if found:
        return found[-1]
    path = shutil.which(name)
    if not path:
        raise FileNotFoundError(f"PostgreSQL's {name} is not installed (looked in /usr/lib/postgresql/*/bin and PATH)")
    return path


class PrivateCluster:
    """One private PostgreSQL server: `with PrivateCluster() as pg: pg.create_database("app")`."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="persona-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self._as_postgres = os.geteuid() == 0  # root may not run initdb/postgres: drop to `postgres`
        self._started = False

    # -- processes -----------------------------------------------------------------------------
    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        command = list(args)
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
        return done

    def _options(self) -> str:
        # fsync off: a throw-away cluster; the fault tests stop it cleanly (-m fast), never crash it.
        return f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"

    def __enter__(self) -> "PrivateCluster":
        try:
            if self._as_postgres:
                shutil.chown(self.folder, "postgres")
            self._run(_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N")
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-o", self._options(), "-l", str(self.folder / "server.log"),
                  "-w", "-t", "60", "start")
        self._started = True

    def stop(self, mode: str = "fast") -> None:
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
        self._started = False

    def restart(self, mode: str = "fast") -> None:
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-o", self._options(),
                  "-l", str(self.folder / "server.log"), "-w", "-t", "60", "restart")
        self._started = True

    def close(self) -> None:
        """Stop the server (if it runs) and remove its folder."""
        try:
            if self.data.exists() and (self.data / "postmaster.pid").exists():
                self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "-t", "60", "stop")
        finally:
            self._started = False
            shutil.rmtree(self.folder, ignore_errors=True)

    # -- databases -----------------------------------------------------------------------------
    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """CREATE DATABASE `name`; returns its SQLAlchemy URL."""
        admin = sa.create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            deadline = time.monotonic() + 30
            while True:  # pg_ctl -w returns once the server accepts connections, but be generous
                try:
                    with admin.connect() as conn:
                        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
                    break
                except sa.exc.OperationalError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        finally:
            admin.dispose()
        return self.url(name)
