"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a UNet trained on the noise (or, for SD 2.x
768 models, v-prediction: the scheduler config says which), LoRAs in kohya's keys."""

from persona_pipeline.training.families import ModelFamily
from persona_pipeline.training.families.stable_diffusion import LORA_TARGET_MODULES
from persona_pipeline.training.params import LoraTrainingParams

FAMILY = ModelFamily(
    name="sd15",
    title="Stable Diffusion 1.x/2.x",
    detects=lambda pipeline: pipeline.startswith("StableDiffusion") and "XL" not in pipeline,
    text_encoders=("text_encoder",),
    objective="noise",
    lora_target_modules=tuple(LORA_TARGET_MODULES),
    lora_key_format="kohya",
    lora_key_prefix="lora_unet_",
    pipelines={"txt2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline",
               "pose": "StableDiffusionControlNetPipeline"},
    comfyui_templates=("txt2img_lora", "img2img_refine", "txt2img_pose"),
    preset=LoraTrainingParams(rank=16, alpha=16.0, steps=1500, learning_rate=1e-4, batch_size=1, resolution=512,
                              min_snr_gamma=5.0, checkpoint_every=250),
    validation_render=(512, 25),
    trainer="persona_pipeline.training.lora:train_unet_lora",
)
