"""FLUX.1 LoRA training benchmark: our trainer (`train_lora` on a FLUX base: latents and CLIP + T5
embeddings cached once, text encoders and VAE freed, transformer-only steps) against the per-step
loop of diffusers' examples/dreambooth/train_dreambooth_lora_flux.py, in one process, on the same
model, data and settings.

    python bench/train_flux.py [--quick] [--steps N] [--repeats N] [--images N] [--threads N]

The reference reproduces that script's work with per-image captions (its `custom_instance_prompts`
case, which is ours: every photo has its caption) and `--cache_latents`: the dataset's images are
transformed once, the VAE encodes every batch once before training (a DiagonalGaussian per batch, a
fresh `.sample()` each step) and is freed; each step then encodes the batch's captions with CLIP
(pooled) and T5 (`compute_text_embeddings` -> `encode_prompt`), draws the timestep through the
scheduler's table (`compute_density_for_timestep_sampling`, weighting "none"), looks its sigma up
(`get_sigmas`), runs the transformer on packed latents with the guidance input, and steps AdamW with
its defaults (weight decay 1e-4) after `clip_grad_norm_(1.0)`; the LoRA is saved with
`FluxPipeline.save_lora_weights`. Both sides: rank 4 on to_q/k/v/out.0, lr 1e-4, batch 2, fp32,
T5 sequences of SEQ_LEN tokens (the script's --max_sequence_length; 512 by default there).

The model is a FLUX.1 [dev] layout built locally with random weights, bigger than the tests' tiny
one so the text encoders and the transformer have a real share of a step (printed): written once
to $TMPDIR/persona-bench-flux-<config digest>.

Measured per side and repeat (sides interleaved, order alternating, gc + malloc_trim between), as
bench/train_lora.py does: time from the end of model loading to the saved LoRA (each side's caching
included; ours gets a fresh cache folder each run), and the process's peak RSS during the run.
Medians over repeats; targets: ours >= 1.2x the reference's steps/s, peak RSS <= 1.0x.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _report import emit, record  # noqa: E402  (bench/ is on sys.path)
from _torch_bench import add_run_size_arguments, quiet_torch  # noqa: E402
import train_lora  # noqa: E402
from train_lora import MIB, SideRun, make_dataset, release_memory  # noqa: E402

RESOLUTION = 128
BATCH_SIZE = 2
RANK = 4
LEARNING_RATE = 1e-4
SEQ_LEN = 128
GUIDANCE = 1.0
SPEED_TARGET, RSS_TARGET = 1.2, 1.0
# FLUX.1's layout scaled down: double and single blocks, 8x VAE with 16 latent channels, CLIP + T5.
BENCH_MODEL = {"heads": 4, "head_dim": 64, "double": 2, "single": 4, "vae": (32, 64, 128, 128),
               "clip_hidden": 256, "clip_layers": 4, "t5_hidden": 512, "t5_layers": 4}


def build_bench_flux(folder: Path, seed: int = 0) -> Path:
    """Write a random-weight FluxPipeline of BENCH_MODEL's size to `folder` (idempotent)."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    from persona_pipeline.training.tiny_models import (FLUX_VAE_SCALING_FACTOR, FLUX_VAE_SHIFT_FACTOR, _byte_vocab,
                                                       _tiny_t5_tokenizer)

    m = BENCH_MODEL
    vocab, t5_tokenizer = _byte_vocab(), _tiny_t5_tokenizer()
    torch.manual_seed(seed)
    head_dim = m["head_dim"]
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=m["double"], num_single_layers=m["single"], attention_head_dim=head_dim,
        num_attention_heads=m["heads"], joint_attention_dim=m["t5_hidden"], pooled_projection_dim=m["clip_hidden"],
        guidance_embeds=True, axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8))
    levels = len(m["vae"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=m["vae"], layers_per_block=1, latent_channels=16,
                        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
                        sample_size=RESOLUTION, use_quant_conv=False, use_post_quant_conv=False,
                        scaling_factor=FLUX_VAE_SCALING_FACTOR, shift_factor=FLUX_VAE_SHIFT_FACTOR)
    eos = vocab["<|endoftext|>"]
    clip = CLIPTextModel(CLIPTextConfig(
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos, hidden_size=m["clip_hidden"],
        intermediate_size=4 * m["clip_hidden"], num_attention_heads=m["clip_hidden"] // 64, num_hidden_layers=m["clip_layers"],
        vocab_size=len(vocab), max_position_embeddings=77, hidden_act="gelu"))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=m["t5_hidden"], d_kv=64, d_ff=2 * m["t5_hidden"],
                                 num_layers=m["t5_layers"], num_heads=m["t5_hidden"] // 64, feed_forward_proj="gated-gelu",
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip,
                        tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)
    tmp = folder.with_name(folder.name + ".partial")
    pipe.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def model_summary(base: str) -> str:
    import math

    from safetensors import safe_open

    counts = {}
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        total = 0
        for file in (Path(base) / part).glob("*.safetensors"):
            with safe_open(file, "pt") as handle:
                total += sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())
        counts[part] = total / 1e6
    return (f"FLUX transformer {BENCH_MODEL['double']}+{BENCH_MODEL['single']} blocks ({counts['transformer']:.1f}M), "
            f"VAE ({counts['vae']:.1f}M), CLIP ({counts['text_encoder']:.1f}M), T5 ({counts['text_encoder_2']:.1f}M)")


# --- the two sides -----------------------------------------------------------------------------

def reference_train(base: str, items: list[tuple[Path, str]], steps: int, out_dir: Path, run: SideRun, *,
                    device: str = "cpu", precision: str = "no", resolution: int = RESOLUTION, seq_len: int = SEQ_LEN,
                    gradient_checkpointing: bool = False, quantization_config=None, rank: int = RANK,
                    batch_size: int = BATCH_SIZE) -> None:
    """The per-step work of train_dreambooth_lora_flux.py (module docstring). The keyword options are
    the script's --mixed_precision, --resolution, --max_sequence_length and --gradient_checkpointing
    (bench/gpu_flux.py); `quantization_config` loads its transformer quantised, as diffusers' QLoRA
    FLUX recipe does."""
    import numpy as np
    import torch
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    from persona_pipeline.training.kohya_dataset import load_pixels

    started = time.perf_counter()
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=precision)
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    tokenizer_one = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    tokenizer_two = T5TokenizerFast.from_pretrained(base, subfolder="tokenizer_2")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")
    scheduler_copy = copy.deepcopy(scheduler)
    text_encoder_one = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    text_encoder_two = T5EncoderModel.from_pretrained(base, subfolder="text_encoder_2")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    transformer = FluxTransformer2DModel.from_pretrained(base, subfolder="transformer", quantization_config=quantization_config,
                                                         dtype=weight_dtype)
    for model in (transformer, vae, text_encoder_one, text_encoder_two):
        model.requires_grad_(False)
    # The script casts every frozen model to the weight dtype and moves it to the device.
    for model in (vae, text_encoder_one, text_encoder_two) + (() if quantization_config else (transformer,)):
        model.to(accelerator.device, dtype=weight_dtype)
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                       target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    optimizer = torch.optim.AdamW([p for p in transformer.parameters() if p.requires_grad], lr=LEARNING_RATE,
                                  betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # "constant"
    loaded = time.perf_counter()
    run.load_s = loaded - started

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    # DreamBoothDataset transforms every image once (resize, crop, random flip, normalise) in __init__.
    pixels = [load_pixels(path, resolution)[0][0] for path, _ in items]
    pixels = [torch.flip(p, dims=[2]) if torch.rand(()) < 0.5 else p for p in pixels]
    batches = []  # one epoch of a shuffled DataLoader, repeated: the cache is indexed by the step within the epoch
    order = rng.permutation(len(items))
    for start in range(0, len(order), batch_size):
        batches.append([int(i) for i in order[start:start + batch_size]])
    with torch.no_grad():
        latents_cache = [vae.encode(torch.stack([pixels[i] for i in batch]).to(accelerator.device, dtype=weight_dtype)).latent_dist
                         for batch in batches]
    shift_factor, scaling_factor = vae.config.shift_factor, vae.config.scaling_factor
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    del vae
    release_memory()

    def encode_prompt(prompts: list[str]):
        with torch.no_grad():
            ids = tokenizer_one(prompts, padding="max_length", max_length=77, truncation=True, return_length=False,
                                return_overflowing_tokens=False, return_tensors="pt").input_ids
            pooled = text_encoder_one(ids.to(accelerator.device), output_hidden_states=False).pooler_output
            ids = tokenizer_two(prompts, padding="max_length", max_length=seq_len, truncation=True, return_length=False,
                                return_overflowing_tokens=False, return_tensors="pt").input_ids
            prompt_embeds = text_encoder_two(ids.to(accelerator.device))[0].to(weight_dtype)
            text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=accelerator.device, dtype=weight_dtype)
        return prompt_embeds, pooled, text_ids

    def get_sigmas(timesteps, n_dim=4, dtype=torch.float32):
        sigmas = scheduler_copy.sigmas.to(device=accelerator.device, dtype=dtype)
        schedule_timesteps = scheduler_copy.timesteps.to(accelerator.device)
        timesteps = timesteps.to(accelerator.device)
        step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
        sigma = sigmas[step_indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    transformer.train()
    encode_s = 0.0
    for step in range(steps):
        batch = batches[step % len(batches)]
        encode_started = time.perf_counter()
        prompt_embeds, pooled_prompt_embeds, text_ids = encode_prompt([items[i][1] for i in batch])
        encode_s += time.perf_counter() - encode_started
        model_input = latents_cache[step % len(batches)].sample()
        model_input = ((model_input - shift_factor) * scaling_factor).to(dtype=weight_dtype)
        latent_image_ids = FluxPipeline._prepare_latent_image_ids(model_input.shape[0], model_input.shape[2] // 2,
                                                                  model_input.shape[3] // 2, accelerator.device, weight_dtype)
        noise = torch.randn_like(model_input)
        bsz = model_input.shape[0]
        u = compute_density_for_timestep_sampling(weighting_scheme="none", batch_size=bsz, logit_mean=0.0, logit_std=1.0,
                                                  mode_scale=1.29)
        indices = (u * scheduler_copy.config.num_train_timesteps).long()
        timesteps = scheduler_copy.timesteps[indices].to(device=model_input.device)
        sigmas = get_sigmas(timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
        noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
        packed = FluxPipeline._pack_latents(noisy_model_input, batch_size=bsz, num_channels_latents=model_input.shape[1],
                                            height=model_input.shape[2], width=model_input.shape[3])
        guidance = torch.tensor([GUIDANCE], device=accelerator.device).expand(bsz) if accelerator.unwrap_model(transformer).config.guidance_embeds else None
        model_pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                                 pooled_projections=pooled_prompt_embeds, encoder_hidden_states=prompt_embeds,
                                 txt_ids=text_ids, img_ids=latent_image_ids, return_dict=False)[0]
        model_pred = FluxPipeline._unpack_latents(model_pred, height=model_input.shape[2] * vae_scale_factor,
                                                  width=model_input.shape[3] * vae_scale_factor, vae_scale_factor=vae_scale_factor)
        weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
        target = noise - model_input
        loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1).mean()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        run.losses.append(loss.item())
    out_dir.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(str(out_dir), transformer_lora_layers=get_peft_model_state_dict(accelerator.unwrap_model(transformer)))
    run.loop_s = time.perf_counter() - loaded
    run.encode_s = encode_s


def our_train(base: str, dataset_dir: Path, steps: int, out_dir: Path, run: SideRun, *, device: str = "cpu",
              **settings) -> None:
    """`train_lora` as the pipeline calls it; its phases are stamped from outside (the loader wrapped,
    the transformer's first forward hooked), without touching the trainer. `settings` override this
    benchmark's training settings (bench/gpu_flux.py's full-size ones)."""
    from persona_pipeline.training import lora
    from persona_pipeline.training.families import flux

    marks: dict[str, float] = {}
    original = flux.load_frozen_flux

    def timed_loader(*args, **kwargs):
        loaded = original(*args, **kwargs)
        marks["loaded"] = time.perf_counter()
        loaded.transformer.register_forward_pre_hook(lambda _m, _a: marks.setdefault("first_step", time.perf_counter()) and None)
        return loaded

    params = lora.LoraTrainingParams(**{**dict(rank=RANK, alpha=float(RANK), steps=steps, learning_rate=LEARNING_RATE,
                                               batch_size=BATCH_SIZE, resolution=RESOLUTION, seed=0, mixed_precision="no",
                                               max_sequence_length=SEQ_LEN, guidance=GUIDANCE), **settings})
    flux.load_frozen_flux = timed_loader
    try:
        started = time.perf_counter()
        result = lora.train_lora(base, dataset_dir, out_dir, params, device=device, weight_name="ours.safetensors",
                                 log=lambda _message: None, cache_dir=out_dir / "cache")
        finished = time.perf_counter()
    finally:
        flux.load_frozen_flux = original
    if "loaded" not in marks or "first_step" not in marks:
        raise RuntimeError(f"could not time the trainer's phases (marks {sorted(marks)}): is flux.load_frozen_flux "
                           "still the loader train_flux_lora calls?")
    run.load_s = marks["loaded"] - started
    run.caching_s = marks["first_step"] - marks["loaded"]
    run.loop_s = finished - marks["first_step"]
    run.losses = list(result.losses)


def measure(side: str, steps: int, work: Path, base: str, dataset_dir: Path, items, tag: str) -> SideRun:
    return train_lora.measure(side, steps, work, base, dataset_dir, items, tag, reference=reference_train, ours=our_train)


def report(reference: list[SideRun], ours: list[SideRun], header: str) -> bool:
    def median(side, attribute):
        return statistics.median(getattr(r, attribute) for r in side)

    # The reference's training time includes its own latent-caching pass, as ours includes ours.
    ref_rate = statistics.median(r.steps / r.loop_s for r in reference)
    our_rate = median(ours, "steps_per_s")
    speed, rss = our_rate / ref_rate, median(ours, "peak_rss") / median(reference, "peak_rss")
    speed_ok, rss_ok = speed >= SPEED_TARGET, rss <= RSS_TARGET
    paired = [o.steps_per_s / (r.steps / r.loop_s) for r, o in zip(reference, ours)]
    print(header)
    print(f"  reference: {statistics.median(r.encode_s / r.loop_s for r in reference):.0%} of its training time is "
          "CLIP + T5 encoding inside the loop")
    print(f"\n  {'median':32s} {'reference':>10s} {'ours':>10s} {'ours/ref':>9s}  target")
    print(f"  {'steps/s, incl. caching':32s} {ref_rate:10.3f} {our_rate:10.3f} {speed:8.2f}x  >= {SPEED_TARGET}x  "
          f"{'PASS' if speed_ok else 'FAIL'}")
    print(f"  {'ours: caching pass, s':32s} {'':10s} {median(ours, 'caching_s'):10.2f}")
    print(f"  {'ours: steps/s, loop only':32s} {'':10s} {median(ours, 'loop_steps_per_s'):10.3f}")
    print(f"  {'model load, s (excluded)':32s} {median(reference, 'load_s'):10.2f} {median(ours, 'load_s'):10.2f}")
    print(f"  {'peak RSS, MiB':32s} {median(reference, 'peak_rss') / MIB:10.0f} {median(ours, 'peak_rss') / MIB:10.0f} "
          f"{rss:8.3f}x  <= {RSS_TARGET}x  {'PASS' if rss_ok else 'FAIL'}")
    print(f"  {'RSS before the run, MiB':32s} {median(reference, 'baseline_rss') / MIB:10.0f} {median(ours, 'baseline_rss') / MIB:10.0f}")
    growth = [statistics.median(r.peak_rss - r.baseline_rss for r in side) / MIB for side in (reference, ours)]
    print(f"  {'peak above that, MiB':32s} {growth[0]:10.0f} {growth[1]:10.0f} {growth[1] / growth[0]:8.3f}x  (info)")
    print(f"\n  paired ours/ref steps/s per repeat: {' '.join(f'{x:.2f}' for x in paired)} (median {statistics.median(paired):.2f}x)")
    print(f"  peak RSS MiB per repeat: reference {' '.join(f'{r.peak_rss / MIB:.0f}' for r in reference)}; "
          f"ours {' '.join(f'{r.peak_rss / MIB:.0f}' for r in ours)}")
    print(f"  mean loss of the last 5 steps: reference {statistics.mean(statistics.mean(r.losses[-5:]) for r in reference):.4f}, "
          f"ours {statistics.mean(statistics.mean(r.losses[-5:]) for r in ours):.4f}")
    print(f"\n  RESULT: speed {'PASS' if speed_ok else 'FAIL'} ({speed:.2f}x), RSS {'PASS' if rss_ok else 'FAIL'} ({rss:.3f}x)")
    steps = ours[0].steps
    record(f"FLUX LoRA training steps/s ({steps} steps, caching included): train_dreambooth_lora_flux loop vs ours",
           reference=ref_rate, ours=our_rate, unit="steps/s", better="higher", target=f">= {SPEED_TARGET}x", ok=speed_ok,
           note=f"median of {len(ours)}")
    record("FLUX LoRA training peak RSS: train_dreambooth_lora_flux loop vs ours", reference=median(reference, "peak_rss") / MIB,
           ours=median(ours, "peak_rss") / MIB, unit="MiB", better="lower", target=f"ours <= {RSS_TARGET}x reference", ok=rss_ok)
    return speed_ok and rss_ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_size_arguments(parser, images_help="demo photos in the dataset (default 8, quick 4)")
    args = parser.parse_args()
    steps = args.steps or (16 if args.quick else 32)
    repeats = args.repeats or (3 if args.quick else 5)
    images = args.images or (4 if args.quick else 8)

    quiet_torch(args.threads)
    digest = hashlib.sha256(json.dumps([BENCH_MODEL, RESOLUTION], sort_keys=True).encode()).hexdigest()[:12]
    base = str(build_bench_flux(Path(tempfile.gettempdir()) / f"persona-bench-flux-{digest}"))
    work = Path(tempfile.mkdtemp(prefix="bench-train-flux-"))
    try:
        dataset_dir = work / "dataset"
        items = make_dataset(dataset_dir, images)
        for side in ("reference", "ours"):  # untimed warm-up: imports and allocator pools settle
            measure(side, 2, work, base, dataset_dir, items, "warmup")
        reference, ours = [], []
        for repeat in range(repeats):
            for side in (("reference", "ours") if repeat % 2 == 0 else ("ours", "reference")):
                run = measure(side, steps, work, base, dataset_dir, items, str(repeat))
                (reference if side == "reference" else ours).append(run)
                rate = run.steps_per_s if side == "ours" else run.steps / run.loop_s
                print(f"  run {repeat + 1}/{repeats} {side:9s}: {rate:.3f} steps/s, peak RSS {run.peak_rss / MIB:.0f} MiB", flush=True)
        header = (f"\nFLUX LoRA training, {model_summary(base)}; {RESOLUTION}px, {len(items)} images, {steps} steps, "
                  f"batch {BATCH_SIZE}, rank {RANK}, T5 {SEQ_LEN} tokens, {args.threads} torch thread(s), {repeats} repeats, medians")
        return 0 if report(reference, ours, header) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    code = main()
    emit()
    sys.exit(code)
