"""A tiny Qwen-Image-Edit pipeline with random weights, built locally (no download): a 2-block
QwenImageTransformer2DModel, a 16-channel AutoencoderKLQwenImage with three downsamplings (the real
one's 8x), and a 2-layer Qwen2.5-VL text encoder with its processor (a byte-level BPE tokenizer with
Qwen's chat and vision tokens, and an image processor held to a few vision patches). The tiny
FLUX.1 Kontext is `tiny_models.build_tiny_flux(kontext=True)`."""

from __future__ import annotations

from pathlib import Path

from persona_pipeline.training.tiny_models import _byte_vocab

TINY_QWEN_EDIT_NAME = "tiny-qwen-edit"
# Qwen's special tokens, after the byte alphabet: the chat markers the prompt template uses and the
# vision markers the processor expands (<|image_pad|> becomes one token per merged image patch).
_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>")


def _tiny_qwen_processor():
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    vocab = {token: index for token, index in _byte_vocab().items() if not token.startswith("<|")}
    vocab = {token: index for index, token in enumerate(vocab)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", eos_token="<|im_end|>",
                               pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True) for t in _SPECIAL[1:]]})
    tokenizer.add_tokens([AddedToken("<|endoftext|>", special=True)], special_tokens=True)
    # 28 px patches merged 2x2: at most 56x56 pixels, so an input image costs the encoder 4 tokens.
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2,
                                            temporal_patch_size=2)
    video_processor = Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2,
                                            temporal_patch_size=2)  # the processor requires one; edits use none
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor)
    return processor, tokenizer


def build_tiny_qwen_edit(folder: Path, seed: int = 0) -> Path:
    """Write a working QwenImageEditPipeline with random weights to `folder` (idempotent)."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    processor, tokenizer = _tiny_qwen_processor()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _SPECIAL}
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": len(tokenizer), "rope_theta": 1000000.0,
                     "bos_token_id": None, "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        hidden_size=16, vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"], image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                                time_shift_type="exponential")
    pipe = QwenImageEditPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                 processor=processor, transformer=transformer)
    pipe.save_pretrained(tmp)
    tmp.rename(folder)
    return folder
