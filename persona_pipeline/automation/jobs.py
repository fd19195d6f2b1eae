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

persona_chain_job = dg.define_asset_job(
    "persona_chain",
    selection=dg.AssetSelection.assets(*CHAIN_ASSETS),
    partitions_def=persona_partitions,
    tags={**TRAINING_TAGS, **GENERATION_TAGS},
    description="The whole chain for one persona: photos → dataset → LoRA → prompts → candidates → rankings → library → clusters → gaps → posts.",
)

photo_set_job = dg.define_asset_job(
    "photo_set",
    selection=dg.AssetSelection.assets(*PHOTO_SET_ASSETS),
    partitions_def=persona_partitions,
    tags=TRAINING_TAGS,
    description="A new or changed photo set: ingest the photos, build the captioned dataset, train the LoRA. "
                "The persona sensor starts it when a persona folder's photo set changes.",
)

generation_job = dg.define_asset_job(
    "generation",
    selection=dg.AssetSelection.assets("content_plan", "candidates", "rankings"),
    partitions_def=persona_partitions,
    tags=GENERATION_TAGS,
    description="Plan prompts from the pillar gaps, start runs for them and move every open run along its steps.",
)

advance_runs_job = dg.define_asset_job(
    "advance_runs",
    selection=dg.AssetSelection.assets("candidates", "rankings"),
    partitions_def=persona_partitions,
    config={"ops": {"candidates": {"config": {"start_runs": False}}}},
    tags=GENERATION_TAGS,
    description="Move open runs along (next steps after approvals, replacements after kills) without starting new ones.",
)

lora_training_job = dg.define_asset_job(
    "lora_training",
    selection=dg.AssetSelection.assets("lora_model"),
    partitions_def=persona_partitions,
    tags=TRAINING_TAGS,
)

rankings_job = dg.define_asset_job(
    "rankings_refresh",
    selection=dg.AssetSelection.assets("rankings"),
    partitions_def=persona_partitions,
    description="Refit the Bradley–Terry rankings (and Elo) from the votes; the review sensor starts it after voting.",
)

library_job = dg.define_asset_job(
    "library",
    selection=dg.AssetSelection.assets("content_library", "clusters", "pillar_gaps", "scheduled_posts", "post_calendar"),
    partitions_def=persona_partitions,
    description="Add new winners to the content library, cluster it, refresh the pillar gaps and plan posts from it.",
)

post_calendar_job = dg.define_asset_job(
    "post_calendar_refresh",
    selection=dg.AssetSelection.assets("post_calendar"),
    partitions_def=persona_partitions,
    description="Re-check and show the persona's posting calendar after a post is approved, moved or rejected.",
)

content_planning_job = dg.define_asset_job(
    "content_planning",
    selection=dg.AssetSelection.assets("content_plan"),
    partitions_def=persona_partitions,
    description="Plan the next prompts: pillars in proportion to their weights where the gaps are, themes in rotation.",
)

generation_runs_job = dg.define_asset_job(
    "generation_runs",
    selection=dg.AssetSelection.assets("candidates", "rankings"),
    partitions_def=persona_partitions,
    tags=GENERATION_TAGS,
    description="Start a generation run for every planned prompt and move the open runs along.",
)

weekly_report_job = dg.define_asset_job(
    "weekly_reporting",  # not "weekly_report": a job may not share its name with the asset's op
    selection=dg.AssetSelection.assets("weekly_report"),
    partitions_def=persona_partitions,
    description="The persona's week: posts, votes, winners, gaps, LoRA and failures.",
)
