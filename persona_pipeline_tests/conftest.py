"""Shared fixtures. Data-layer tests run on SQLite and on the PostgreSQL at PERSONA_TEST_POSTGRES_URL
(default: the local server, user postgres). PostgreSQL missing is a test failure, never a skip."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from persona_fakes import databases
from persona_fakes.databases import make_database
from persona_fakes.personas import DEMO, write_persona  # noqa: F401  (the tests import them from here)
from persona_pipeline.settings import Settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> str:
    """A freshly migrated application database on each backend."""
    url, cleanup = make_database(request.param, tmp_path)
    yield url
    cleanup()


def _no_postgres_here(nodeid: str) -> None:
    raise AssertionError(f"{nodeid} makes a PostgreSQL database: mark it `@pytest.mark.postgres`")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """A test that makes a PostgreSQL database must carry the `postgres` marker: the quick subset
    (`-m "not postgres"`) is documented to run without the server. Set before any of the test's
    fixtures, module-scoped ones included."""
    if item.get_closest_marker("postgres") is None:
        databases.before_postgres = functools.partial(_no_postgres_here, item.nodeid)
    else:
        databases.before_postgres = _postgres_allowed


def _postgres_allowed() -> None:
    pass


def make_settings(tmp_path: Path, db_url: str, **overrides) -> Settings:
    values = dict(home=tmp_path / "home", database_url=db_url, datasets_dir=tmp_path / "datasets",
                  candidates_per_run=3, auto_review=True)
    values.update(overrides)
    (tmp_path / "datasets").mkdir(exist_ok=True)
    return Settings(**values)


def materialise_persona(assets, settings: Settings, folder: Path, **kwargs):
    """Sync the persona folder into the database, add its partition, materialise `assets`."""
    import dagster as dg

    from persona_pipeline.db import registry
    from persona_pipeline.db.session import session_scope
    from persona_pipeline.definitions import build_resources
    from persona_pipeline.personas import load_persona

    with session_scope(settings.database_url) as session:
        registry.sync_persona(session, load_persona(folder))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("personas", [folder.name])
    resources = build_resources(settings)
    return dg.materialize(assets, partition_key=folder.name, instance=instance, resources=resources, **kwargs), resources


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    """Gemini's backoff waits, recorded instead of slept."""
    from persona_pipeline.resources import gemini as gemini_module

    recorded: list[float] = []
    monkeypatch.setattr(gemini_module, "sleep", recorded.append)
    return recorded


@pytest.fixture
def fake():
    """A local Gemini server (persona_fakes/gemini.py)."""
    from persona_fakes.gemini import FakeGemini

    with FakeGemini(api_key="test-key") as server:
        yield server
