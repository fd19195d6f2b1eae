"""The one Definitions of the code location: assets, checks, sensors, schedules, resources."""

from __future__ import annotations

import os

import dagster as dg

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
from persona_pipeline.assets.weekly_report import weekly_report
from persona_pipeline.assets.freshness_checks import calendar_covers_ahead, library_runway
from persona_pipeline.automation.alerts import alert_sensor, run_failure_alerts
from persona_pipeline.automation.jobs import (
    advance_runs_job,
    content_planning_job,
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
from persona_pipeline.automation.publishing import publish_job, publish_schedule
from persona_pipeline.automation.review_sensor import review_sensor
from persona_pipeline.resources.alerts import AlertWebhook, FreshnessRules
from persona_pipeline.resources.clip import ClipModel
from persona_pipeline.resources.comfyui import ComfyUIPool
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.diffusion import DiffusionBackend
from persona_pipeline.resources.gemini import GeminiClient
from persona_pipeline.resources.generation import GenerationDefaults
from persona_pipeline.resources.instagram import InstagramGraphClient
from persona_pipeline.resources.publisher import InstagramPublisher, OutboxPublisher, Publisher
from persona_pipeline.resources.review_policy import AutoReviewer
from persona_pipeline.resources.storage import PersonaFolders, PersonaStorage
from persona_pipeline.settings import Settings

ASSETS = [source_photos, training_dataset, lora_model, content_plan, candidates, rankings, content_library, clusters,
          pillar_gaps, scheduled_posts, post_calendar, weekly_report]


def build_resources(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    # The database URL may hold a password: when it comes from the environment, pass it as an
    # EnvVar so the UI shows the variable's name, not its value.
    database_url = dg.EnvVar("PERSONA_DATABASE_URL") if os.environ.get("PERSONA_DATABASE_URL", "").strip() == settings.database_url else settings.database_url
    return {
        "database": AppDatabase(url=database_url),
        # With an s3:// PERSONA_HOME, home is the local cache and the bucket is mirrored at each step.
        "storage": PersonaStorage(home=str(settings.home), artifact_store=settings.artifact_store,
                                  s3_endpoint_url=settings.s3_endpoint_url),
        "persona_folders": PersonaFolders(datasets_dir=str(settings.datasets_dir)),
        "diffusion": DiffusionBackend(base_model=settings.base_model, device=settings.device,
                                      models_dir=str(settings.home / "models"), candidates_per_run=settings.candidates_per_run,
                                      controlnet_model=settings.controlnet_model, batch_size=settings.generation_batch_size),
        "comfyui": ComfyUIPool(urls=settings.comfyui_urls, max_in_flight_per_server=settings.comfyui_max_in_flight,
                               job_timeout_s=settings.comfyui_job_timeout_s),
        "generation": GenerationDefaults(backend=settings.generation_backend, workflows_dir=str(settings.workflows_dir),
                                         comfyui_checkpoint=settings.comfyui_checkpoint,
                                         comfyui_lora_prefix=settings.comfyui_lora_prefix),
        "clip": ClipModel(model_name=settings.clip_model, pretrained=settings.clip_pretrained, device=settings.device),
        # The key is passed as an EnvVar, never as its value, so the UI cannot show it.
        "gemini": GeminiClient(api_key=dg.EnvVar("GEMINI_API_KEY") if os.environ.get("GEMINI_API_KEY", "").strip() else "",
                               model=settings.gemini_model, base_url=settings.gemini_base_url),
        "auto_review": AutoReviewer(enabled=settings.auto_review),
        "publisher": build_publisher(settings),
        # A Slack webhook URL is a secret: like the keys above, pass the variable, not its value.
        "alerts": AlertWebhook(url=dg.EnvVar("ALERT_WEBHOOK_URL") if os.environ.get("ALERT_WEBHOOK_URL", "").strip() == settings.alert_webhook_url and settings.alert_webhook_url else settings.alert_webhook_url,
                               ui_base_url=settings.dagster_ui_base_url, max_attempts=settings.alert_max_attempts),
        "freshness": FreshnessRules(min_days_ahead=settings.freshness_days),
    }


def build_publisher(settings: Settings) -> Publisher:
    """PERSONA_PUBLISHER: the dry-run outbox (default) or the Instagram Graph API."""
    common = dict(workers=settings.publish_workers, max_retries=settings.publish_max_retries)
    if settings.publisher == "outbox":
        return OutboxPublisher(home=str(settings.home), **common)
    if not settings.media_public_base_url:
        raise ValueError("PERSONA_PUBLISHER=instagram needs MEDIA_PUBLIC_BASE_URL: the public URL where "
                         f"{settings.public_media_dir} is served, so Instagram can fetch each post's JPEG")
    return InstagramPublisher(
        graph=InstagramGraphClient(base_url=settings.instagram_graph_url, poll_timeout_s=settings.instagram_poll_timeout_s),
        media_public_base_url=settings.media_public_base_url, media_public_dir=str(settings.public_media_dir),
        token_warn_days=settings.instagram_token_warn_days, **common)


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    settings = settings or Settings.from_env()
    return dg.Definitions(
        assets=ASSETS,
        asset_checks=[calendar_slots_valid, pillars_stocked, calendar_covers_ahead, library_runway],
        jobs=[persona_chain_job, lora_training_job, generation_job, advance_runs_job, rankings_job, library_job,
              post_calendar_job, publish_job, lora_import_job, content_planning_job, generation_runs_job,
              weekly_report_job],
        sensors=[persona_sensor, lora_incoming_sensor, review_sensor, run_failure_alerts, alert_sensor],
        schedules=[publish_schedule(settings.publish_cron), *persona_schedules()],
        resources=build_resources(settings),
    )


defs = build_definitions()
