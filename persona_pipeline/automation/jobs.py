"""Asset jobs. Runs that train carry GPU_TAG, which dagster.yaml limits to one run at a time."""

import dagster as dg

from persona_pipeline.partitions import persona_partitions

GPU_TAG = "persona-pipeline/gpu"
CHAIN_ASSETS = ["source_photos", "training_dataset", "lora_model", "candidates", "rankings", "clusters", "scheduled_posts"]

persona_chain_job = dg.define_asset_job(
    "persona_chain",
    selection=dg.AssetSelection.assets(*CHAIN_ASSETS),
    partitions_def=persona_partitions,
    tags={GPU_TAG: "training"},
    description="The whole chain for one persona: photos → dataset → LoRA → candidates → rankings → clusters → posts.",
)

lora_training_job = dg.define_asset_job(
    "lora_training",
    selection=dg.AssetSelection.assets("lora_model"),
    partitions_def=persona_partitions,
    tags={GPU_TAG: "training"},
)
