"""What the torch benchmarks (train_lora, train_flux, diffusers_batching) share: their run-size
options and a quiet torch. One place, so that the three agree on what --quick means."""

from __future__ import annotations

import argparse


def add_run_size_arguments(parser: argparse.ArgumentParser, *, images_help: str, threads_default: int | None = 1) -> None:
    """--quick, --steps, --repeats, --images and --threads, with the defaults each bench states in its help."""
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--steps", type=int, help="steps per run (default 32, quick 16)")
    parser.add_argument("--repeats", type=int, help="timed runs per side (default 5, quick 3)")
    parser.add_argument("--images", type=int, help=images_help)
    parser.add_argument("--threads", type=int, default=threads_default,
                        help="torch intra-op threads" + (f" (default {threads_default})" if threads_default else
                                                         " (default: torch's own)"))


def quiet_torch(threads: int | None) -> None:
    """Set torch's thread count (None leaves torch's default) and silence diffusers' and transformers'
    per-load notices and progress bars, which drown a benchmark's table."""
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    if threads:
        torch.set_num_threads(threads)
    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()
