"""SDXL: two CLIP text encoders (the second's pooled projection too) and size/crop time ids, a UNet
trained on the noise, LoRAs in kohya's keys (`lora_te1_`/`lora_te2_` for the text encoders)."""

from persona_pipeline.training.families import ModelFamily
from persona_pipeline.training.families.stable_diffusion import LORA_TARGET_MODULES
from persona_pipeline.training.params import LoraTrainingParams

FAMILY = ModelFamily(
    name="sdxl",
    title="SDXL",
    detects=lambda pipeline: "XL" in pipeline,
    text_encoders=("text_encoder", "text_encoder_2"),
    objective="noise",
    lora_target_modules=tuple(LORA_TARGET_MODULES),
    lora_key_format="kohya",
    lora_key_prefix="lora_unet_",
    pipelines={"txt2img": "StableDiffusionXLPipeline", "img2img": "StableDiffusionXLImg2ImgPipeline",
               "pose": "StableDiffusionXLControlNetPipeline"},
    comfyui_templates=("txt2img_lora", "img2img_refine", "txt2img_pose"),
    preset=LoraTrainingParams(rank=16, alpha=16.0, steps=1500, learning_rate=1e-4, batch_size=1, resolution=1024,
                              min_snr_gamma=5.0, gradient_checkpointing=True, checkpoint_every=250),
    validation_render=(1024, 25),
    trainer="persona_pipeline.training.lora:train_unet_lora",
)
