"""World samples: (image, caption, labels), deterministic per (seed, split, index).

Each sample draws from its own random stream, named by the seed, the split and its index, so any
sample can be made alone (a test renders held-out sample 3 without the 3 before it) and the splits
never share a stream: the held-out split is the same seed's other stream, not a slice of training.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from persona_pipeline.world.attributes import Shot, sample_shot
from persona_pipeline.world.captions import world_caption
from persona_pipeline.world.render import render_shot

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class WorldSample:
    image: Image.Image
    caption: str
    labels: dict[str, str]
    shot: Shot


def world_shot(seed: int, index: int, split: str = "train") -> tuple[Shot, int]:
    """The shot of one sample and the seed its drawing uses."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    rng = random.Random(f"world:{seed}:{split}:{index}")
    shot = sample_shot(rng)
    return shot, rng.getrandbits(32)


def world_samples(n: int, seed: int, split: str = "train", size: int = 96, start: int = 0) -> Iterator[WorldSample]:
    """Samples `start` .. `start + n - 1` of the split, rendered at `size` px."""
    for index in range(start, start + n):
        shot, render_seed = world_shot(seed, index, split)
        yield WorldSample(render_shot(shot, size, render_seed), world_caption(shot), shot.labels(), shot)


def samples_digest(samples: Iterable[WorldSample]) -> str:
    """sha256 over every sample's pixels, size and caption: names a training set in a manifest."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(f"{sample.image.size}:{sample.caption}\0".encode())
        digest.update(sample.image.tobytes())
    return digest.hexdigest()


def write_world_dataset(folder: Path, n: int, seed: int, split: str = "train", size: int = 96) -> list[Path]:
    """`NNNNN.png` + `NNNNN.txt` (its caption) per sample, and `labels.jsonl` (file, caption, labels)
    for measuring; returns the image paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written, rows = [], []
    for index, sample in enumerate(world_samples(n, seed, split, size)):
        path = folder / f"{index:05d}.png"
        sample.image.save(path, format="PNG")
        path.with_suffix(".txt").write_text(sample.caption + "\n", encoding="utf-8")
        rows.append(json.dumps({"file": path.name, "caption": sample.caption, "labels": sample.labels}, sort_keys=True))
        written.append(path)
    (folder / "labels.jsonl").write_text("".join(row + "\n" for row in rows), encoding="utf-8")
    return written
