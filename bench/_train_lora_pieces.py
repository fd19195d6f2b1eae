"""A diagnostic, not a benchmark (run_all skips it): where a LoRA step's time goes, ours (peft adapter via load_frozen_model_with_lora,
accelerate-prepared, as train_unet_lora runs it) against bench/train_lora.py's kohya-style modules,
on the same cached inputs: noise and timesteps, UNet forward, loss, backward, AdamW step and
zero_grad timed with perf_counter, the two sides alternated step by step in one process, one
torch thread. Medians per piece, the first two steps of each side dropped.

    python bench/_train_lora_pieces.py [bench|sd15] [steps per side, default 20]
"""
import sys, time, statistics, hashlib, json, tempfile
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent)); sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch, torch.nn.functional as F
torch.set_num_threads(1)
import train_lora as B
from _torch_bench import quiet_torch
quiet_torch(1)
name = sys.argv[1] if len(sys.argv) > 1 else "bench"
config = B.MODELS[name]
digest = hashlib.sha256(json.dumps([config, B.RESOLUTION], sort_keys=True).encode()).hexdigest()[:12]
base = str(B.build_bench_sd(Path(tempfile.gettempdir()) / f"persona-bench-sd-{digest}", config=config))
from diffusers import UNet2DConditionModel, DDPMScheduler
from persona_pipeline.training.lora import load_frozen_model_with_lora, LORA_TARGET_MODULES
from accelerate import Accelerator
torch.manual_seed(0)
m = load_frozen_model_with_lora(base, B.RANK, float(B.RANK))
ours = m.unet
acc = Accelerator(cpu=True, mixed_precision="no")
opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4)
ours_p, opt_o = acc.prepare(ours, opt_o)
k = UNet2DConditionModel.from_pretrained(base, subfolder="unet"); k.requires_grad_(False)
mods = [B.KohyaLoRA("x"+n, mod, B.RANK, B.RANK) for n, mod in k.named_modules()
        if isinstance(mod, torch.nn.Linear) and any(n.endswith(t) for t in LORA_TARGET_MODULES)]
opt_k = torch.optim.AdamW([p for mm in mods for p in mm.parameters()], lr=1e-4)
print("lora layers", len(mods), "trainable ours", sum(p.numel() for p in ours.parameters() if p.requires_grad),
      "kohya", sum(p.numel() for mm in mods for p in mm.parameters()))
print("ours unet type", type(ours_p).__name__, "attn proc", type(next(iter(ours.attn_processors.values()))).__name__,
      type(next(iter(k.attn_processors.values()))).__name__)
ours.train(); k.train()
sched = m.noise_scheduler
lat = torch.randn(2, 4, B.RESOLUTION // 8, B.RESOLUTION // 8)
hid = torch.randn(2, 77, config["text_hidden"])
T = {}
def t(key, t0):
    now = time.perf_counter(); T.setdefault(key, []).append(now - t0); return now
def step(side, unet, opt, backward):
    t0 = time.perf_counter()
    noise = torch.randn_like(lat); ts = torch.randint(0, 1000, (2,)).long()
    noisy = sched.add_noise(lat, noise, ts)
    t0 = t(side + " prep", t0)
    pred = unet(noisy, ts, hid, return_dict=False)[0]
    t0 = t(side + " forward", t0)
    loss = F.mse_loss(pred.float(), noise.float())
    t0 = t(side + " loss", t0)
    backward(loss)
    t0 = t(side + " backward", t0)
    opt.step()
    t0 = t(side + " opt.step", t0)
    opt.zero_grad()
    t0 = t(side + " zero_grad", t0)
    loss.item()
for i in range(int(sys.argv[2]) if len(sys.argv) > 2 else 20):
    for side in (("ours", "kohya") if i % 2 else ("kohya", "ours")):
        if side == "ours": step("ours", ours_p, opt_o, acc.backward)
        else: step("kohya", k, opt_k, lambda l: l.backward())
for key in sorted(T):
    v = T[key][2:]
    print(f"{key:20s} median {statistics.median(v)*1000:8.2f} ms  min {min(v)*1000:8.2f}")
for side in ("ours", "kohya"):
    print(side, "sum of medians", round(sum(statistics.median(T[k][2:]) for k in T if k.startswith(side))*1000, 1), "ms")
