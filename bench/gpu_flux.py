"""FLUX.1 LoRA training on a GPU at full size: our loop vs the per-step loop of diffusers'
train_dreambooth_lora_flux.py (as bench/train_flux.py reproduces it), it/s and peak GPU memory,
with the frozen transformer in bf16 and quantised (8-bit through bitsandbytes).

    python bench/gpu_flux.py [--quick] [--steps N] [--model-dir DIR] [--quantized-only | --no-quantized]

Both sides: a FLUX.1 [dev] transformer of the released size (19 double + 38 single blocks, 3072
wide; random weights, which is all speed and memory depend on), CLIP-L and T5-XXL of the released
sizes (random), FLUX's VAE; 1024 px, batch 1, rank 16, bf16, gradient checkpointing, T5 512 tokens,
4 demo photos. The random model is written once to --model-dir (about 34 GB; default
$TMPDIR/persona-bench-flux-full). Each configuration runs in a fresh child process so one side's
allocator pools do not count towards the other's peak (`torch.cuda.max_memory_allocated`).
Targets: ours >= 1.2x the reference's it/s; with the quantised base, ours fits in 24 GB.

Without CUDA it says so (a SKIPPED row in bench/run_all) and exits 0 having measured nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _report import emit, record, skip  # noqa: E402

RESOLUTION, RANK, SEQ_LEN = 1024, 16, 512  # lr 1e-4 on both sides, as bench/train_flux.py
SPEED_TARGET, MEMORY_TARGET_GIB = 1.2, 24.0
GIB = 1024 ** 3


def build_full_flux(folder: Path) -> Path:
    """FLUX.1 [dev]'s released architecture with random bf16 weights, built on the GPU."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    from persona_pipeline.training.tiny_models import _byte_vocab, _tiny_t5_tokenizer

    vocab = _byte_vocab()
    torch.manual_seed(0)
    with torch.device("cuda"):
        transformer = FluxTransformer2DModel(guidance_embeds=True).to(torch.bfloat16)  # diffusers' defaults are FLUX.1's
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                                            pad_token_id=vocab["<|endoftext|>"])).to(torch.bfloat16)
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                     feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1)).to(torch.bfloat16)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
                        text_encoder_2=t5, tokenizer_2=_tiny_t5_tokenizer(), transformer=transformer)
    tmp = folder.with_name(folder.name + ".partial")
    pipe.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def run_side(side: str, quantized: bool, base: str, steps: int, work: Path) -> dict:
    """One configuration in this process: steps per second from the end of model loading to the saved
    LoRA (each side's caching pass included, as bench/train_flux.py measures), and the peak GPU memory."""
    import torch

    from train_flux import SideRun, make_dataset, our_train, reference_train  # bench/ is on sys.path

    dataset = work / f"dataset-{side}-{int(quantized)}"
    items = make_dataset(dataset, 4)
    torch.cuda.reset_peak_memory_stats()
    run = SideRun(side=side, steps=steps)
    if side == "reference":
        from diffusers import BitsAndBytesConfig

        reference_train(base, items, steps, work / "reference", run, device="cuda", precision="bf16", resolution=RESOLUTION,
                        seq_len=SEQ_LEN, gradient_checkpointing=True, rank=RANK, batch_size=1,
                        quantization_config=BitsAndBytesConfig(load_in_8bit=True) if quantized else None)
    else:
        our_train(base, dataset, steps, work / "ours", run, device="cuda", rank=RANK, alpha=float(RANK), batch_size=1,
                  resolution=RESOLUTION, mixed_precision="bf16", gradient_checkpointing=True, max_sequence_length=SEQ_LEN,
                  quantize_base="int8" if quantized else "none")
    torch.cuda.synchronize()
    seconds = run.caching_s + run.loop_s
    return {"side": side, "quantized": quantized, "steps": steps, "seconds": seconds,
            "it_per_s": steps / seconds, "peak_gib": torch.cuda.max_memory_allocated() / GIB}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 steps per configuration instead of 30")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "persona-bench-flux-full")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quantized-only", action="store_true")
    group.add_argument("--no-quantized", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # side,quantized: run one configuration, print its JSON
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        skip("no CUDA device: nothing measured (needs a GPU, ~34 GB of disk, bitsandbytes for the 8-bit rows)")
        return 0
    steps = args.steps or (10 if args.quick else 30)
    if args.child:
        side, quantized = args.child.split(",")
        work = Path(tempfile.mkdtemp(prefix="bench-gpu-flux-"))
        print("CHILD_RESULT " + json.dumps(run_side(side, quantized == "1", str(args.model_dir), steps, work)))
        return 0

    build_full_flux(args.model_dir)
    configs = [q for q in (False, True) if not (q and args.no_quantized) and not (not q and args.quantized_only)]
    results: dict[tuple[str, bool], dict] = {}
    for quantized in configs:
        for side in ("reference", "ours"):
            out = subprocess.run([sys.executable, __file__, "--child", f"{side},{int(quantized)}", "--steps", str(steps),
                                  "--model-dir", str(args.model_dir)], capture_output=True, text=True)
            line = next((l for l in out.stdout.splitlines() if l.startswith("CHILD_RESULT ")), None)
            if line is None:
                print(f"{side} (quantized={quantized}) failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
                return 1
            results[(side, quantized)] = json.loads(line.split(" ", 1)[1])
            print(f"  {side:9s} quantized={quantized}: {results[(side, quantized)]['it_per_s']:.3f} it/s, "
                  f"peak {results[(side, quantized)]['peak_gib']:.1f} GiB", flush=True)
    ok = True
    print(f"\nFLUX.1 full-size LoRA training on {torch.cuda.get_device_name()}: {RESOLUTION}px, rank {RANK}, bf16, "
          f"gradient checkpointing, {steps} steps (model load excluded; each side's caching included)")
    for quantized in configs:
        ref, ours = results[("reference", quantized)], results[("ours", quantized)]
        speed = ours["it_per_s"] / ref["it_per_s"]
        label = "8-bit base" if quantized else "bf16 base"
        print(f"  {label}: it/s reference {ref['it_per_s']:.3f}, ours {ours['it_per_s']:.3f} ({speed:.2f}x, target >= "
              f"{SPEED_TARGET}x); peak GiB reference {ref['peak_gib']:.1f}, ours {ours['peak_gib']:.1f}")
        record(f"FLUX.1 LoRA it/s at 1024 px, {label}: train_dreambooth_lora_flux loop vs ours", reference=ref["it_per_s"],
               ours=ours["it_per_s"], unit="it/s", better="higher", target=f">= {SPEED_TARGET}x", ok=speed >= SPEED_TARGET)
        fits = ours["peak_gib"] <= MEMORY_TARGET_GIB if quantized else None
        record(f"FLUX.1 LoRA peak GPU memory at 1024 px, {label}", reference=ref["peak_gib"], ours=ours["peak_gib"], unit="GiB",
               better="lower", target=f"ours <= {MEMORY_TARGET_GIB:.0f} GiB" if quantized else "", ok=fits)
        ok = ok and speed >= SPEED_TARGET and fits is not False
    return 0 if ok else 1


if __name__ == "__main__":
    code = main()
    emit()
    sys.exit(code)
