"""A tiny Wan 2.1 image-to-video pipeline with random weights, built locally (no download): a
2-block WanTransformer3DModel taking the image-conditioning channels (16 noise + 4 mask + 16 image
latent) and CLIP-vision image embeddings, a 16-channel AutoencoderKLWan with Wan's 4x temporal and
8x spatial compression, a 2-layer UMT5 text encoder over the local T5 tokenizer of the tiny FLUX,
and a 2-layer CLIP vision encoder with its image processor. The layout (model_index.json, module
classes, latent channels) is the released Wan2.1-I2V-14B-480P-Diffusers'; only the sizes are not."""

from __future__ import annotations

from pathlib import Path

TINY_WAN_I2V_NAME = "tiny-wan-i2v"


def build_tiny_wan_i2v(folder: Path, seed: int = 0) -> Path:
    """Write a working WanImageToVideoPipeline with random weights to `folder` (idempotent)."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    from persona_pipeline.training.tiny_models import _tiny_t5_tokenizer

    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer = _tiny_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                               num_heads=4, feed_forward_proj="gated-gelu", pad_token_id=0,
                                               eos_token_id=1, decoder_start_token_id=0))
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=36, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32, image_dim=8)
    # The pipeline takes the encoder's penultimate hidden states, so image_dim is its hidden size.
    image_encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                                     image_size=32, intermediate_size=16, patch_size=8))
    image_processor = CLIPImageProcessor(crop_size=32, size=32)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # Wan 2.1 480p's flow shift
    pipe = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                                   image_processor=image_processor, image_encoder=image_encoder, transformer=transformer)
    pipe.save_pretrained(tmp)
    tmp.rename(folder)
    return folder
