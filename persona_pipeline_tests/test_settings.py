"""The settings' one source: the declarations in persona_pipeline/settings.py load the environment,
refuse bad values naming the variable and the value, print as `persona-pipeline settings`, and
generate docs/settings.md."""

from __future__ import annotations

from dataclasses import fields

import pytest

from persona_pipeline import cli
from persona_pipeline.settings import (
    REPO_WORKFLOWS, SETTINGS, Choice, EndpointUrl, Range, Settings, settings_markdown,
)
from persona_pipeline_tests.conftest import REPO

DOCS = REPO / "docs" / "settings.md"
REGENERATE = "persona-pipeline settings --markdown > docs/settings.md"


def test_docs_settings_md_is_the_generated_table():
    assert DOCS.read_text() == settings_markdown(), (
        f"docs/settings.md differs from the declarations in persona_pipeline/settings.py: run `{REGENERATE}`")


def test_each_setting_is_declared_once_with_a_type_and_help():
    names = [s.env for s in SETTINGS]
    assert len(names) == len(set(names)) == 59
    assert [s.attr for s in SETTINGS] == [f.name for f in fields(Settings) if "setting" in f.metadata]
    undeclared = {f.name for f in fields(Settings)} - {s.attr for s in SETTINGS}
    assert undeclared == {"artifact_store", "from_environment"}  # derived from PERSONA_HOME / by from_env
    for s in SETTINGS:
        assert s.help.strip() and s.type, s.env
        assert f"| `{s.env}` |" in DOCS.read_text(), s.env
    assert {s.env for s in SETTINGS if s.secret} == {
        "PERSONA_DATABASE_URL", "GEMINI_API_KEY", "REVIEW_TOKENS", "REVIEW_SECRET_KEY", "ALERT_WEBHOOK_URL"}


def test_an_empty_environment_gives_the_declared_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loaded = Settings.from_env({})
    home = tmp_path / ".persona_home"
    built = Settings(home=home, database_url=f"sqlite:///{home / 'persona.db'}", datasets_dir=tmp_path / "datasets")
    assert loaded == built  # the dataclass defaults are the declared ones
    assert loaded.from_environment == frozenset()
    assert loaded.workflows_dir == REPO_WORKFLOWS and loaded.public_media_dir == home / "public_media"
    assert (loaded.candidates_per_run, loaded.comfyui_job_timeout_s, loaded.auto_review) == (4, 600.0, False)


def test_values_are_parsed_tidied_and_remembered_as_from_the_environment(tmp_path):
    environ = {"PERSONA_HOME": str(tmp_path / "h"), "PERSONA_CANDIDATES_PER_RUN": " 8 ", "PERSONA_AUTO_REVIEW": "yes",
               "COMFYUI_JOB_TIMEOUT_S": "30.5", "COMFYUI_LORA_PREFIX": "/studio/", "DAGSTER_UI_BASE_URL": "https://ui/",
               "PERSONA_DEVICE": "cuda:1", "PERSONA_GEMINI_MODEL": "  gemini-x ", "GEMINI_API_KEY": " key-with-spaces ",
               "MEDIA_PUBLIC_DIR": str(tmp_path / "m" / ".." / "media"), "PERSONA_WORKFLOWS_DIR": "   "}
    loaded = Settings.from_env(environ)
    assert (loaded.candidates_per_run, loaded.auto_review, loaded.comfyui_job_timeout_s) == (8, True, 30.5)
    assert (loaded.comfyui_lora_prefix, loaded.dagster_ui_base_url, loaded.device) == ("studio", "https://ui", "cuda:1")
    assert loaded.gemini_model == "gemini-x" and loaded.gemini_api_key == "key-with-spaces"
    assert loaded.public_media_dir == tmp_path / "media" and loaded.workflows_dir == REPO_WORKFLOWS  # blank = unset
    # Verbatim text and integers go to resources as EnvVar; tidied text, a fraction or a flag as values;
    # a secret always as EnvVar.
    assert loaded.from_environment == {"candidates_per_run", "device", "gemini_api_key"}
    assert loaded.variable_for("device").env == "PERSONA_DEVICE" and loaded.variable_for("gemini_model") is None
    assert "key-with-spaces" not in repr(loaded)  # secrets are left out of the repr


def _bad_values():
    """Each checked setting with a value its kind refuses."""
    for s in SETTINGS:
        if isinstance(s.kind, Range) and s.kind.type_ is int:
            yield s.env, "many", f"{s.env}='many' is not an integer"
            yield s.env, str(s.kind.high + 1), f"{s.env}={s.kind.high + 1} is out of range {s.kind.low}..{s.kind.high}"
        elif isinstance(s.kind, Range):
            yield s.env, "soon", f"{s.env}='soon' is not a number"
            yield s.env, "-1", f"{s.env}=-1.0 is out of range {s.kind.low}..{s.kind.high}"
        elif isinstance(s.kind, Choice):
            yield s.env, "other", f"{s.env}='other' must be {' or '.join(f'`{o}`' for o in s.kind.options)}"
        elif isinstance(s.kind, EndpointUrl):
            yield s.env, "minio:9000", f"{s.env}='minio:9000' must be an http:// or https:// URL with a host"
    yield "PERSONA_HOME", "ftp://bucket/x", "PERSONA_HOME='ftp://bucket/x': the scheme ftp:// is not supported"


@pytest.mark.parametrize("name, value, message", list(_bad_values()), ids=lambda v: str(v)[:40])
def test_a_bad_value_is_refused_naming_the_variable_and_the_value(name, value, message, tmp_path):
    environ = {"PERSONA_HOME": str(tmp_path / "h"), name: value}
    with pytest.raises(ValueError) as error:
        Settings.from_env(environ)
    assert str(error.value).startswith(message)


def test_the_settings_command_prints_every_setting_and_never_a_secret(monkeypatch, capsys):
    for s in SETTINGS:
        monkeypatch.delenv(s.env, raising=False)
    secrets = {"PERSONA_DATABASE_URL": "postgresql+psycopg2://app:db-password-9c2d@db/app",
               "GEMINI_API_KEY": "gemini-key-9c2d", "REVIEW_TOKENS": "ana:review-token-9c2d-0123456789",
               "REVIEW_SECRET_KEY": "cookie-key-9c2d", "ALERT_WEBHOOK_URL": "https://hooks.example.com/hook-9c2d"}
    for name, value in {**secrets, "PERSONA_DEVICE": "cuda:3"}.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["settings"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["variable", "type", "default", "secret", "set"]
    assert len(lines) == 1 + len(SETTINGS)
    for s in SETTINGS:
        assert any(line.startswith(s.env + " ") for line in lines), s.env
    assert [name for name, value in secrets.items() if value in out or value.split("@")[0] in out] == []
    database = next(line for line in lines if line.startswith("PERSONA_DATABASE_URL "))
    assert " yes " in database and " set " in database
    assert "cuda:3" in next(line for line in lines if line.startswith("PERSONA_DEVICE "))

    assert cli.main(["settings", "--markdown"]) == 0
    assert capsys.readouterr().out == DOCS.read_text()

