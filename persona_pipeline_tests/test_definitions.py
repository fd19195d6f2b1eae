"""The whole Definitions loads, as `dagster dev -w workspace.yaml` would load it."""

import dagster as dg
import pytest

from persona_pipeline.automation.jobs import CHAIN_ASSETS, GPU_TAG
from persona_pipeline.definitions import build_definitions
from persona_pipeline_tests.conftest import make_settings


def test_definitions_load_with_every_stage_partitioned_by_persona(tmp_path):
    defs = build_definitions(make_settings(tmp_path, f"sqlite:///{tmp_path / 'a.db'}"))
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == set(CHAIN_ASSETS) | {"weekly_report"}
    for key in graph.get_all_asset_keys():
        assert graph.get(key).partitions_def.name == "personas"
    upstream = {k.to_user_string(): sorted(p.to_user_string() for p in graph.get(k).parent_keys) for k in graph.get_all_asset_keys()}
    assert upstream["lora_model"] == ["training_dataset"] and upstream["scheduled_posts"] == ["clusters"]
    assert upstream["clusters"] == ["content_library"] and upstream["pillar_gaps"] == ["clusters"]
    assert {c.to_user_string() for c in defs.resolve_asset_graph().asset_check_keys} >= {
        "pillar_gaps:pillars_stocked", "post_calendar:calendar_slots_valid", "post_calendar:calendar_covers_ahead",
        "post_calendar:library_runway"}
    assert defs.resolve_job_def("persona_chain").tags[GPU_TAG] == "training"
    assert defs.resolve_job_def("publish_job").tags["persona-pipeline/publish"] == "batch"  # one at a time (dagster.yaml)
    for sensor in ("persona_folders", "review_events", "run_failure_alerts", "alerts"):
        assert defs.resolve_sensor_def(sensor).default_status == dg.DefaultSensorStatus.RUNNING
    # One schedule per kind of persona.yaml `schedules:` entry, each aimed at its partitioned job.
    for kind, job in {"planning": "content_planning", "generation": "generation_runs", "posting": "library",
                      "report": "weekly_reporting"}.items():
        schedule = defs.resolve_schedule_def(f"persona_{kind}")
        assert schedule.job_name == job and schedule.cron_schedule == "* * * * *"
        assert defs.resolve_job_def(job).partitions_def.name == "personas"
    assert defs.resolve_schedule_def("publish_due_posts_schedule").cron_schedule == "*/5 * * * *"


def test_module_level_defs_use_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSONA_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("PERSONA_DATABASE_URL", f"sqlite:///{tmp_path / 'x.db'}")
    monkeypatch.setenv("PERSONA_PUBLISH_CRON", "0 * * * *")
    defs = build_definitions()
    assert defs.resolve_schedule_def("publish_due_posts_schedule").cron_schedule == "0 * * * *"
    database = defs.resources["database"]
    assert isinstance(database.url, dg.EnvVar)  # the URL's value never shows in the UI
    assert defs.resources["alerts"].url == "" and not defs.resources["alerts"].enabled
    monkeypatch.setenv("ALERT_WEBHOOK_URL", "https://hooks.slack.com/services/T0/B0/secret")
    monkeypatch.setenv("DAGSTER_UI_BASE_URL", "https://dagster.example.com/")
    monkeypatch.setenv("PERSONA_FRESHNESS_DAYS", "5")
    defs = build_definitions()
    assert isinstance(defs.resources["alerts"].url, dg.EnvVar)  # a webhook URL is a secret too
    assert defs.resources["alerts"].ui_base_url == "https://dagster.example.com"
    assert defs.resources["freshness"].min_days_ahead == 5


def test_the_publisher_setting_picks_outbox_or_instagram(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSONA_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("PERSONA_DATABASE_URL", f"sqlite:///{tmp_path / 'x.db'}")
    assert type(build_definitions().resources["publisher"]).__name__ == "OutboxPublisher"
    monkeypatch.setenv("PERSONA_PUBLISHER", "instagram")
    with pytest.raises(ValueError, match="needs MEDIA_PUBLIC_BASE_URL"):
        build_definitions()
    monkeypatch.setenv("MEDIA_PUBLIC_BASE_URL", "https://cdn.example.com/media/")
    monkeypatch.setenv("INSTAGRAM_GRAPH_URL", "http://127.0.0.1:9/v23.0")
    monkeypatch.setenv("PERSONA_PUBLISH_WORKERS", "8")
    publisher = build_definitions().resources["publisher"]
    assert type(publisher).__name__ == "InstagramPublisher" and publisher.workers == 8
    assert publisher.graph.base_url == "http://127.0.0.1:9/v23.0"
    assert publisher.media_public_base_url == "https://cdn.example.com/media"
    assert publisher.media_public_dir == str((tmp_path / "h" / "public_media").resolve())
    monkeypatch.setenv("PERSONA_PUBLISHER", "facebook")
    with pytest.raises(ValueError, match="PERSONA_PUBLISHER='facebook'"):
        build_definitions()


def test_docs_name_every_setting_and_readme_starts_with_the_two_commands():
    from persona_pipeline.settings import SETTINGS
    from persona_pipeline_tests.conftest import REPO

    readme = (REPO / "README.md").read_text()
    docs = readme + "".join(path.read_text() for path in sorted((REPO / "docs").glob("*.md")))
    for setting in SETTINGS:
        assert f"`{setting.env}`" in docs, setting.env
    demo_at, test_at = readme.index("<!-- demo-command -->"), readme.index("<!-- test-command -->")
    assert demo_at < test_at < readme.index("## What it is")
    assert "persona-pipeline demo" in readme[demo_at:test_at] and "pytest" in readme[test_at:test_at + 300]
