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


def save_checkpoint(unet, alpha: float, path: Path, metadata: dict[str, str], text_encoders=(), embeddings=None) -> str:
    """Write a .safetensors checkpoint atomically (with `embeddings`, a trained trigger embedding's
    `trigger_embedding_tensors`); return its sha256."""
    write_safetensors(path, {**kohya_state_dict(unet, alpha, text_encoders), **(embeddings or {})}, metadata)
    return sha256_file(path)


def caption_conditioning(model: FrozenModel, encoders, caption: str, device, *, original_size: tuple[int, int],
                         crop: tuple[int, int], resolution: int, text: dict | None = None) -> dict:
    """The UNet's conditioning for one training image, by the names the latents cache stores it
    under. SD1.5: `hidden`, the text encoder's last hidden state. SDXL: `hidden`, the penultimate
    hidden states of both encoders concatenated, `pooled`, the second encoder's pooled projection
    (as the SDXL pipeline does), and `time_ids`, the image's original size, crop and target size.
    `text`: this caption's `text_conditioning`, when the caller encoded it already (in a batch)."""
    import torch

    conditioning = dict(text) if text is not None else text_conditioning(model, encoders, [caption], device)
    if model.family == "sdxl":
        conditioning["time_ids"] = torch.tensor([[*original_size, *crop, resolution, resolution]], dtype=torch.float32)
    return conditioning


def batched_text_conditioning(model: FrozenModel, encoders, captions: list[str], device, batch: int = 16) -> list[dict]:
    """`text_conditioning` of each caption, the captions encoded `batch` at a time: one text-encoder
    call per caption costs about 40 % more than batches of 4 on the bench model, and a bounded batch
    keeps a large dataset's attention activations small."""
    import torch

    out: list[dict] = []
    with torch.no_grad():
        for start in range(0, len(captions), batch):
            encoded = text_conditioning(model, encoders, captions[start:start + batch], device)
            out += [{name: tensor[i:i + 1] for name, tensor in encoded.items()} for i in range(len(captions[start:start + batch]))]
    return out


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


# Pivotal tuning (training.trigger_embedding_lr): the trigger word becomes one new token of each tokenizer
# with an input embedding of its own, trained with the LoRA (diffusers' advanced DreamBooth LoRA script,
# --train_text_encoder_ti). The LoRA file carries it in A1111's bundled-embedding keys, `bundle_emb.<trigger>.`
# then `string_to_param.*` (one text encoder) or `clip_l` / `clip_g` (SDXL's two).
EMBEDDING_PREFIX = "bundle_emb."


def embedding_key_names(count: int) -> list[str]:
    return ["string_to_param.*"] if count == 1 else ["clip_l", "clip_g"]


def add_trigger_token(tokenizers, encoders, trigger: str) -> list[int]:
    """Add `trigger` as one token to each tokenizer, its embedding row starting as the mean of the rows of
    the pieces the tokenizer split it into (so the prompt first means what it did); the new token ids."""
    import torch

    from persona_pipeline.training.params import TrainingConfigError

    ids = []
    for tokenizer, encoder in zip(tokenizers, encoders):
        pieces = tokenizer(trigger, add_special_tokens=False).input_ids
        if tokenizer.add_tokens([trigger]) != 1:
            raise TrainingConfigError(f"training.trigger_embedding_lr: the trigger word {trigger!r} is already a token of the "
                                      "base model's tokenizer; pivotal tuning needs a new word (or set it to 0)")
        token_id = tokenizer.convert_tokens_to_ids(trigger)
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        weight = encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[token_id] = weight[pieces].mean(dim=0)
        ids.append(token_id)
    return ids


def trigger_embedding_tensors(trigger: str, rows: list) -> dict:
    """The file keys of a trained trigger embedding (one row per text encoder), each shaped (1, dim)."""
    import torch

    return {f"{EMBEDDING_PREFIX}{trigger}.{name}": row.detach().to("cpu", torch.float32).reshape(1, -1).contiguous()
            for name, row in zip(embedding_key_names(len(rows)), rows)}


def split_trigger_embeddings(state_dict: dict) -> tuple[dict, dict[str, list]]:
    """(the LoRA weights, {trigger: [embedding per text encoder, in encoder order]}) of a LoRA file's tensors."""
    lora, embeddings = {}, {}
    for key, tensor in state_dict.items():
        if not key.startswith(EMBEDDING_PREFIX):
            lora[key] = tensor
            continue
        trigger, _, name = key[len(EMBEDDING_PREFIX):].partition(".")
        embeddings.setdefault(trigger, {})[name] = tensor
    ordered = {}
    for trigger, parts in embeddings.items():
        names = embedding_key_names(len(parts))
        if set(parts) != set(names):
            raise ValueError(f"bundled embedding {trigger!r} has keys {sorted(parts)}; expected {names}")
        ordered[trigger] = [parts[name] for name in names]
    return lora, ordered


def load_lora_file(pipe, path, adapter_name: str) -> dict[str, list]:
    """Load a LoRA file onto a diffusers pipeline as `adapter_name`, the way generation does; a trigger
    embedding it bundles (pivotal tuning) is split off, since diffusers' LoRA loader refuses keys it does not
    know, and returned ({trigger: [rows]}) for `use_trigger_embeddings`."""
    from safetensors.torch import load_file

    from persona_pipeline.training.lora_files import read_safetensors_header

    if not any(key.startswith(EMBEDDING_PREFIX) for key in read_safetensors_header(Path(path))):
        pipe.load_lora_weights(str(path), adapter_name=adapter_name)
        return {}
    lora, embeddings = split_trigger_embeddings(load_file(str(path)))
    pipe.load_lora_weights(lora, adapter_name=adapter_name)
    return embeddings


def use_trigger_embeddings(pipe, embeddings: dict[str, list]) -> None:
    """Make exactly `embeddings` ({trigger: [row per text encoder]}) the pipeline's trigger tokens: each loaded
    as a textual-inversion token into every tokenizer and text encoder, and any loaded before and not wanted
    now unloaded, so a trigger word reads as the LoRA that is active (or as plain text when none is)."""
    import torch

    loaded = getattr(pipe, "_trigger_embeddings", {})
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    for trigger, rows in loaded.items():
        if trigger not in embeddings or not all(torch.equal(a, b) for a, b in zip(rows, embeddings[trigger])):
            for tokenizer, encoder in pairs:
                pipe.unload_textual_inversion(trigger, tokenizer=tokenizer, text_encoder=encoder)
    kept = {t: r for t, r in loaded.items() if t in embeddings and all(torch.equal(a, b) for a, b in zip(r, embeddings[t]))}
    for trigger, rows in embeddings.items():
        if trigger in kept:
            continue
        for (tokenizer, encoder), row in zip(pairs, rows):
            pipe.load_textual_inversion(row.reshape(-1).to(encoder.dtype), token=trigger, tokenizer=tokenizer,
                                        text_encoder=encoder)
        kept[trigger] = rows
    pipe._trigger_embeddings = kept
