"""Throwaway application databases, freshly migrated: SQLite in a folder, or a database of its own
on the PostgreSQL at PERSONA_TEST_POSTGRES_URL (default: the local server, user postgres)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from persona_pipeline.db.session import get_engine, upgrade

POSTGRES_ADMIN_URL = os.environ.get("PERSONA_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server does not answer: a failure, never a reason to skip."""


def before_postgres() -> None:
    """Called before every database made on the server. The test suite's conftest replaces it for
    tests without the `postgres` marker with one that fails, so that the quick subset
    (`-m "not postgres"`) never needs the server."""


def postgres_database() -> tuple[str, Callable[[], None]]:
    """An empty database of its own on the PostgreSQL server: (url, drop)."""
    before_postgres()
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"persona_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        raise PostgresUnavailable(
            f"PostgreSQL is not answering at {POSTGRES_ADMIN_URL} ({exc.orig}); start it with "
            "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`") from None
    url = sa.engine.make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)

    def drop() -> None:
        get_engine(url).dispose()
        get_engine.cache_clear()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()

    return url, drop


def make_database(backend: str, folder: Path) -> tuple[str, Callable[[], None]]:
    """A freshly migrated application database on `backend` ("sqlite" or "postgresql"): (url, cleanup)."""
    if backend == "sqlite":
        url = f"sqlite:///{folder / 'app.db'}"
        upgrade(url)
        return url, lambda: get_engine(url).dispose()
    url, drop = postgres_database()
    try:
        upgrade(url)
    except BaseException:
        drop()
        raise
    return url, drop
