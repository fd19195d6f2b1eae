"""`persona-pipeline world train`: train the world's text-to-image and CLIP models into one folder
with a manifest. torch is imported inside the command, so the rest of the CLI stays fast.

The defaults are sized for the issue's budget, about an hour on the 2-core machine at 64 px (see
docs/world.md for the measured time per step); `--steps` scales the UNet, the part that matters most.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from persona_pipeline.world.commands import positive_int


def tower(text: str) -> tuple[int, int]:
    """'LAYERSxWIDTH' (e.g. 4x128), for argparse; the width must split into 32-wide heads."""
    try:
        layers, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LAYERSxWIDTH, e.g. 4x128") from None
    if layers < 1 or width < 32 or width % 32:
        raise argparse.ArgumentTypeError(f"{text}: needs at least 1 layer and a width that is a multiple of 32")
    return layers, width


def share(text: str) -> float:
    """A number from 0 to 1, for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value

# About 45 minutes here, one thread: VAE 3000 x 0.16 s, UNet 3000 x 0.64 s, CLIP 1500 x 0.2 s (the committed run's
# manifest; the committed weights are this run plus `--resume-from` it for 3000 more UNet steps, docs/world.md).
DEFAULTS = dict(seed=0, steps=3000, vae_steps=3000, clip_steps=1500, resolution=64)


def cmd_world_train(args: argparse.Namespace) -> int:
    import torch

    from persona_pipeline.world.train_clip import ClipSettings
    from persona_pipeline.world.train_sd import SdSettings
    from persona_pipeline.world.world_models import train_world_models

    torch.set_num_threads(args.threads)  # the machine is shared; one thread is also what makes timings comparable
    sd = SdSettings(resolution=args.resolution, seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.steps,
                    batch_size=args.batch_size, log_every=args.log_every, snapshot_every=args.snapshot_every or 0,
                    snapshot_dir=str(snapshot_dir(Path(args.out))), caption_variety=args.caption_variety)
    tower = {} if args.clip_tower is None else {"vision_layers": args.clip_tower[0], "vision_width": args.clip_tower[1]}
    clip = ClipSettings(seed=args.seed, steps=args.clip_steps, log_every=args.log_every, **tower)
    command = " ".join(shlex.quote(a) for a in ["persona-pipeline", *sys.argv[1:]]) if args.command_line is None else args.command_line
    resume = Path(args.resume_from) if args.resume_from else None
    if resume is not None and resume.resolve() == Path(args.out).resolve():
        raise SystemExit(f"--resume-from {resume} is the output folder; write the continued run to another folder")
    if args.clip_only and resume is None:
        raise SystemExit("--clip-only keeps the sd/ of a world-models folder: name it with --resume-from DIR")
    manifest = train_world_models(Path(args.out), sd, clip, command=command, progress=lambda line: print(line, flush=True),
                                  resume_from=resume, clip_only=args.clip_only)
    m = manifest["metrics"]
    print(f"wrote {args.out}: unet held-out loss {m['unet_eval_loss_before']:.4f} -> {m['unet_eval_loss_after']:.4f}, "
          f"vae PSNR {m['vae_psnr_db']:.1f} dB, clip zero-shot scene {m['clip_zero_shot_scene_after']:.0%}, "
          f"{m['total_seconds']:.0f} s")
    return 0


def snapshot_dir(out: Path) -> Path:
    """Beside the output folder, never in it: the manifest covers every file in `out`."""
    return out.with_name(out.name + "-snapshots")


def register(world_subparsers) -> None:
    """Add `world train` to the `world` command group's subcommands."""
    train = world_subparsers.add_parser(
        "train", help="train the world's tiny SD model (VAE, text encoder, UNet) and CLIP model, with a manifest")
    train.add_argument("--out", required=True, help="folder to write sd/, clip/ and manifest.json into")
    train.add_argument("--steps", type=positive_int, default=DEFAULTS["steps"], help=f"UNet steps (default {DEFAULTS['steps']})")
    train.add_argument("--vae-steps", type=positive_int, default=DEFAULTS["vae_steps"])
    train.add_argument("--clip-steps", type=positive_int, default=DEFAULTS["clip_steps"])
    train.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    train.add_argument("--resolution", type=int, choices=(64, 96), default=DEFAULTS["resolution"],
                       help="image side in px (default 64: 2.7x faster per step than 96, measured)")
    train.add_argument("--batch-size", type=positive_int, default=32, help="UNet batch (default 32)")
    train.add_argument("--log-every", type=positive_int, default=25, help="print progress every N steps")
    train.add_argument("--resume-from", metavar="DIR", default=None,
                       help="continue the text encoder and UNet of a world-models folder for --steps more steps (its "
                            "tokenizer, VAE and CLIP model are kept; the manifest records the run it continued)")
    train.add_argument("--clip-tower", type=tower, default=None, metavar="LAYERSxWIDTH",
                       help="the CLIP model's image tower (default 2x64, the committed model's; docs/world.md measures 4x128)")
    train.add_argument("--clip-only", action="store_true",
                       help="with --resume-from: keep its sd/ as it is and train a new CLIP model (--clip-steps)")
    train.add_argument("--snapshot-every", type=positive_int, default=None,
                       help="also save the SD pipeline every N UNet steps in OUT-snapshots/ (to measure a run as it goes)")
    train.add_argument("--caption-variety", type=share, default=0.0, metavar="SHARE",
                       help="share of UNet captions written in a prompt's shapes: parts left out, 'photo of' in front "
                            "(default 0, as the committed weights were trained; docs/world.md measures 0.5 and 0.75)")
    train.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    train.add_argument("--command-line", default=None, help=argparse.SUPPRESS)  # tests record a stable command
    train.set_defaults(func=cmd_world_train)
