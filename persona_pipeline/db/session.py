"""Engines, sessions and migrations for the application database."""

from __future__ import annotations

import threading
import time
import weakref
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.exc import InvalidatePoolError
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:  # Alembic is imported where migrations run: loading the code location skips it
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# A pooled connection back in the pool less than this long ago is not pinged again at checkout.
PING_IDLE_S = 1.0
_RETURNED = "persona_returned_at"  # connection_record.info key: when the connection was last checked in


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


_batch_engines: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()
_batch_lock = threading.Lock()


def batch_engine(url: str) -> Engine:
    """The engine for a burst of short transactions (a publish batch's claims and outcomes: three
    a post): its own pool, whose connections are pinged only after sitting idle (`_ping_when_idle`).
    Everything else keeps `get_engine`'s ping at every checkout, so an outage's errors there name
    the server (a stale connection used without a ping fails with "server closed the connection"
    instead). One per `get_engine` engine: clearing that cache drops it too. SQLite: get_engine's."""
    engine = get_engine(url)
    if engine.dialect.name == "sqlite":
        return engine
    with _batch_lock:
        busy = _batch_engines.get(engine)
        if busy is None:
            busy = _batch_engines[engine] = create_engine(url)
            _ping_when_idle(busy)
    return busy


def _ping_when_idle(engine: Engine) -> None:
    """Pessimistic disconnect handling, as `pool_pre_ping` does, but only for a connection that
    sat in the pool PING_IDLE_S or longer: pool_pre_ping sends a `SELECT 1` round trip at every
    checkout, one per short transaction (three a published post), while a connection checked in a
    moment ago has just shown it works (and a server that died within that moment fails the
    transaction, as one dying mid-transaction does). A failed ping of an idle one (the server restarted)
    invalidates the pool, as pool_pre_ping does, and the checkout gets a new connection."""
    dialect = engine.dialect

    @event.listens_for(engine, "connect")
    def _fresh(_dbapi_conn, record) -> None:  # noqa: ANN001 - a new connection needs no ping
        record.info[_RETURNED] = time.monotonic()

    @event.listens_for(engine, "checkin")
    def _returned(_dbapi_conn, record) -> None:  # noqa: ANN001
        if record is not None:
            record.info[_RETURNED] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_conn, record, _proxy) -> None:  # noqa: ANN001
        if time.monotonic() - record.info.get(_RETURNED, float("-inf")) < PING_IDLE_S:
            return
        try:
            dialect.do_ping(dbapi_conn)
        except dialect.loaded_dbapi.Error as exc:
            if dialect.is_disconnect(exc, dbapi_conn, None):
                raise InvalidatePoolError(f"ping of an idle pooled connection failed: {exc}") from exc
            raise


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
