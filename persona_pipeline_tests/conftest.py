"""Shared fixtures. Data-layer tests run on SQLite and on the PostgreSQL at PERSONA_TEST_POSTGRES_URL
(default: the local server, user postgres). PostgreSQL missing is a test failure, never a skip."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from persona_pipeline.db.session import get_engine, upgrade
from persona_pipeline.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "datasets" / "demo"
POSTGRES_ADMIN_URL = __import__("os").environ.get(
    "PERSONA_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")


def _postgres_database() -> tuple[str, callable]:
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"persona_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not answering at {POSTGRES_ADMIN_URL} ({exc.orig}); start it with "
                    "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`", pytrace=False)
    url = sa.engine.make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)

    def drop() -> None:
        get_engine(url).dispose()
        get_engine.cache_clear()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()

    return url, drop


def make_database(backend: str, folder: Path) -> tuple[str, callable]:
    """A freshly migrated application database: (url, cleanup)."""
    if backend == "sqlite":
        url = f"sqlite:///{folder / 'app.db'}"
        upgrade(url)
        return url, lambda: get_engine(url).dispose()
    url, drop = _postgres_database()
    try:
        upgrade(url)
    except BaseException:
        drop()
        raise
    return url, drop


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A freshly migrated application database on each backend."""
    url, cleanup = make_database(request.param, tmp_path)
    yield url
    cleanup()


def write_persona(datasets: Path, slug: str = "tester", photos: int = 12, **overrides) -> Path:
    """A persona folder with the first `photos` demo photos (and their sidecars) and a small config."""
    folder = datasets / slug
    (folder / "photos").mkdir(parents=True, exist_ok=True)
    for path in sorted((DEMO / "photos").glob("*.jpg"))[:photos]:
        shutil.copy(path, folder / "photos" / path.name)
        sidecar = path.with_suffix(".txt")
        if sidecar.exists():  # the demo's sidecars name the demo's trigger word
            (folder / "photos" / sidecar.name).write_text(sidecar.read_text().replace("m1ra, ", ""))
    config = {
        "name": "Test Persona", "trigger_word": "t3st", "class_word": "woman", "timezone": "Europe/Lisbon",
        "posting_windows": ["00:00-24:00"], "min_minutes_between_posts": 60,
        "pillars": [{"name": "city", "weight": 60, "priority": 1, "guidelines": "City days."},
                    {"name": "beach", "weight": 40, "priority": 2, "guidelines": "Beach days."}],
        "hashtags": {"targets": ["one", "two", "three"], "max_per_post": 2},
        # two checkpoints, one validation render each: selection runs for real, at a test's cost
        "training": {"min_photos": 10, "steps": 4, "checkpoint_every": 2,
                     "validation_prompts": ["photo of {trigger} {class_word}"], "validation_seeds": [7]},
        "generation": {"prompts_per_plan": 2},
    }
    config.update(overrides)
    (folder / "persona.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


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
    """A local Gemini server (persona_pipeline_tests/fake_gemini.py)."""
    from persona_pipeline_tests.fake_gemini import FakeGemini

    with FakeGemini(api_key="test-key") as server:
        yield server
