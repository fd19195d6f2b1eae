"""The Stable Diffusion families (SD 1.x/2.x and SDXL: a UNet conditioned on CLIP text encoders), as
the LoRA training loop in `training.lora` needs to know them: how the frozen model is loaded and
where the LoRA adapter goes (the UNet's attention projections), how a caption becomes the UNet's
conditioning, how the UNet is called, and the key format the LoRA is written in (kohya's, which
ComfyUI and diffusers both read). Their registry entries are `families.sd15` and `families.sdxl`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from persona_pipeline.fileio import sha256_file, write_safetensors
from persona_pipeline.training.families import model_family

# The UNet attention projections, as diffusers' train_text_to_image_lora example adapts them.
LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
# A CLIP text encoder's attention projections (diffusers' DreamBooth LoRA example trains the same).
TEXT_ENCODER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class FrozenModel:
    family: str
    tokenizers: list
    text_encoders: list
    vae: object
    unet: object
    noise_scheduler: object


def load_frozen_model_with_lora(base_model: str, rank: int, alpha: float, *, weight_dtype=None,
                                text_encoder_lora: bool = False) -> FrozenModel:
    """Tokenizer(s), text encoder(s), VAE and UNet, all frozen, plus a trainable LoRA adapter on the
    UNet's attention projections, and with `text_encoder_lora` on each text encoder's too (kept in
    fp32 even when the frozen weights are half precision)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    family = model_family(base_model)
    tokenizers = [CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer")]
    text_encoders = [CLIPTextModel.from_pretrained(base_model, subfolder="text_encoder")]
    if family == "sdxl":
        tokenizers.append(CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer_2"))
        text_encoders.append(CLIPTextModelWithProjection.from_pretrained(base_model, subfolder="text_encoder_2"))
    vae = AutoencoderKL.from_pretrained(base_model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(base_model, subfolder="scheduler")
    for model in (vae, unet, *text_encoders):
        model.requires_grad_(False)
    if weight_dtype is not None and weight_dtype != torch.float32:
        unet.to(dtype=weight_dtype)
        for encoder in text_encoders:
            encoder.to(dtype=weight_dtype)
        # SD1.5's VAE overflows in fp16; keep it in fp32 (as the SDXL example does with its fp16-fix VAE).
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES))
    adapted = [unet]
    if text_encoder_lora:
        from peft import inject_adapter_in_model  # transformers' own add_adapter wants a newer peft

        for encoder in text_encoders:
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                               target_modules=TEXT_ENCODER_TARGET_MODULES), encoder)
        adapted += text_encoders
    for parameter in (p for model in adapted for p in model.parameters()):
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return FrozenModel(family, tokenizers, text_encoders, vae, unet, noise_scheduler)


def text_encoder_prefixes(count: int) -> list[str]:
    """kohya's prefix per text encoder: `lora_te_` for SD1.x/2.x's one, `lora_te1_`/`lora_te2_` for SDXL's two."""
    return ["lora_te_"] if count == 1 else [f"lora_te{n}_" for n in range(1, count + 1)]


def kohya_state_dict(unet, alpha: float, text_encoders=()) -> dict:
    """The LoRA weights in kohya's format: `lora_unet_<diffusers module path, dots as underscores>`
    (and `lora_te_<...>` / `lora_te1_`, `lora_te2_` for trained text encoders) with
    `.lora_down.weight / .lora_up.weight / .alpha`. ComfyUI maps exactly these names onto its UNet
    and CLIP (comfy/lora.py), and diffusers' load_lora_weights converts them on load."""
    import torch
    from peft.utils import get_peft_model_state_dict

    out = {}
    parts = [("lora_unet_", unet), *zip(text_encoder_prefixes(len(text_encoders)), text_encoders)]
    for prefix, model in parts:
        for key, tensor in get_peft_model_state_dict(model).items():
            module, _, kind = key.rpartition(".lora_")  # "...to_q", "A.weight"
            name = prefix + module.replace(".", "_")
            out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = tensor.detach().to("cpu", torch.float32).contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def save_checkpoint(unet, alpha: float, path: Path, metadata: dict[str, str], text_encoders=()) -> str:
    """Write a .safetensors checkpoint atomically; return its sha256."""
    write_safetensors(path, kohya_state_dict(unet, alpha, text_encoders), metadata)
    return sha256_file(path)


def caption_conditioning(model: FrozenModel, encoders, caption: str, device, *, original_size: tuple[int, int],
                         crop: tuple[int, int], resolution: int) -> dict:
    """The UNet's conditioning for one training image, by the names the latents cache stores it
    under. SD1.5: `hidden`, the text encoder's last hidden state. SDXL: `hidden`, the penultimate
    hidden states of both encoders concatenated, `pooled`, the second encoder's pooled projection
    (as the SDXL pipeline does), and `time_ids`, the image's original size, crop and target size."""
    import torch

    conditioning = text_conditioning(model, encoders, [caption], device)
    if model.family == "sdxl":
        conditioning["time_ids"] = torch.tensor([[*original_size, *crop, resolution, resolution]], dtype=torch.float32)
    return conditioning


def text_conditioning(model: FrozenModel, encoders, captions: list[str], device) -> dict:
    """The text part of `caption_conditioning` for a batch of captions: `hidden` (and SDXL's
    `pooled`). Cached once when the text encoders are frozen; run every step when they train."""
    import torch

    if model.family != "sdxl":
        ids = model.tokenizers[0](captions, padding="max_length", max_length=model.tokenizers[0].model_max_length,
                                  truncation=True, return_tensors="pt").input_ids.to(device)
        return {"hidden": encoders[0](ids)[0].float()}
    states, pooled = [], None
    for tokenizer, encoder in zip(model.tokenizers, encoders):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        output = encoder(ids, output_hidden_states=True)
        pooled = output[0]  # the last encoder's text_embeds
        states.append(output.hidden_states[-2])
    return {"hidden": torch.cat(states, dim=-1).float(), "pooled": pooled.float()}


def predict_noise(unet, noisy, timesteps, cache: dict, index, family: str):
    """One UNet call with the cached conditioning (SDXL adds the pooled text embedding and the
    size/crop time ids). A function of its own so a test can make it misbehave."""
    hidden = cache["hidden"][index].to(noisy.dtype)
    if family != "sdxl":
        return unet(noisy, timesteps, hidden, return_dict=False)[0]
    time_ids = cache["time_ids"][index].clone()
    added = {"text_embeds": cache["pooled"][index].to(noisy.dtype), "time_ids": time_ids.to(noisy.dtype)}
    return unet(noisy, timesteps, hidden, added_cond_kwargs=added, return_dict=False)[0]
