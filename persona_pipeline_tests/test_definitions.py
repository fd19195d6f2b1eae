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
    assert keys == set(CHAIN_ASSETS) | {"weekly_report", "audience_insights", "dataset_enrichment", "dataset_flywheel"}
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
    for sensor in ("persona_folders", "review_events", "dataset_reviews", "run_failure_alerts", "alerts"):
        assert defs.resolve_sensor_def(sensor).default_status == dg.DefaultSensorStatus.RUNNING
    # Accepted dataset candidates: a new dataset version and a LoRA trained on it, one training run per GPU.
    dataset_version = defs.resolve_job_def("dataset_version")
    assert dataset_version.tags[GPU_TAG] == "training" and dataset_version.partitions_def.name == "personas"
    assert {k.to_user_string() for k in dataset_version.asset_layer.selected_asset_keys} == {"training_dataset", "lora_model"}
    # One schedule per kind of persona.yaml `schedules:` entry, each aimed at its partitioned job.
    for kind, job in {"planning": "content_planning", "generation": "generation_runs", "posting": "library",
                      "report": "weekly_reporting"}.items():
        schedule = defs.resolve_schedule_def(f"persona_{kind}")
        assert schedule.job_name == job and schedule.cron_schedule == "* * * * *"
        assert defs.resolve_job_def(job).partitions_def.name == "personas"
    assert defs.resolve_schedule_def("publish_due_posts_schedule").cron_schedule == "*/5 * * * *"
    assert defs.resolve_schedule_def("insights_schedule").cron_schedule == "17 * * * *"
    assert upstream["audience_insights"] == ["scheduled_posts"]


def test_module_level_defs_use_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSONA_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("PERSONA_DATABASE_URL", f"sqlite:///{tmp_path / 'x.db'}")
    monkeypatch.setenv("PERSONA_PUBLISH_CRON", "0 * * * *")
    monkeypatch.delenv("ALERT_WEBHOOK_URL", raising=False)
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
    # Tidied on load (the trailing / dropped), so passed as the tidy value; a fraction, as a value.
    assert defs.resources["alerts"].ui_base_url == "https://dagster.example.com"
    assert defs.resources["freshness"].min_days_ahead == 5


def test_the_publisher_setting_picks_outbox_or_instagram(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSONA_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("PERSONA_DATABASE_URL", f"sqlite:///{tmp_path / 'x.db'}")
    assert type(build_definitions().resources["publisher"]).__name__ == "OutboxPublisher"
    monkeypatch.setenv("PERSONA_PUBLISHER", "instagram")
    # Without MEDIA_PUBLIC_BASE_URL, videos go by the resumable upload (INSTAGRAM_VIDEO_UPLOAD=auto); only
    # INSTAGRAM_VIDEO_UPLOAD=url still needs it for every post.
    with dg.build_resources({"publisher": build_definitions().resources["publisher"]}) as built:
        assert built.publisher.uploads_videos()
    monkeypatch.setenv("INSTAGRAM_VIDEO_UPLOAD", "url")
    with pytest.raises(ValueError, match="needs MEDIA_PUBLIC_BASE_URL"):
        build_definitions()
    monkeypatch.setenv("MEDIA_PUBLIC_BASE_URL", "https://cdn.example.com/media/")
    monkeypatch.setenv("INSTAGRAM_GRAPH_URL", "http://127.0.0.1:9/v23.0")
    monkeypatch.setenv("PERSONA_PUBLISH_WORKERS", "8")
    publisher = build_definitions().resources["publisher"]
    assert type(publisher).__name__ == "InstagramPublisher"
    assert publisher.graph.base_url.env_var_name == "INSTAGRAM_GRAPH_URL"  # as given: passed as the variable
    assert publisher.media_public_base_url == "https://cdn.example.com/media"  # tidied: passed as the value
    assert publisher.media_public_dir == str((tmp_path / "h" / "public_media").resolve())
    with dg.build_resources({"publisher": publisher}) as built:  # what a run gets
        assert built.publisher.workers == 8 and built.publisher.graph.base_url == "http://127.0.0.1:9/v23.0"
    monkeypatch.setenv("PERSONA_PUBLISHER", "facebook")
    with pytest.raises(ValueError, match="PERSONA_PUBLISHER='facebook'"):
        build_definitions()


def test_readme_starts_with_the_two_commands():
    """The settings table lives in docs/settings.md, generated and checked by test_settings.py."""
    from persona_pipeline_tests.conftest import REPO

    readme = (REPO / "README.md").read_text()
    demo_at, test_at = readme.index("<!-- demo-command -->"), readme.index("<!-- test-command -->")
    assert demo_at < test_at < readme.index("## What it is")
    assert "persona-pipeline demo" in readme[demo_at:test_at] and "pytest" in readme[test_at:test_at + 300]


# Every resource field the environment feeds, and its variable. A setting that is not here reaches no
# resource as a variable: a folder (made absolute), a number with a fraction or a flag (Dagster's EnvVar
# carries text and integers only), or a setting that no resource reads.
FED_BY_ENVIRONMENT = {
    ("database", "url"): "PERSONA_DATABASE_URL",
    ("storage", "s3_endpoint_url"): "PERSONA_S3_ENDPOINT_URL",
    ("diffusion", "base_model"): "PERSONA_BASE_MODEL",
    ("diffusion", "device"): "PERSONA_DEVICE",
    ("diffusion", "candidates_per_run"): "PERSONA_CANDIDATES_PER_RUN",
    ("diffusion", "controlnet_model"): "PERSONA_CONTROLNET_MODEL",
    ("diffusion", "batch_size"): "PERSONA_GENERATION_BATCH_SIZE",
    ("comfyui", "urls"): "COMFYUI_URLS",
    ("comfyui", "max_in_flight_per_server"): "COMFYUI_MAX_IN_FLIGHT",
    ("generation", "backend"): "PERSONA_GENERATION_BACKEND",
    ("generation", "comfyui_checkpoint"): "COMFYUI_CHECKPOINT",
    ("generation", "comfyui_lora_prefix"): "COMFYUI_LORA_PREFIX",
    ("clip", "model_name"): "PERSONA_CLIP_MODEL",
    ("clip", "pretrained"): "PERSONA_CLIP_PRETRAINED",
    ("clip", "device"): "PERSONA_DEVICE",
    ("gemini", "api_key"): "GEMINI_API_KEY",
    ("gemini", "model"): "PERSONA_GEMINI_MODEL",
    ("gemini", "base_url"): "GEMINI_BASE_URL",
    ("publisher", "workers"): "PERSONA_PUBLISH_WORKERS",
    ("publisher", "processes"): "PERSONA_PUBLISH_PROCESSES",
    ("publisher", "max_retries"): "PERSONA_PUBLISH_MAX_RETRIES",
    ("publisher", "media_public_base_url"): "MEDIA_PUBLIC_BASE_URL",
    ("publisher", "token_warn_days"): "INSTAGRAM_TOKEN_WARN_DAYS",
    ("publisher.graph", "base_url"): "INSTAGRAM_GRAPH_URL",
    ("insights.graph", "base_url"): "INSTAGRAM_GRAPH_URL",
    ("alerts", "url"): "ALERT_WEBHOOK_URL",
    ("alerts", "ui_base_url"): "DAGSTER_UI_BASE_URL",
    ("alerts", "max_attempts"): "ALERT_MAX_ATTEMPTS",
    ("links", "dagster_ui_base_url"): "DAGSTER_UI_BASE_URL",
    ("links", "review_base_url"): "REVIEW_BASE_URL",
}


def _environment_fields(resources: dict) -> dict[tuple[str, str], str]:
    """(resource, field) -> variable, for every field (nested resources too) that holds an EnvVar."""
    from dagster._config.field_utils import IntEnvVar

    found = {}
    for key, resource in resources.items():
        for name in type(resource).model_fields:
            value = getattr(resource, name)
            if isinstance(value, dg.ConfigurableResource):
                found.update(_environment_fields({f"{key}.{name}": value}))
            elif isinstance(value, (dg.EnvVar, IntEnvVar)):
                found[(key, name)] = value.env_var_name
    return found


def test_every_value_from_the_environment_reaches_the_resources_as_its_variable(monkeypatch, tmp_path):
    """With every setting a resource reads set, the Definitions hold each as `EnvVar` (the UI shows the
    name), none of the values appears in what the UI is sent, and a run still reads the values."""
    from dagster._core.remote_representation.external_data import RepositorySnap
    from dagster._serdes import serialize_value

    from persona_pipeline.settings import SETTINGS

    for setting in SETTINGS:
        monkeypatch.delenv(setting.env, raising=False)
    monkeypatch.setenv("PERSONA_HOME", str(tmp_path / "h"))
    assert _environment_fields(build_definitions().resources) == {}  # nothing set: the defaults, as values

    distinctive = {  # text no default or other field holds: found in the snapshot only if it leaked
        "PERSONA_DATABASE_URL": f"sqlite:///{tmp_path / 'db-password-in-url-5e1f.db'}",
        "PERSONA_S3_ENDPOINT_URL": "http://s3-endpoint-5e1f:9000",
        "PERSONA_BASE_MODEL": "base-model-5e1f", "PERSONA_CONTROLNET_MODEL": "controlnet-5e1f",
        "COMFYUI_URLS": "http://gpu-5e1f:8188", "COMFYUI_CHECKPOINT": "checkpoint-5e1f.safetensors",
        "COMFYUI_LORA_PREFIX": "lora-prefix-5e1f", "PERSONA_CLIP_MODEL": "clip-5e1f",
        "PERSONA_CLIP_PRETRAINED": "clip-weights-5e1f", "GEMINI_API_KEY": "gemini-secret-key-5e1f",
        "PERSONA_GEMINI_MODEL": "gemini-model-5e1f", "GEMINI_BASE_URL": "http://gemini-5e1f:1",
        "MEDIA_PUBLIC_BASE_URL": "https://media-5e1f.example.com", "INSTAGRAM_GRAPH_URL": "http://graph-5e1f:1/v23.0",
        "ALERT_WEBHOOK_URL": "https://hooks.example.com/services/webhook-secret-5e1f",
        "DAGSTER_UI_BASE_URL": "https://dagster-5e1f.example.com", "REVIEW_BASE_URL": "https://review-5e1f.example.com",
    }
    plain = {"PERSONA_DEVICE": "cpu", "PERSONA_CANDIDATES_PER_RUN": "7", "PERSONA_GENERATION_BATCH_SIZE": "3",
             "COMFYUI_MAX_IN_FLIGHT": "5", "PERSONA_GENERATION_BACKEND": "comfyui", "PERSONA_PUBLISH_WORKERS": "9",
             "PERSONA_PUBLISH_PROCESSES": "3",
             "PERSONA_PUBLISH_MAX_RETRIES": "2", "INSTAGRAM_TOKEN_WARN_DAYS": "11", "ALERT_MAX_ATTEMPTS": "6",
             "PERSONA_PUBLISHER": "instagram"}
    for name, value in {**distinctive, **plain}.items():
        monkeypatch.setenv(name, value)
    defs = build_definitions()
    assert _environment_fields(defs.resources) == FED_BY_ENVIRONMENT

    snapshot = RepositorySnap.from_def(defs.get_repository_def())
    sent = serialize_value(snapshot)
    assert [name for name, value in distinctive.items() if value in sent] == []
    assert set(snapshot.utilized_env_vars) == set(FED_BY_ENVIRONMENT.values())

    expected = {**distinctive, **plain}
    for (key, name), variable in FED_BY_ENVIRONMENT.items():  # what a run reads: the values, typed
        owner, _, nested = key.partition(".")
        with dg.build_resources({owner: defs.resources[owner]}) as built:
            resource = getattr(getattr(built, owner), nested) if nested else getattr(built, owner)
            value = getattr(resource, name)
            assert str(value) == expected[variable], (key, name)


def _substantial(description: str | None) -> bool:
    """A description that says something: whole sentences, not a name or Dagster's placeholder."""
    return bool(description) and len(description) >= 60 and "No description" not in description


def test_every_definition_says_what_it_does_and_what_starts_it(tmp_path):
    """The Dagster UI shows these descriptions: each asset names every job that materialises it, each
    job the sensors and schedules that start it (or says it is started by hand), each sensor and
    schedule the jobs it starts and how often, each check its asset."""
    defs = build_definitions(make_settings(tmp_path, f"sqlite:///{tmp_path / 'a.db'}"))
    graph = defs.resolve_asset_graph()
    jobs = [job for job in defs.resolve_all_job_defs() if not job.name.startswith("__")]
    sensors, schedules = list(defs.sensors), list(defs.schedules)
    starters = {job.name: [s.name for s in sensors if job.name in [t.job_name for t in s.targets]]
                + [s.name for s in schedules if s.job_name == job.name] for job in jobs}
    missing = []
    for key in graph.get_all_asset_keys():
        description = graph.get(key).description
        in_jobs = [job.name for job in jobs if key in job.asset_layer.selected_asset_keys]
        if not _substantial(description) or "Started" not in description:
            missing.append(f"asset {key.to_user_string()}: {description!r}")
        missing += [f"asset {key.to_user_string()} does not name job {name}" for name in in_jobs
                    if name not in (description or "")]
    for job in jobs:
        named = starters[job.name] or ["by hand"]
        if not _substantial(job.description) or not all(name in job.description for name in named):
            missing.append(f"job {job.name} ({named}): {job.description!r}")
    for sensor in sensors:
        targets = [t.job_name for t in sensor.targets]
        if (not _substantial(sensor.description) or f"Every {sensor.minimum_interval_seconds} s" not in sensor.description
                or not all(name in sensor.description for name in targets)):
            missing.append(f"sensor {sensor.name} ({targets}): {sensor.description!r}")
    for schedule in schedules:
        if not _substantial(schedule.description) or schedule.job_name not in schedule.description:
            missing.append(f"schedule {schedule.name}: {schedule.description!r}")
    specs = [spec for assets in defs.assets for spec in assets.check_specs]
    specs += [spec for checks in defs.asset_checks for spec in checks.check_specs]
    assert len(specs) == len(graph.asset_check_keys)
    for spec in specs:
        asset = spec.asset_key.to_user_string()
        if not _substantial(spec.description) or f"Runs with every {asset} materialisation" not in spec.description:
            missing.append(f"check {spec.key.to_user_string()}: {spec.description!r}")
    assert missing == []


def test_persona_schedules_show_each_personas_cron_and_timezone(tmp_path):
    """The UI reads "Every minute" for the four per-persona schedules: their descriptions name each
    persona's real cron, timezone and next fire times, and a persona whose file is broken."""
    import yaml

    from persona_pipeline_tests.conftest import write_persona

    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'a.db'}")
    folder = write_persona(settings.datasets_dir, "mira", photos=0)
    config = yaml.safe_load((folder / "persona.yaml").read_text())
    config["timezone"] = "America/New_York"
    config["schedules"] = {"generation": "30 7 * * 1-5", "report": None}
    (folder / "persona.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (settings.datasets_dir / "broken").mkdir()
    (settings.datasets_dir / "broken" / "persona.yaml").write_text("name: [unclosed\n")
    defs = build_definitions(settings)
    generation = defs.resolve_schedule_def("persona_generation").description
    # The crons come first (the UI shows the description as one paragraph above "Every minute").
    assert generation.startswith("Per persona, from persona.yaml `schedules.generation` as the code location loaded "
                                 "it: mira `30 7 * * 1-5` in America/New_York (next ")
    nexts = generation.split("America/New_York (next ", 1)[1].split(")", 1)[0].split(", ")
    assert len(nexts) == 3 and all(" 07:30" in moment and moment[:3] in ("Mon", "Tue", "Wed", "Thu", "Fri")
                                   for moment in nexts)
    assert "; broken not scheduled: invalid persona.yaml (" in generation
    assert "mira off; broken not scheduled" in defs.resolve_schedule_def("persona_report").description


# Loaded by every UI reload and every sensor/schedule process start: these cost seconds of CPU
# together and belong to the runs that use them (docs/operations.md#load-time).
HEAVY_AT_LOAD = ("sklearn", "scipy", "torch", "torchvision", "diffusers", "transformers", "open_clip", "peft",
                 "pandas", "safetensors", "cv2", "alembic", "onnxruntime", "onnx", "numpy", "PIL", "av", "imageio",
                 "matplotlib", "choix")


def test_loading_the_code_location_imports_no_heavy_library(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PERSONA_HOME": str(tmp_path / "h"), "PERSONA_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    # The collector is paused while the code location loads (definitions.collector_paused) and must be back on.
    code = ("import gc, json, sys, persona_pipeline.definitions as d; assert d.defs.resolve_asset_graph(); "
            "assert gc.isenabled(), 'the garbage collector was left off after the load'; "
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY_AT_LOAD!r})))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == [], f"loading Definitions imported {loaded}"
