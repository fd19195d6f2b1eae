"""Local batching benchmark: the diffusers backend's batched generation (`DiffusionBackend.generate_jobs`:
jobs equal but for the seed share pipeline calls of --batch-size images, one generator per image)
against one pipeline call per image (the same backend with batch_size=1), in one process, on the same
warm pipeline, LoRAs, seeds and settings.

    python bench/diffusers_batching.py [--quick] [--model tiny|sd15-arch|PATH] [--device cpu|cuda]
        [--batch-size N] [--images N] [--repeats N] [--steps N] [--size PX] [--loras N] [--threads N]

Models:
- tiny (default): the tests' tiny SD1.5-layout model, built once under $TMPDIR, 64 px.
- sd15-arch: a full-size SD1.5-architecture pipeline (UNet 320/640/1280/1280, 860M parameters; VAE
  128/256/512/512; 12-layer 768-wide CLIP text encoder) with random weights, no download, written
  once to $TMPDIR (about 4.3 GB in fp32); 512 px. Meant for --device cuda; on CPU give it tiny
  settings (e.g. --size 256 --steps 1 --images 2 --batch-size 2 --repeats 1;
  the backend refuses sides under 256 px for non-tiny models).
- PATH: any local diffusers SD1.5/SDXL folder.
Each run adds --loras random kohya-format LoRAs (rank 16, every attention projection of the UNet,
weights 0.8, 0.6, ...), as persona generation does.

Measured per side and repeat (sides interleaved, order alternating; one untimed warm-up round):
images/s for --images images, model and LoRA loading excluded (both sides share the cached pipeline
and adapters). Medians over repeats; target: ours >= 1.5x the reference's images/s. Also printed:
how many images differ between the sides and by how much (batched float arithmetic rounds
differently from single images, which is why manifests record their batch), and on CUDA the peak
GPU memory per side.

Threads: torch's own count by default (all cores), as the pipeline runs in production; on CPU that is
where batching gains (a batch-of-one call leaves cores idle in small ops). On a shared machine
multi-thread runs collapse at random when another process takes a core; --threads 1 is steadier but
can only gain the per-call overhead (text encoding, scheduler and pipeline setup). Both sides always
run with the same setting.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _report import emit, record  # noqa: E402  (bench/, the script's folder, is on sys.path)
from _torch_bench import quiet_torch  # noqa: E402

SPEED_TARGET = 1.5
LORA_RANK = 16


# --- models ------------------------------------------------------------------------------------

def build_sd15_arch(folder: Path, seed: int = 0) -> Path:
    """Write a StableDiffusionPipeline with SD1.5's exact architecture and random weights to
    `folder` (idempotent). The tokenizer is the tiny models' byte-level one: the text encoder's
    shape is SD1.5's except for a smaller embedding table, which costs nothing per step."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd_pipeline import save_sd_pipeline  # bench/ is on sys.path when a benchmark runs

    from persona_pipeline.training.tiny_models import _byte_vocab

    vocab = _byte_vocab()
    eos = vocab["<|endoftext|>"]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(  # runwayml/stable-diffusion-v1-5 unet/config.json
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8,
    )
    vae = AutoencoderKL(  # its vae/config.json
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(  # CLIP ViT-L/14's text tower
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos, hidden_size=768, intermediate_size=3072,
        num_attention_heads=12, num_hidden_layers=12, hidden_act="quick_gelu", vocab_size=len(vocab),
        max_position_embeddings=77,
    ))
    return save_sd_pipeline(folder, vae=vae, text_encoder=text_encoder, unet=unet, vocab=vocab)


def random_lora(base_model: str, path: Path, seed: int) -> Path:
    """A kohya-format LoRA (the trainer's key names) on every attention projection of the model's
    UNet, with seeded random matrices. Shapes come from the UNet built on the meta device: no weights
    are loaded or allocated."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from persona_pipeline.training.lora import LORA_TARGET_MODULES

    config = UNet2DConditionModel.load_config(base_model, subfolder="unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith("." + target) for target in LORA_TARGET_MODULES):
            key = "lora_unet_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = torch.randn(LORA_RANK, module.in_features, generator=generator) / module.in_features ** 0.5
            tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, LORA_RANK, generator=generator) * 0.02
            tensors[f"{key}.alpha"] = torch.tensor(float(LORA_RANK))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


# --- the two sides -----------------------------------------------------------------------------

@dataclass
class SideRun:
    side: str
    images: int
    seconds: float
    peak_gpu_bytes: int | None = None
    pixels: list = field(default_factory=list, repr=False)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


def measure(side: str, backend, jobs, device: str) -> SideRun:
    import numpy as np
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    images = backend.generate_jobs(jobs, log=lambda _message: None)  # PIL images: the GPU work is done
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    return SideRun(side, len(images), seconds, peak, [np.asarray(image) for image in images])


def report(reference: list[SideRun], ours: list[SideRun], header: str, batch_size: int) -> bool:
    import numpy as np

    ref_rate = statistics.median(r.images_per_s for r in reference)
    our_rate = statistics.median(r.images_per_s for r in ours)
    ratio = our_rate / ref_rate
    ok = ratio >= SPEED_TARGET
    print(header)
    print()
    print(f"  {'median':32s} {'one-by-one':>11s} {'batched':>11s} {'ratio':>8s}  target")
    print(f"  {'images/s':32s} {ref_rate:11.3f} {our_rate:11.3f} {ratio:7.2f}x  >= {SPEED_TARGET}x  {'PASS' if ok else 'FAIL'}")
    print(f"  {'s per image':32s} {1 / ref_rate:11.4f} {1 / our_rate:11.4f}")
    print(f"  {'pipeline calls per run':32s} {reference[0].images:11d} {-(-ours[0].images // batch_size):11d}")
    if reference[0].peak_gpu_bytes is not None:
        print(f"  {'peak GPU memory, MiB':32s} {statistics.median(r.peak_gpu_bytes for r in reference) / 2**20:11.0f} "
              f"{statistics.median(r.peak_gpu_bytes for r in ours) / 2**20:11.0f}")
    differences = [np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in zip(reference[0].pixels, ours[0].pixels)]
    differing = sum(int(d.max() > 0) for d in differences)
    print(f"  {'images differing between sides':32s} {differing}/{len(differences)} "
          f"(max {max(int(d.max()) for d in differences)} levels, {sum(int((d > 0).sum()) for d in differences)} "
          f"of {sum(d.size for d in differences)} values): why manifests record their batch")
    print()
    print("  per run (in run order):")
    print(f"    one-by-one images/s  {' '.join(f'{r.images_per_s:.3f}' for r in reference)}")
    print(f"    batched images/s     {' '.join(f'{r.images_per_s:.3f}' for r in ours)}")
    paired = [o.images_per_s / r.images_per_s for r, o in zip(reference, ours)]
    print(f"    ratio, same repeat   {' '.join(f'{x:.2f}' for x in paired)}  (median {statistics.median(paired):.2f}x)")
    print()
    print(f"  RESULT: {'PASS' if ok else 'FAIL'} ({ratio:.2f}x)")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats")
    parser.add_argument("--model", default="tiny", help="tiny (default), sd15-arch, or a local diffusers folder")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--batch-size", type=int, default=4, help="images per batched pipeline call (default 4)")
    parser.add_argument("--images", type=int, help="images per run and side (default 16, quick 8)")
    parser.add_argument("--repeats", type=int, help="timed runs per side (default 5, quick 3)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: tiny 4, otherwise 20; quick: tiny 4, otherwise 10)")
    parser.add_argument("--size", type=int, help="image side in px (default: tiny 64, otherwise 512)")
    parser.add_argument("--loras", type=int, default=1, help="LoRAs per job (default 1, at most 5)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own, see above)")
    args = parser.parse_args()
    tiny = args.model == "tiny"
    images = args.images or (8 if args.quick else 16)
    repeats = args.repeats or (3 if args.quick else 5)
    steps = args.steps or (4 if tiny else 10 if args.quick else 20)
    size = args.size or (64 if tiny else 512)

    import torch

    quiet_torch(args.threads)

    from persona_pipeline.resources.diffusion import DiffusersJob, DiffusionBackend

    cache = Path(tempfile.gettempdir())
    models_dir = cache / "persona-bench-models"
    if args.model == "sd15-arch":
        folder = cache / "persona-bench-sd15-arch"
        if not (folder / "model_index.json").is_file():
            print(f"building the SD1.5-architecture model in {folder} (once)...", flush=True)
        base_model = str(build_sd15_arch(folder))
    else:
        base_model = args.model
    work = Path(tempfile.mkdtemp(prefix="bench-diffusers-batching-"))
    try:
        settings = dict(base_model=base_model, device=args.device, models_dir=str(models_dir))
        ours, reference = DiffusionBackend(**settings, batch_size=args.batch_size), DiffusionBackend(**settings, batch_size=1)
        loras = tuple((str(random_lora(ours.base_model_path(), work / f"lora{i}.safetensors", i)), round(0.8 - 0.2 * i, 2))
                      for i in range(args.loras))
        jobs = [DiffusersJob(prompt="photo of a woman, portrait, natural light", negative_prompt="blurry, lowres",
                             seed=1000 + i, steps=steps, cfg=5.0, sampler="euler", scheduler="normal", width=size,
                             height=size, loras=loras) for i in range(images)]
        started = time.perf_counter()
        for backend in (reference, ours):  # untimed: pipeline and adapters load, first-call setup settles
            backend.generate_jobs(jobs[:args.batch_size], log=lambda _message: None)
        print(f"warm-up (model and LoRA loading included): {time.perf_counter() - started:.1f} s", flush=True)

        reference_runs, our_runs = [], []
        for repeat in range(repeats):
            order = (("one-by-one", reference), ("batched", ours)) if repeat % 2 == 0 else (("batched", ours), ("one-by-one", reference))
            for side, backend in order:
                run = measure(side, backend, jobs, args.device)
                (reference_runs if side == "one-by-one" else our_runs).append(run)
                print(f"  run {repeat + 1}/{repeats} {side:10s}: {run.images_per_s:.3f} images/s", flush=True)

        device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} torch thread(s)"
        header = (f"\nDiffusers generation, model {args.model} ({base_model}), {size}x{size} px, {steps} steps euler, cfg 5, "
                  f"{len(loras)} LoRA(s) rank {LORA_RANK}, fp32, {device}\n"
                  f"  {images} images per run, batch size {args.batch_size} vs 1, {repeats} repeats, medians")
        ok = report(reference_runs, our_runs, header, args.batch_size)
        where = "cuda" if args.device.startswith("cuda") else "cpu"
        record(f"diffusers generation, {args.model} {size}px {steps} steps, {where}: one image per call vs "
               f"batches of {args.batch_size}", reference=statistics.median(r.images_per_s for r in reference_runs),
               ours=statistics.median(r.images_per_s for r in our_runs), unit="images/s", better="higher",
               target=f">= {SPEED_TARGET}x", ok=ok, note=f"{images} images, median of {repeats}")
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    code = main()
    emit()
    sys.exit(code)
