"""The one Definitions of the code location: assets, checks, sensors, schedules, resources."""

from __future__ import annotations

import atexit
import gc
from contextlib import contextmanager
from functools import partial


@contextmanager
def collector_paused():
    """The garbage collector off for the block; at its end the objects it built are frozen
    (`gc.freeze`: no later collection walks them) and the collector restored as it was. Loading
    the code location (every UI reload, every sensor and schedule process start) builds some
    280,000 long-lived objects: Dagster's, SQLAlchemy's and pydantic's classes and our definitions.
    Collecting while they are built cost about a fifth of the load's CPU and finds next to no
    garbage (with the collector off throughout, a full collection after the load finds under 1,000
    unreachable objects, which freezing keeps); unfrozen, the first collection after the load
    would walk them all again (docs/operations.md#load-time). They are unfrozen at exit, so the
    interpreter's last collections free them: frozen, extension modules loaded later (triton's,
    through torch) reported their objects as leaked at every exit of a process that generated."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        atexit.register(gc.unfreeze)
        if collecting:
            gc.enable()


with collector_paused():
    import dagster as dg

    from persona_pipeline.assets.audience_insights import audience_insights
    from persona_pipeline.assets.candidates import candidates
    from persona_pipeline.assets.clusters import clusters
    from persona_pipeline.assets.content_library import content_library
    from persona_pipeline.assets.content_plan import content_plan
    from persona_pipeline.assets.lora_model import lora_model
    from persona_pipeline.assets.pillar_gaps import pillar_gaps, pillars_stocked
    from persona_pipeline.assets.post_calendar import calendar_slots_valid, post_calendar
    from persona_pipeline.assets.rankings import rankings
    from persona_pipeline.assets.scheduled_posts import scheduled_posts
    from persona_pipeline.assets.source_photos import source_photos
    from persona_pipeline.assets.training_dataset import training_dataset
    from persona_pipeline.assets.dataset_growth import dataset_enrichment, dataset_flywheel
    from persona_pipeline.assets.weekly_report import weekly_report
    from persona_pipeline.assets.freshness_checks import calendar_covers_ahead, library_runway
    from persona_pipeline.automation.alerts import alert_sensor, run_failure_alerts
    from persona_pipeline.automation.dataset_sensor import dataset_sensor
    from persona_pipeline.automation.jobs import (
        advance_runs_job,
        content_planning_job,
        dataset_growth_job,
        dataset_version_job,
        generation_job,
        generation_runs_job,
        library_job,
        lora_training_job,
        persona_chain_job,
        post_calendar_job,
        rankings_job,
        weekly_report_job,
    )
    from persona_pipeline.automation.lora_import import lora_import_job, lora_incoming_sensor
    from persona_pipeline.automation.persona_schedules import persona_schedules
    from persona_pipeline.automation.persona_sensor import persona_sensor
    from persona_pipeline.automation.insights import insights_job, insights_schedule
    from persona_pipeline.automation.publishing import publish_job, publish_schedule
    from persona_pipeline.automation.review_sensor import review_sensor
    from persona_pipeline.resources.alerts import AlertWebhook, FreshnessRules
    from persona_pipeline.resources.clip import ClipModel
    from persona_pipeline.resources.evaluation import FaceModel, PromotionRules
    from persona_pipeline.resources.comfyui import ComfyUIPool
    from persona_pipeline.resources.database import AppDatabase
    from persona_pipeline.resources.diffusion import DiffusionBackend
    from persona_pipeline.resources.gemini import GeminiClient
    from persona_pipeline.resources.generation import GenerationDefaults
    from persona_pipeline.resources.insights_collector import InsightsCollector
    from persona_pipeline.resources.instagram import InstagramGraphClient
    from persona_pipeline.resources.links import UiLinks
    from persona_pipeline.resources.publisher import InstagramPublisher, OutboxPublisher, Publisher
    from persona_pipeline.resources.review_policy import AutoReviewer
    from persona_pipeline.resources.storage import PersonaFolders, PersonaStorage
    from persona_pipeline.personas import discover_personas
    from persona_pipeline.settings import Settings

ASSETS = [source_photos, training_dataset, lora_model, content_plan, candidates, rankings, content_library, clusters,
          pillar_gaps, scheduled_posts, post_calendar, weekly_report, audience_insights, dataset_enrichment, dataset_flywheel]


def from_settings(settings: Settings, attr: str):
    """The value a resource field gets for the setting `attr`: `dg.EnvVar` naming its variable when the
    environment gave the value (so the Dagster UI shows the name, never the value), else the value."""
    declared = settings.variable_for(attr)
    if declared is None:
        return getattr(settings, attr)
    return dg.EnvVar.int(declared.env) if declared.kind.carried == "int" else dg.EnvVar(declared.env)


def build_resources(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    """Every resource from the settings: `env(attr)` for a setting as it is (an EnvVar where the environment
    gave it), `str(settings.<folder>)` for a folder (made absolute on load, so passed as its value)."""
    env = partial(from_settings, settings)
    return {
        "database": AppDatabase(url=env("database_url")),
        # With an s3:// PERSONA_HOME, home is the local cache and the bucket is mirrored at each step.
        "storage": PersonaStorage(home=str(settings.home), artifact_store=settings.artifact_store,
                                  s3_endpoint_url=env("s3_endpoint_url")),
        "persona_folders": PersonaFolders(datasets_dir=str(settings.datasets_dir)),
        "diffusion": DiffusionBackend(base_model=env("base_model"), device=env("device"),
                                      models_dir=str(settings.home / "models"), candidates_per_run=env("candidates_per_run"),
                                      controlnet_model=env("controlnet_model"), batch_size=env("generation_batch_size")),
        "comfyui": ComfyUIPool(urls=env("comfyui_urls"), max_in_flight_per_server=env("comfyui_max_in_flight"),
                               job_timeout_s=env("comfyui_job_timeout_s")),
        "generation": GenerationDefaults(backend=env("generation_backend"), workflows_dir=str(settings.workflows_dir),
                                         comfyui_checkpoint=env("comfyui_checkpoint"),
                                         comfyui_lora_prefix=env("comfyui_lora_prefix")),
        "clip": ClipModel(model_name=env("clip_model"), pretrained=env("clip_pretrained"), device=env("device")),
        "face": FaceModel(model_path=env("face_model"), detector_path=env("face_detector")),
        "promotion": PromotionRules(identity_tolerance=env("promote_identity_tolerance"),
                                    alignment_tolerance=env("promote_alignment_tolerance")),
        "gemini": GeminiClient(api_key=env("gemini_api_key"), model=env("gemini_model"), base_url=env("gemini_base_url")),
        "auto_review": AutoReviewer(enabled=env("auto_review")),
        "publisher": build_publisher(settings),
        "insights": InsightsCollector(
            graph=InstagramGraphClient(base_url=env("instagram_graph_url")), workers=env("insights_workers"),
            audience_seed=env("audience_seed"), audience_pillar_rates=env("audience_pillar_rates"),
            audience_peak_hour=env("audience_peak_hour"), audience_hour_amplitude=env("audience_hour_amplitude"),
            audience_format_rates=env("audience_format_rates")),
        "alerts": AlertWebhook(url=env("alert_webhook_url"), ui_base_url=env("dagster_ui_base_url"),
                               max_attempts=env("alert_max_attempts")),
        "freshness": FreshnessRules(min_days_ahead=env("freshness_days")),
        "links": UiLinks(dagster_ui_base_url=env("dagster_ui_base_url"), review_base_url=env("review_base_url")),
    }


def build_publisher(settings: Settings) -> Publisher:
    """PERSONA_PUBLISHER: the dry-run outbox (default) or the Instagram Graph API."""
    env = partial(from_settings, settings)
    common = dict(workers=env("publish_workers"), processes=env("publish_processes"),
                  max_retries=env("publish_max_retries"))
    if settings.publisher == "outbox":
        return OutboxPublisher(home=str(settings.home), **common)
    if not settings.media_public_base_url and settings.instagram_video_upload == "url":
        raise ValueError("PERSONA_PUBLISHER=instagram needs MEDIA_PUBLIC_BASE_URL: the public URL where "
                         f"{settings.public_media_dir} is served, so Instagram can fetch each post's JPEG "
                         "(INSTAGRAM_VIDEO_UPLOAD=url; with auto or resumable, videos are uploaded without it and "
                         "image posts fail each, naming it)")
    return InstagramPublisher(
        graph=InstagramGraphClient(base_url=env("instagram_graph_url"), poll_timeout_s=env("instagram_poll_timeout_s"),
                                   video_poll_timeout_s=env("instagram_video_poll_timeout_s")),
        media_public_base_url=env("media_public_base_url"), media_public_dir=str(settings.public_media_dir),
        token_warn_days=env("instagram_token_warn_days"), video_upload=env("instagram_video_upload"), **common)


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    settings = settings or Settings.from_env()
    personas, persona_errors = discover_personas(settings.datasets_dir)  # for the schedules' descriptions only
    return dg.Definitions(
        assets=ASSETS,
        asset_checks=[calendar_slots_valid, pillars_stocked, calendar_covers_ahead, library_runway],
        jobs=[persona_chain_job, lora_training_job, generation_job, advance_runs_job, rankings_job, library_job,
              post_calendar_job, publish_job, lora_import_job, content_planning_job, generation_runs_job,
              weekly_report_job, insights_job, dataset_growth_job, dataset_version_job],
        sensors=[persona_sensor, lora_incoming_sensor, review_sensor, dataset_sensor, run_failure_alerts,
                 alert_sensor],
        schedules=[publish_schedule(settings.publish_cron), insights_schedule(settings.insights_cron),
                   *persona_schedules(personas, persona_errors)],
        resources=build_resources(settings),
    )


with collector_paused():
    defs = build_definitions()
