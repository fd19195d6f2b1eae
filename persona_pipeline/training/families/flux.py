"""FLUX.1 [dev] and [schnell]: a rectified-flow transformer conditioned on T5 token embeddings and
CLIP's pooled embedding, drawing 16-channel VAE latents packed into 2x2 patches.

What the FLUX LoRA loop (`training.flux_lora`) needs: loading the frozen model (optionally with a
quantised transformer on CUDA), the text conditioning exactly as FluxPipeline computes it, the
flow-matching noise level of a step (logit-normal or uniform, then the scheduler's own shift), the
transformer call on packed latents, and the saved key format.

Key format: `transformer.<diffusers module path>.lora_A.weight / .lora_B.weight / .alpha`. This is
the name ComfyUI maps for FLUX (comfy/lora.py `model_lora_keys_unet`: for a Flux model every
diffusers key from comfy/utils.py `flux_to_diffusers` is mapped as "transformer.<key>", and
`load_lora` reads `.lora_A/.lora_B` with an optional `.alpha`), and the one diffusers'
`FluxPipeline.load_lora_weights` reads.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from persona_pipeline.training.families import ModelFamily
from persona_pipeline.training.params import LoraTrainingParams, TrainingConfigError

# The attention projections, as diffusers' train_dreambooth_lora_flux.py adapts them by default: the
# image stream's to_q/k/v/out in the double blocks and the joint to_q/k/v in the single blocks.
LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
LORA_PREFIX = "transformer."
# Every module ComfyUI's flux_to_diffusers maps (double blocks, single blocks, the embedders and the
# output layers); a key naming anything else would be dropped by ComfyUI with a warning.
_MODULE = (r"(?:transformer_blocks\.\d+\.(?:attn\.(?:to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)"
           r"|ff(?:_context)?\.net\.(?:0\.proj|2)|norm1(?:_context)?\.linear)"
           r"|single_transformer_blocks\.\d+\.(?:attn\.to_[qkv]|proj_mlp|proj_out|norm\.linear)"
           r"|x_embedder|context_embedder|proj_out|norm_out\.linear"
           r"|time_text_embed\.(?:timestep|text|guidance)_embedder\.linear_[12])")
KNOWN_LORA_KEY = re.compile(
    r"^(?:transformer\." + _MODULE + r"\.(?:lora_A\.weight|lora_B\.weight|alpha)"
    r"|lora_unet_(?:double_blocks|single_blocks)_\d+_\w+\.(?:lora_down\.weight|lora_up\.weight|alpha)"  # kohya's FLUX keys
    r"|lora_unet_(?:img_in|txt_in|time_in_\w+|vector_in_\w+|guidance_in_\w+|final_layer_\w+)\.(?:lora_down\.weight|lora_up\.weight|alpha)"
    r"|(?:text_encoder\.|lora_te1_).+\.(?:lora_A\.weight|lora_B\.weight|lora_down\.weight|lora_up\.weight|alpha))$")
_FLUX_BLOCKS = re.compile(r"single_transformer_blocks\.|lora_unet_(?:double|single)_blocks_")
# [dev] trains at guidance 1 unless told otherwise (kohya's and ai-toolkit's default for FLUX LoRAs).
DEFAULT_TRAINING_GUIDANCE = 1.0


def unknown_lora_key(keys: list[str]) -> str | None:
    """The first key of a FLUX LoRA file that names no FLUX module (or no LoRA tensor); None if all fit."""
    return next((key for key in sorted(keys) if key != "__metadata__" and not KNOWN_LORA_KEY.match(key)), None)


FAMILY = ModelFamily(
    name="flux",
    title="FLUX.1 [dev]/[schnell]",
    # FLUX.1 Kontext is FLUX.1's transformer conditioned on a reference image too: same LoRAs.
    detects=lambda pipeline: pipeline in ("FluxPipeline", "FluxKontextPipeline"),
    text_encoders=("text_encoder", "text_encoder_2"),
    objective="flow_matching",
    lora_target_modules=tuple(LORA_TARGET_MODULES),
    lora_key_format="diffusers",
    lora_key_prefix=LORA_PREFIX,
    pipelines={"txt2img": "FluxPipeline", "img2img": "FluxImg2ImgPipeline", "pose": "FluxControlNetPipeline",
               "edit": "FluxKontextPipeline"},
    comfyui_templates=("flux_txt2img_lora", "flux_img2img_refine", "flux_kontext_edit"),
    # Memory options: gradient checkpointing on; bf16 on a GPU (mixed_precision auto); quantize_base int8/fp8
    # is the persona's choice (docs/training.md#flux1). Guidance: [dev] trains at 1 (DEFAULT_TRAINING_GUIDANCE).
    preset=LoraTrainingParams(rank=16, alpha=16.0, steps=1000, learning_rate=1e-4, batch_size=1, resolution=1024,
                              gradient_checkpointing=True, checkpoint_every=250, max_sequence_length=512,
                              aspect_buckets=True),
    validation_render=(1024, 28),
    trainer="persona_pipeline.training.flux_lora:train_flux_lora",
    lora_matches=lambda keys: any(_FLUX_BLOCKS.search(key) for key in keys),
    edit_model="kontext",
)


@dataclass
class FrozenFlux:
    variant: str  # "dev" (a guidance input) or "schnell"
    text_pipeline: object  # a FluxPipeline holding only the tokenizers and text encoders
    vae: object
    transformer: object
    scheduler_config: dict

    @property
    def family(self) -> str:
        return FAMILY.name


def training_guidance(params: LoraTrainingParams, variant: str) -> float | None:
    """The guidance the transformer gets each step: None for [schnell] (which refuses one, naming the
    setting), else training.guidance or 1. Its range is checked with the other settings (params.py)."""
    if variant == "schnell":
        if params.guidance is not None:
            raise TrainingConfigError(f"training.guidance={params.guidance}: FLUX.1 [schnell] has no guidance input "
                                      "(it is guidance-distilled away); leave training.guidance unset")
        return None
    return DEFAULT_TRAINING_GUIDANCE if params.guidance is None else params.guidance


def load_frozen_flux(base_model: str, rank: int, alpha: float, *, weight_dtype=None, quantize: str = "none") -> FrozenFlux:
    """Tokenizers, text encoders, VAE and transformer, all frozen, plus a trainable fp32 LoRA on the
    transformer's attention projections. `quantize` int8 (bitsandbytes) or fp8 (torchao) loads the
    frozen transformer quantised; params.validate has already refused it off CUDA."""
    import torch
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig

    dtype = weight_dtype or torch.float32
    transformer = FluxTransformer2DModel.from_pretrained(base_model, subfolder="transformer", dtype=dtype,
                                                         quantization_config=_quantization_config(quantize, dtype))
    text_pipeline = FluxPipeline.from_pretrained(base_model, transformer=None, vae=None, dtype=dtype)
    vae = AutoencoderKL.from_pretrained(base_model, subfolder="vae")  # fp32: encoded once, into the cache
    for model in (vae, transformer, text_pipeline.text_encoder, text_pipeline.text_encoder_2):
        model.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                       target_modules=LORA_TARGET_MODULES))
    for parameter in transformer.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    variant = "dev" if transformer.config.guidance_embeds else "schnell"
    return FrozenFlux(variant, text_pipeline, vae, transformer, dict(text_pipeline.scheduler.config))


def _quantization_config(quantize: str, dtype):
    if quantize == "none":
        return None
    import importlib.util

    library = {"int8": "bitsandbytes", "fp8": "torchao"}[quantize]
    if importlib.util.find_spec(library) is None:
        raise TrainingConfigError(f"training.quantize_base={quantize!r} needs {library} (pip install {library}); "
                                  "install it or set quantize_base to 'none'")
    if quantize == "int8":
        from diffusers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True)
    from diffusers import TorchAoConfig

    return TorchAoConfig("float8wo_e4m3")


def variant_of(base_model: str) -> str:
    """`dev` or `schnell`, from the transformer's config (the guidance embedding), without loading weights."""
    from diffusers import FluxTransformer2DModel

    return "dev" if FluxTransformer2DModel.load_config(base_model, subfolder="transformer").get("guidance_embeds") else "schnell"


def text_conditioning(text_pipeline, captions: list[str], device, max_sequence_length: int) -> dict:
    """`prompt_embeds` (T5's last hidden state) and `pooled` (CLIP's pooled output), as FluxPipeline
    computes them for generation, so training sees what inference will."""
    import torch

    with torch.no_grad():
        prompt_embeds, pooled, _ = text_pipeline.encode_prompt(captions, device=device,
                                                               max_sequence_length=max_sequence_length)
    return {"prompt_embeds": prompt_embeds.float(), "pooled": pooled.float()}


def tokenizer_identity(text_pipeline) -> str:
    """What a cached T5 embedding depends on besides the text: the T5 tokenizer's name and vocabulary."""
    import hashlib
    import json

    tokenizer = text_pipeline.tokenizer_2
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return f"{name}#{hashlib.sha256(vocab.encode()).hexdigest()[:16]}"


def sample_sigmas(batch: int, seq_len: int, scheduler_config: dict, sampling: str, device):
    """Noise levels in (0, 1) for a batch: u from a logit-normal (SD3 paper, diffusers' FLUX example's
    `logit_normal`) or uniform, then shifted as FluxPipeline shifts its sampling schedule: by the
    resolution-dependent mu when the scheduler shifts dynamically ([dev]), else by its fixed shift."""
    import torch

    u = torch.sigmoid(torch.randn(batch)) if sampling == "logit_normal" else torch.rand(batch)
    if scheduler_config.get("use_dynamic_shifting"):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        mu = calculate_shift(seq_len, scheduler_config.get("base_image_seq_len", 256), scheduler_config.get("max_image_seq_len", 4096),
                             scheduler_config.get("base_shift", 0.5), scheduler_config.get("max_shift", 1.15))
        sigmas = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    else:
        shift = float(scheduler_config.get("shift", 1.0))
        sigmas = shift * u / (1 + (shift - 1) * u)
    return sigmas.clamp(1e-4, 1.0).to(device)


def predict_velocity(transformer, packed_noisy, sigmas, conditioning: dict, index, image_ids, guidance):
    """One transformer call on packed latents; FLUX takes the noise level in [0, 1] as its timestep."""
    import torch

    prompt_embeds = conditioning["prompt_embeds"][index].to(packed_noisy.dtype)
    text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=packed_noisy.device, dtype=packed_noisy.dtype)
    guidance_input = None if guidance is None else torch.full((packed_noisy.shape[0],), guidance, device=packed_noisy.device)
    return transformer(hidden_states=packed_noisy, timestep=sigmas.to(packed_noisy.dtype), guidance=guidance_input,
                       pooled_projections=conditioning["pooled"][index].to(packed_noisy.dtype),
                       encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]


def lora_state_dict(transformer, alpha: float) -> dict:
    """The transformer LoRA as `transformer.<module>.lora_A.weight / .lora_B.weight / .alpha`, fp32 (module docstring)."""
    import torch
    from peft.utils import get_peft_model_state_dict

    out = {}
    for key, tensor in get_peft_model_state_dict(transformer).items():
        out[LORA_PREFIX + key] = tensor.detach().to("cpu", torch.float32).contiguous()
        module = key.rsplit(".lora_", 1)[0]
        out[f"{LORA_PREFIX}{module}.alpha"] = torch.tensor(float(alpha))
    return out
