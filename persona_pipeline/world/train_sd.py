"""Train the tiny text-to-image model on the world, in diffusers' Stable Diffusion layout.

One plain loop per part, in the manner of diffusers' `train_text_to_image.py` example:

1. the tokenizer: BPE merges learned from the world's captions (world_tokenizer.py);
2. the VAE (`AutoencoderKL`, 4x downsampling to 16 latent channels): trained as a deterministic
   autoencoder on 32 px crops of world images (a crop costs a quarter of a frame, and colour is
   local), with a colour term on 4x4-averaged pixels besides L1 + MSE, because the attributes the
   quality figures read are colours of small regions. Its log-variance output is then pinned near
   zero variance, so `latent_dist.sample()` (what LoRA training draws) equals the mean; its scaling
   factor is measured (1 / std of the latents) rather than borrowed from SD 1.5;
3. the CLIP text encoder and the `UNet2DConditionModel`, trained together from scratch with the
   v-prediction loss on (world image, caption) pairs at 16x16 latents; one caption in ten is
   dropped to "" so that classifier-free guidance has an unconditional model to push against. An EMA
   of the weights is what is saved, as in diffusers' `--use_ema`.

Every image comes from `world_samples(seed)`, rendered on the fly (under a millisecond each), so a
run is fixed by its seed and step counts. Progress is printed; losses on a fixed held-out batch
(fixed noise and timesteps) before and after training are the measured sign that it learned.
"""

from __future__ import annotations

import random

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from persona_pipeline.world.attributes import CLASS_WORD, DEMO_TRIGGER, SCENES
from persona_pipeline.world.captions import varied_caption, world_caption
from persona_pipeline.world.dataset import world_samples, world_shot
from persona_pipeline.world.loss_log import LossLog, Progress
from persona_pipeline.world.world_tokenizer import build_world_tokenizer

UNCONDITIONAL_SHARE = 0.1
LATENT_CHANNELS = 16
COLOUR_WEIGHT = 4.0  # the 4x4-averaged colour term of the VAE loss; without it hues drift (scarf read right 57 %, not 95 %)
TOKENIZER_CAPTIONS = 4000  # captions the BPE merges are learned from (every world word occurs)


@dataclass(frozen=True)
class SdSettings:
    resolution: int = 64
    seed: int = 0
    vae_steps: int = 3000  # 0.16 s each; 1137 steps read scarves right 95 %, jackets 98.5 % through it (docs/world.md)
    unet_steps: int = 3000  # 0.64 s each at 16x16 latents (the committed run's manifest)
    batch_size: int = 32
    vae_batch_size: int = 16
    vae_crop: int = 32
    train_count: int = 50_000  # distinct world samples the batches cycle through
    vae_lr: float = 1e-3
    unet_lr: float = 1e-3
    ema_decay: float = 0.999
    log_every: int = 25
    snapshot_every: int = 0  # > 0: save the EMA pipeline every N UNet steps under snapshot_dir, to measure while training
    snapshot_dir: str = ""
    resume_from: str = ""  # a world `sd/` folder: keep its tokenizer and VAE, continue its text encoder and UNet
    start_step: int = 0  # UNet steps already taken (resumed runs): batches continue from there
    caption_variety: float = 0.0  # share of UNet captions in a prompt's shapes (captions.varied_caption)


def to_tensor(images) -> torch.Tensor:
    """PIL images -> a float batch in [-1, 1], channels first (the VAE's input range)."""
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def batch_at(settings: SdSettings, step: int, split: str = "train", size: int | None = None,
             variety: float = 0.0) -> tuple[torch.Tensor, list[str]]:
    """Batch `step` (of `size` samples) of the cycle through `train_count` samples (held-out: the
    split's first ones). With `variety`, that share of captions is varied (`varied_caption`), drawn
    from a stream named by the seed and step, so a resumed run varies them as an unbroken one would."""
    size = size or settings.batch_size
    start = (step * size) % settings.train_count if split == "train" else 0
    samples = list(world_samples(size, settings.seed, split=split, size=settings.resolution, start=start))
    rng = random.Random(f"{settings.seed}:{split}:{step}")
    captions = [varied_caption(s.shot, rng) if rng.random() < variety else s.caption for s in samples]
    return to_tensor(s.image for s in samples), captions


def sample_definitions(settings: SdSettings) -> list[dict]:
    """What the training set is: each sample's labels and render seed (for the manifest's data hash)."""
    rows = []
    for index in range(settings.train_count):
        shot, render_seed = world_shot(settings.seed, index, "train")
        rows.append({"index": index, "labels": shot.labels(), "render_seed": render_seed, "size": settings.resolution})
    return rows


def tokenizer_texts(seed: int) -> list[str]:
    """Base captions, persona captions and the prompts the pipeline writes, for the BPE merges."""
    shots = [world_shot(seed, i, "train")[0] for i in range(TOKENIZER_CAPTIONS)]
    texts = [world_caption(shot) for shot in shots] + [world_caption(shot, trigger=DEMO_TRIGGER) for shot in shots[:200]]
    return texts + [f"photo of {DEMO_TRIGGER} {CLASS_WORD}, {scene}" for scene in SCENES]


def build_models(tokenizer, resolution: int, seed: int):
    """A VAE with 4x downsampling to 16 channels (so the UNet works at 16x16 for 64 px, 2.6x cheaper a
    step than the random tiny model's 32x32, measured), the tiny UNet's blocks and text encoder, and
    the world tokenizer's vocabulary."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=[16, 32, 64], in_channels=3, out_channels=3, layers_per_block=1, norm_num_groups=8,
                        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                        latent_channels=LATENT_CHANNELS, sample_size=resolution)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=resolution // 4, in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"), eos_token_id=eos, pad_token_id=eos, hidden_size=32,
        intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5, vocab_size=len(tokenizer),
        max_position_embeddings=77))
    # v-prediction (as SD 2.x): with epsilon targets a model this small never learns the noisiest
    # steps well enough, and the image it implies there is off by (1 - alpha) / alpha times its error
    # (x0 error 7.7 at t = 999 after 1000 steps, measured), so every sample came out as coloured noise.
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                              clip_sample=False, steps_offset=1, prediction_type="v_prediction")
    return vae, unet, text_encoder, scheduler


def vae_loss(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """L1 + MSE on pixels, plus MSE on 4x4 averages: colour over a region, what the attributes are."""
    return (F.l1_loss(recon, images) + F.mse_loss(recon, images)
            + COLOUR_WEIGHT * F.mse_loss(F.avg_pool2d(recon, 4), F.avg_pool2d(images, 4)))


def pin_vae_variance(vae) -> None:
    """Make the encoder's log-variance output constant at the floor diffusers clamps to (-30), so
    `latent_dist.sample()` equals `mode()`: the VAE trained deterministically, its variance head never did."""
    half = vae.quant_conv.out_channels // 2
    with torch.no_grad():
        vae.quant_conv.weight[half:] = 0.0
        vae.quant_conv.bias[half:] = -30.0


def train_vae(vae, settings: SdSettings, progress: Progress) -> dict:
    """Deterministic autoencoder training on random crops (the posterior's mean, a small KL term on it
    keeps the latents near unit scale)."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr)
    eval_images, _ = batch_at(settings, 0, "heldout")

    def eval_mse() -> float:
        vae.eval()
        with torch.no_grad():
            out = vae.decode(vae.encode(eval_images).latent_dist.mode()).sample
        vae.train()
        return float(F.mse_loss(out.clamp(-1, 1), eval_images))

    before = eval_mse()
    log = LossLog(progress, "vae", settings.vae_steps, settings.vae_batch_size, settings.log_every)
    generator = torch.Generator().manual_seed(settings.seed)
    vae.train()
    for step in range(settings.vae_steps):
        images, _ = batch_at(settings, step, size=settings.vae_batch_size)
        span = settings.resolution - settings.vae_crop
        top, left = torch.randint(0, span + 1, (2,), generator=generator).tolist()
        images = images[:, :, top:top + settings.vae_crop, left:left + settings.vae_crop]
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.mode()).sample
        loss = vae_loss(recon, images) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log.add(loss.item())
    pin_vae_variance(vae)
    after = eval_mse()
    # PSNR on [-1, 1] images: peak-to-peak 2, so 10 log10(4 / mse).
    return {"vae_eval_mse_before": before, "vae_eval_mse_after": after, "vae_psnr_db": 10 * float(np.log10(4 / after)),
            "vae_seconds": log.seconds, "vae_loss_history": log.history}


def measure_scaling_factor(vae, settings: SdSettings) -> float:
    """1 / std of the latents of held-out images, so the UNet sees unit-variance latents."""
    images, _ = batch_at(settings, 0, "heldout")
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mode()
    return float(1.0 / latents.std())


def encode_text(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def save_pipeline(out: Path, vae, text_encoder, tokenizer, unet, scheduler) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    Path(out).mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)


def train_unet(vae, unet, text_encoder, tokenizer, scheduler, settings: SdSettings, progress: Progress) -> dict:
    """v-prediction loss over uniform timesteps; the text encoder learns alongside.
    The models end holding the EMA of their weights."""
    import copy

    from diffusers.training_utils import EMAModel

    vae.requires_grad_(False)
    vae.eval()
    scale = vae.config.scaling_factor
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.unet_lr, weight_decay=1e-2)
    warmup = max(1, min(100, settings.unet_steps // 10))
    lr_at = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    generator = torch.Generator().manual_seed(settings.seed + 1 + settings.start_step)

    def target(latents, noise, timesteps):
        """What the UNet predicts, as its scheduler says (a resumed older folder may predict noise)."""
        if scheduler.config.prediction_type == "v_prediction":
            return scheduler.get_velocity(latents, noise, timesteps)
        return noise

    ema = EMAModel(params, decay=settings.ema_decay)

    def with_ema(action):
        """Run `action` with the EMA weights in place, then put the training weights back."""
        ema.store(params)
        ema.copy_to(params)
        try:
            return action()
        finally:
            ema.restore(params)

    eval_images, eval_captions = batch_at(settings, 0, "heldout")
    with torch.no_grad():
        eval_latents = vae.encode(eval_images).latent_dist.mode() * scale
    eval_noise = torch.randn(eval_latents.shape, generator=torch.Generator().manual_seed(settings.seed + 2))
    eval_t = torch.linspace(20, scheduler.config.num_train_timesteps - 20, len(eval_latents)).long()

    def eval_loss() -> float:
        unet.eval(), text_encoder.eval()
        with torch.no_grad():
            noisy = scheduler.add_noise(eval_latents, eval_noise, eval_t)
            pred = unet(noisy, eval_t, encode_text(tokenizer, text_encoder, eval_captions)).sample
        unet.train(), text_encoder.train()
        return float(F.mse_loss(pred, target(eval_latents, eval_noise, eval_t)))

    before = eval_loss()
    log = LossLog(progress, "unet", settings.unet_steps, settings.batch_size, settings.log_every)
    unet.train(), text_encoder.train()
    for step in range(settings.unet_steps):
        images, captions = batch_at(settings, settings.start_step + step, variety=settings.caption_variety)
        drop = torch.rand(len(captions), generator=generator) < UNCONDITIONAL_SHARE
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample(generator) * scale
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        pred = unet(noisy, timesteps, encode_text(tokenizer, text_encoder, captions)).sample
        loss = F.mse_loss(pred, target(latents, noise, timesteps))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_at.step()
        ema.step(params)
        log.add(loss.item())
        if settings.snapshot_every and (step + 1) % settings.snapshot_every == 0 and step + 1 < settings.unet_steps:
            folder = Path(settings.snapshot_dir) / f"unet-{step + 1:05d}"
            with_ema(lambda: save_pipeline(folder, vae, copy.deepcopy(text_encoder), tokenizer, copy.deepcopy(unet), scheduler))
            progress(f"world sd: snapshot {folder}")
    seconds = log.seconds
    ema.copy_to(params)
    return {"unet_eval_loss_before": before, "unet_eval_loss_after": eval_loss(), "unet_seconds": seconds,
            "unet_seconds_per_step": seconds / max(1, settings.unet_steps), "unet_loss_history": log.history}


def load_parts(sd_folder: Path):
    """The VAE, UNet, text encoder, tokenizer and scheduler of a saved world `sd/` folder."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    return pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler


def _describe(progress: Progress, settings: SdSettings, tokenizer, unet, text_encoder, vae) -> None:
    progress(f"world sd: {settings.resolution} px, tokenizer {len(tokenizer)} tokens, unet "
             f"{sum(p.numel() for p in unet.parameters()):,} parameters, text encoder "
             f"{sum(p.numel() for p in text_encoder.parameters()):,}, vae {sum(p.numel() for p in vae.parameters()):,}")


def train_sd(out: Path, settings: SdSettings, progress: Progress = print) -> dict:
    """Train every part and save a StableDiffusionPipeline folder at `out` (safetensors); returns the metrics."""
    torch.manual_seed(settings.seed + settings.start_step)
    if settings.resume_from:
        vae, unet, text_encoder, tokenizer, scheduler = load_parts(Path(settings.resume_from))
        progress(f"world sd: resuming {settings.resume_from} after {settings.start_step} UNet steps (tokenizer and VAE kept)")
        _describe(progress, settings, tokenizer, unet, text_encoder, vae)
        metrics = {}
    else:
        tokenizer = build_world_tokenizer(tokenizer_texts(settings.seed))
        vae, unet, text_encoder, scheduler = build_models(tokenizer, settings.resolution, settings.seed)
        _describe(progress, settings, tokenizer, unet, text_encoder, vae)
        metrics = train_vae(vae, settings, progress)
        vae.register_to_config(scaling_factor=measure_scaling_factor(vae, settings))
        metrics["vae_scaling_factor"] = vae.config.scaling_factor
    metrics.update(train_unet(vae, unet, text_encoder, tokenizer, scheduler, settings, progress))
    save_pipeline(out, vae, text_encoder, tokenizer, unet, scheduler)
    return metrics
