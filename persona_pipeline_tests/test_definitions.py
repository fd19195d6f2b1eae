"""The whole Definitions loads, as `dagster dev -w workspace.yaml` would load it."""

import dagster as dg

from persona_pipeline.automation.jobs import CHAIN_ASSETS, GPU_TAG
from persona_pipeline.definitions import build_definitions
from persona_pipeline_tests.conftest import make_settings


def test_definitions_load_with_every_stage_partitioned_by_persona(tmp_path):
    defs = build_definitions(make_settings(tmp_path, f"sqlite:///{tmp_path / 'a.db'}"))
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == set(CHAIN_ASSETS)
    for key in graph.get_all_asset_keys():
        assert graph.get(key).partitions_def.name == "personas"
    upstream = {k.to_user_string(): sorted(p.to_user_string() for p in graph.get(k).parent_keys) for k in graph.get_all_asset_keys()}
    assert upstream["lora_model"] == ["training_dataset"] and upstream["scheduled_posts"] == ["clusters"]
    assert defs.resolve_job_def("persona_chain").tags[GPU_TAG] == "training"
    assert defs.resolve_sensor_def("persona_folders") is not None
    assert defs.resolve_schedule_def("publish_due_posts_schedule").cron_schedule == "*/5 * * * *"


def test_module_level_defs_use_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSONA_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("PERSONA_DATABASE_URL", f"sqlite:///{tmp_path / 'x.db'}")
    monkeypatch.setenv("PERSONA_PUBLISH_CRON", "0 * * * *")
    defs = build_definitions()
    assert defs.resolve_schedule_def("publish_due_posts_schedule").cron_schedule == "0 * * * *"
    database = defs.resources["database"]
    assert isinstance(database.url, dg.EnvVar)  # the URL's value never shows in the UI


def test_readme_documents_every_setting_and_starts_with_the_two_commands():
    from persona_pipeline.settings import SETTINGS
    from persona_pipeline_tests.conftest import REPO

    readme = (REPO / "README.md").read_text()
    for setting in SETTINGS:
        assert f"`{setting.env}`" in readme, setting.env
    demo_at, test_at = readme.index("<!-- demo-command -->"), readme.index("<!-- test-command -->")
    assert demo_at < test_at < readme.index("## What it is")
    assert "persona-pipeline demo" in readme[demo_at:test_at] and "pytest" in readme[test_at:test_at + 300]
