"""Tiny randomly initialised models, built locally so that the quickstart and the tests need no
download: a Stable Diffusion pipeline (UNet, VAE, CLIP text encoder, tokenizer) and an open_clip
model. Shapes follow diffusers' own test fixtures. Weights are seeded, so every build is the same.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_SD_NAME = "tiny-sd"
TINY_RESOLUTION = 64


def _byte_vocab() -> dict[str, int]:
    """CLIP's byte-level alphabet (each byte as a token, and as a word-final token), no merges."""
    # GPT-2/CLIP byte-to-unicode table: printable bytes map to themselves, the rest above 255.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    chars = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, sample_size=TINY_RESOLUTION,
    )


def _tiny_text_config(vocab: dict[str, int], **extra):
    """A 32-wide, 5-layer CLIP text encoder config over the byte vocabulary."""
    from transformers import CLIPTextConfig

    eos = vocab["<|endoftext|>"]
    return CLIPTextConfig(
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos, hidden_size=32,
        intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5,
        vocab_size=len(vocab), max_position_embeddings=77, **extra,
    )


def build_tiny_sd(folder: Path, seed: int = 0) -> Path:
    """Write a working StableDiffusionPipeline with random weights to `folder` (idempotent)."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    vocab = _byte_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=TINY_RESOLUTION // 2,
        in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
    )
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(_tiny_text_config(vocab))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(tmp)
    tmp.rename(folder)  # a crash mid-write never leaves a half model that looks complete
    return folder


TINY_SDXL_NAME = "tiny-sdxl"


def build_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """Write a working StableDiffusionXLPipeline with random weights to `folder` (idempotent):
    two text encoders (the second with a projection for the pooled embedding) and a UNet with
    SDXL's text-time conditioning, as in diffusers' SDXL test fixtures."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    vocab = _byte_vocab()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=TINY_RESOLUTION // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + the 32-wide pooled text embedding
        cross_attention_dim=64,  # the two encoders' 32-wide hidden states, concatenated
    )
    vae = _tiny_vae()
    text_config = _tiny_text_config(vocab, hidden_act="gelu", projection_dim=32)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(text_config), tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
        text_encoder_2=CLIPTextModelWithProjection(text_config),
        tokenizer_2=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77), unet=unet, scheduler=scheduler,
    )
    pipe.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


TINY_CLIP_NAME = "persona-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def register_tiny_clip() -> str:
    """Make `persona-tiny-clip` known to open_clip (a shrunken ViT-B-32 layout, random weights)."""
    from open_clip import factory

    if TINY_CLIP_NAME not in factory._MODEL_CONFIGS:
        factory._MODEL_CONFIGS[TINY_CLIP_NAME] = TINY_CLIP_CONFIG
    return TINY_CLIP_NAME


TINY_CONTROLNET_NAME = "tiny-controlnet"


def build_tiny_controlnet(folder: Path, tiny_sd: Path, seed: int = 0) -> Path:
    """Write a ControlNet for the tiny SD pipeline (or the world model) at `tiny_sd` to `folder`
    (idempotent): the encoder copied from its UNet (`ControlNetModel.from_unet`), a conditioning
    embedding that downsamples as its VAE does, and seeded random weights where a fresh ControlNet has
    zeros (the zero convolutions), so that the control image really changes what is drawn."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(tiny_sd), subfolder="unet")
    # One stride-2 stage per halving of the VAE: control images at pixel size map onto its latents
    # (one for the tiny VAE's half-size latents, two for the world model's quarter-size ones).
    vae_config = json.loads((Path(tiny_sd) / "vae" / "config.json").read_text(encoding="utf-8"))
    stages = len(vae_config["block_out_channels"]) - 1
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 64, 128)[:stages + 1])
    generator = torch.Generator().manual_seed(seed)
    zero_initialised = [controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks,
                        controlnet.controlnet_mid_block]
    with torch.no_grad():
        for module in zero_initialised:
            for parameter in module.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    tmp = folder.with_name(folder.name + ".partial")
    controlnet.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


TINY_FLUX_NAME = "tiny-flux"
TINY_FLUX_SCHNELL_NAME = "tiny-flux-schnell"
# FLUX.1's VAE latent scale and shift (black-forest-labs/FLUX.1-dev vae/config.json).
FLUX_VAE_SCALING_FACTOR, FLUX_VAE_SHIFT_FACTOR = 0.3611, 0.1159


def _tiny_t5_tokenizer():
    """A T5TokenizerFast over a locally built unigram vocabulary: T5's special tokens (pad 0, eos 1,
    unk 2), the word-start marker and the printable ASCII characters, each alone and word-initial."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    tokenizer = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=512)


def build_tiny_flux(folder: Path, seed: int = 0, *, guidance: bool = True, kontext: bool = False) -> Path:
    """Write a working FluxPipeline with random weights to `folder` (idempotent): a 1+1-block
    FluxTransformer2DModel, a 32-wide CLIP text encoder (its pooled output) and T5 encoder, each with
    a locally built tokenizer, and a 16-channel VAE with FLUX's scale and shift. `guidance` True is
    FLUX.1 [dev]'s layout (a guidance embedding, dynamic shift); False is [schnell]'s. `kontext`
    writes the same weights as a FluxKontextPipeline (FLUX.1 Kontext: the reference image's tokens
    join the sequence, so the transformer, and a LoRA trained on the tiny FLUX, are the same)."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline,
                           FluxTransformer2DModel)
    from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    vocab = _byte_vocab()
    t5_tokenizer = _tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=16,
        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3, norm_num_groups=8,
        sample_size=TINY_RESOLUTION, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=FLUX_VAE_SCALING_FACTOR, shift_factor=FLUX_VAE_SHIFT_FACTOR,
    )
    text_encoder = CLIPTextModel(_tiny_text_config(vocab, hidden_act="gelu", projection_dim=32))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    if guidance:  # [dev]: the shift grows with the image's token count
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                    base_image_seq_len=256, max_image_seq_len=4096)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = (FluxKontextPipeline if kontext else FluxPipeline)(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                        tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
                        text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer, transformer=transformer)
    pipe.save_pretrained(tmp)
    tmp.rename(folder)
    return folder
