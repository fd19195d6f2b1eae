"""Asset jobs, and the run tags that dagster.yaml's `concurrency: runs: tag_concurrency_limits` count:

- GPU_TAG=training: runs that train a LoRA (one at a time: one training run per GPU);
- GENERATION_TAG=batch: runs that materialise `candidates` (capped, so a burst of schedule ticks and
  review decisions cannot pile generation runs onto the GPU / ComfyUI servers);
- PUBLISH_TAG `persona-pipeline/publish=batch`: one publish run at a time (quota reads must not overlap).
A run that does both (`persona_chain`) carries both tags and counts against both limits."""

import dagster as dg

from persona_pipeline.partitions import persona_partitions

GPU_TAG = "persona-pipeline/gpu"
GENERATION_TAG = "persona-pipeline/generation"
TRAINING_TAGS = {GPU_TAG: "training"}
GENERATION_TAGS = {GENERATION_TAG: "batch"}
PUBLISH_TAG = {"persona-pipeline/publish": "batch"}
PHOTO_SET_ASSETS = ["source_photos", "training_dataset", "lora_model"]
CHAIN_ASSETS = ["source_photos", "training_dataset", "lora_model", "content_plan", "candidates", "rankings",
                "content_library", "clusters", "pillar_gaps", "scheduled_posts", "post_calendar"]

def _persona_job(name: str, assets: list[str], *, description: str, tags: dict | None = None,
                 config: dict | None = None):
    """A job over some of a persona's assets, partitioned by persona."""
    return dg.define_asset_job(name, selection=dg.AssetSelection.assets(*assets), partitions_def=persona_partitions,
                               tags=tags, config=config, description=description)


persona_chain_job = _persona_job(
    "persona_chain",
    CHAIN_ASSETS,
    tags={**TRAINING_TAGS, **GENERATION_TAGS},
    description="The whole chain for one persona: photos → dataset → LoRA → prompts → candidates → rankings → library → "
                "clusters → gaps → posts → calendar. Started by hand from the launchpad, and by `persona-pipeline demo`.",
)

photo_set_job = _persona_job(
    "photo_set",
    PHOTO_SET_ASSETS,
    tags=TRAINING_TAGS,
    description="A new or changed photo set: ingest the photos, build the captioned dataset, train the LoRA. "
                "Started by the persona_folders sensor when a persona folder's photo set changes.",
)

generation_job = _persona_job(
    "generation",
    ["content_plan", "candidates", "rankings"],
    tags=GENERATION_TAGS,
    description="Plan prompts from the pillar gaps, start runs for them and move every open run along its steps. "
                "Started by hand from the launchpad (the persona_planning and persona_generation schedules do the "
                "same in two steps).",
)

advance_runs_job = _persona_job(
    "advance_runs",
    ["candidates", "rankings"],
    config={"ops": {"candidates": {"config": {"start_runs": False}}}},
    tags=GENERATION_TAGS,
    description="Move open runs along (next steps after approvals, replacements after kills) without starting new ones. "
                "Started by the review_events sensor after a step approval, a kill or a restore in the review form.",
)

dataset_version_job = _persona_job(
    "dataset_version",
    ["training_dataset", "lora_model"],
    tags=TRAINING_TAGS,
    description="Build a new dataset version with the dataset candidates accepted in the review form, and train the "
                "LoRA on it (the new version is promoted only when it is better). Started by the dataset_reviews "
                "sensor once acceptances have come in and reviewing has paused.",
)

dataset_growth_job = _persona_job(
    "dataset_growth",
    ["dataset_enrichment", "dataset_flywheel"],
    tags=GENERATION_TAGS,  # the edits run an image model, as generation does: they count against its limit
    description="New dataset candidates for the review queue: edits of the accepted photos by persona.yaml's "
                "enrichment instructions, and the approved winners and published posts (docs/dataset.md). Started "
                "by hand from the launchpad; each image is scored and waits for a person in the review queue.",
)

lora_training_job = _persona_job(
    "lora_training",
    ["lora_model"],
    tags=TRAINING_TAGS,
    description="Train the persona's LoRA again from its current dataset (one training run per GPU). Started by hand "
                "from the launchpad (the photo_set job trains one when the photos change).",
)

rankings_job = _persona_job(
    "rankings_refresh",
    ["rankings"],
    description="Refit the Bradley–Terry rankings (and Elo) from the votes. Started by the review_events sensor once "
                "votes have come in and voting has paused.",
)

library_job = _persona_job(
    "library",
    ["content_library", "clusters", "pillar_gaps", "scheduled_posts", "post_calendar", "audience_insights"],
    description="Add new winners to the content library, cluster it, refresh the pillar gaps, plan posts from it and analyse the audience. "
                "Started by the persona_posting schedule (persona.yaml `schedules.posting`) and by the review_events "
                "sensor after a winner pick.",
)

post_calendar_job = _persona_job(
    "post_calendar_refresh",
    ["post_calendar"],
    description="Re-check and show the persona's posting calendar. Started by the review_events sensor after a post "
                "is approved, moved, rejected, retried or abandoned in the review form.",
)

content_planning_job = _persona_job(
    "content_planning",
    ["content_plan"],
    description="Plan the next prompts: pillars in proportion to their weights where the gaps are, themes in rotation. "
                "Started by the persona_planning schedule (persona.yaml `schedules.planning`).",
)

generation_runs_job = _persona_job(
    "generation_runs",
    ["candidates", "rankings"],
    tags=GENERATION_TAGS,
    description="Start a generation run for every planned prompt and move the open runs along. Started by the "
                "persona_generation schedule (persona.yaml `schedules.generation`).",
)

weekly_report_job = _persona_job(
    "weekly_reporting",  # not "weekly_report": a job may not share its name with the asset's op
    ["weekly_report"],
    description="The persona's week: posts, votes, winners, gaps, LoRA and failures. Started by the persona_report "
                "schedule (persona.yaml `schedules.report`), or by hand with a chosen window.",
)
