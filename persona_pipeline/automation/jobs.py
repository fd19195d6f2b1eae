"""Asset jobs. Runs that train carry GPU_TAG, which dagster.yaml limits to one run at a time."""

import dagster as dg

from persona_pipeline.partitions import persona_partitions

GPU_TAG = "persona-pipeline/gpu"
CHAIN_ASSETS = ["source_photos", "training_dataset", "lora_model", "content_plan", "candidates", "rankings",
                "content_library", "clusters", "pillar_gaps", "scheduled_posts", "post_calendar"]

persona_chain_job = dg.define_asset_job(
    "persona_chain",
    selection=dg.AssetSelection.assets(*CHAIN_ASSETS),
    partitions_def=persona_partitions,
    tags={GPU_TAG: "training"},
    description="The whole chain for one persona: photos → dataset → LoRA → prompts → candidates → rankings → library → clusters → gaps → posts.",
)

generation_job = dg.define_asset_job(
    "generation",
    selection=dg.AssetSelection.assets("content_plan", "candidates", "rankings"),
    partitions_def=persona_partitions,
    description="Plan prompts from the pillar gaps, start runs for them and move every open run along its steps.",
)

advance_runs_job = dg.define_asset_job(
    "advance_runs",
    selection=dg.AssetSelection.assets("candidates", "rankings"),
    partitions_def=persona_partitions,
    config={"ops": {"candidates": {"config": {"start_runs": False}}}},
    description="Move open runs along (next steps after approvals, replacements after kills) without starting new ones.",
)

lora_training_job = dg.define_asset_job(
    "lora_training",
    selection=dg.AssetSelection.assets("lora_model"),
    partitions_def=persona_partitions,
    tags={GPU_TAG: "training"},
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
    description="Start a generation run for every planned prompt and move the open runs along.",
)

weekly_report_job = dg.define_asset_job(
    "weekly_reporting",  # not "weekly_report": a job may not share its name with the asset's op
    selection=dg.AssetSelection.assets("weekly_report"),
    partitions_def=persona_partitions,
    description="The persona's week: posts, votes, winners, gaps, LoRA and failures.",
)
