"""The application database as a Dagster resource."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import dagster as dg
from sqlalchemy.orm import Session

from persona_pipeline.db import session as db_session


class AppDatabase(dg.ConfigurableResource):
    """SQLAlchemy URL of the application database (PERSONA_DATABASE_URL)."""

    url: str

    @contextmanager
    def session(self) -> Iterator[Session]:
        with db_session.session_scope(self.url) as session:
            yield session

    def upgrade(self) -> None:
        db_session.upgrade(self.url)

    def require_schema(self) -> None:
        """Fail with the fix named when the migrations have not been applied."""
        head = db_session.head_revision()
        current = db_session.current_revision(self.url)
        if current != head:
            raise RuntimeError(f"application database is at revision {current or 'none'}, code expects {head}: "
                               f"run `persona-pipeline db upgrade`")
