"""`persona-pipeline world ...`: write world images with their captions, train the attribute
classifier. The heavy imports (torch) happen inside the commands, so the rest of the CLI stays fast."""

from __future__ import annotations

import argparse
from pathlib import Path


def positive_int(text: str) -> int:
    """argparse type: a whole number of 1 or more (the CLI's one such check)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return int(text)


def cmd_world_data(args: argparse.Namespace) -> int:
    from persona_pipeline.world.dataset import write_world_dataset

    written = write_world_dataset(Path(args.out), args.count, args.seed, split=args.split, size=args.size)
    print(f"wrote {len(written)} images with captions and labels.jsonl to {args.out} "
          f"(seed {args.seed}, {args.split} split, {args.size} px)")
    return 0


def cmd_world_train_classifier(args: argparse.Namespace) -> int:
    from persona_pipeline.world.classifier_training import train_classifier

    train_classifier(Path(args.out), seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                     train_count=args.train_count, heldout_count=args.heldout_count, learning_rate=args.learning_rate,
                     progress=lambda line: print(line, flush=True))
    return 0


def register(subparsers) -> None:
    """Add `world data` and `world train-classifier` to the CLI's subcommands."""
    from persona_pipeline.world.classifier_config import TRAINING_DEFAULTS as DEFAULTS, WEIGHTS_DIR

    world = subparsers.add_parser("world", help="the procedural world: captioned images, the attribute classifier")
    world_sub = world.add_subparsers(dest="world_command", required=True)
    data = world_sub.add_parser("data", help="write world images (PNG), their captions (.txt) and labels.jsonl")
    data.add_argument("--out", required=True, help="folder to write into")
    data.add_argument("--count", type=positive_int, default=1000, help="images to write (default 1000)")
    data.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    data.add_argument("--split", choices=("train", "heldout"), default="train", help="which of the seed's streams (default train)")
    data.add_argument("--size", type=positive_int, default=96, help="image side in px (default 96)")
    data.set_defaults(func=cmd_world_data)
    train = world_sub.add_parser("train-classifier", help="train the attribute classifier on world images (deterministic)")
    train.add_argument("--out", default=str(WEIGHTS_DIR), help="folder for the weights and manifest (default: the committed ones)")
    train.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    train.add_argument("--steps", type=positive_int, default=DEFAULTS["steps"])
    train.add_argument("--batch-size", type=positive_int, default=DEFAULTS["batch_size"])
    train.add_argument("--train-count", type=positive_int, default=DEFAULTS["train_count"], help="training images rendered")
    train.add_argument("--heldout-count", type=positive_int, default=DEFAULTS["heldout_count"], help="held-out images measured")
    train.add_argument("--learning-rate", type=float, default=DEFAULTS["learning_rate"])
    train.set_defaults(func=cmd_world_train_classifier)
    from persona_pipeline.world import train_commands  # `world train`: the world's SD and CLIP models

    train_commands.register(world_sub)
