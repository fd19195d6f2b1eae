"""The quick subset (`-m "not slow and not browser"`) is only as good as the markers: a misspelt
marker would silently put a slow test back in it, or a PostgreSQL test in a run without one."""

from __future__ import annotations

import re

import pytest

from persona_fakes import databases
from persona_pipeline_tests.conftest import REPO

MARKER_USE = re.compile(r"pytest\.mark\.([A-Za-z_]\w*)")


def registered(config) -> set[str]:
    """Every marker pytest knows: pyproject.toml's and the built-in ones (parametrize, skip...)."""
    return {line.split(":")[0].split("(")[0].strip() for line in config.getini("markers")}


def test_the_suite_refuses_unregistered_markers(request):
    assert request.config.getoption("strict_markers"), "pyproject.toml's addopts lost --strict-markers"
    assert {"slow", "postgres", "browser", "daemon"} <= registered(request.config)


def test_every_marker_in_the_test_files_is_registered(request):
    known = registered(request.config)
    unknown = sorted({f"{path.relative_to(REPO)}: {name}"
                      for path in (REPO / "persona_pipeline_tests").rglob("*.py")
                      for name in MARKER_USE.findall(path.read_text()) if name not in known})
    assert unknown == []


def test_every_collected_test_carries_only_registered_markers(request):
    known = registered(request.config)
    unknown = sorted({f"{item.nodeid}: {mark.name}" for item in request.session.items
                      for mark in item.iter_markers() if mark.name not in known})
    assert unknown == []


def test_a_test_without_the_postgres_marker_cannot_make_a_postgres_database():
    # conftest's pytest_runtest_setup: the quick subset (-m "not postgres") must never need the server.
    with pytest.raises(AssertionError, match="mark it `@pytest.mark.postgres`"):
        databases.postgres_database()
    with pytest.raises(AssertionError, match="test_markers.py::"):
        databases.make_database("postgresql", REPO)
