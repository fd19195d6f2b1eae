"""Engines, sessions and migrations for the application database."""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:  # Alembic is imported where migrations run: loading the code location skips it
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def _make_sqlite_folder(url: str) -> bool:
    """For a SQLite file URL, create the file's folder (SQLite creates the file, not its folder);
    True for any SQLite URL."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return False
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    return True


@lru_cache(maxsize=16)
def get_engine(url: str) -> Engine:
    """One engine per URL per process. SQLite gets foreign keys on, WAL and a busy timeout."""
    if _make_sqlite_folder(url):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


@lru_cache(maxsize=16)
def _session_factory(url: str) -> sessionmaker:
    """One factory per engine: each `sessionmaker()` makes a new Session subclass, whose event
    set-up cost about 1 ms per call when every short transaction built its own."""
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    session = _session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Apply the Alembic migrations (`persona-pipeline db upgrade`)."""
    from alembic import command

    _make_sqlite_folder(url)  # a fresh PERSONA_HOME: Alembic opens its own engine
    command.upgrade(alembic_config(url), revision)


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(url: str) -> str | None:
    with get_engine(url).connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
