"""A training dataset in kohya's layout, and its images as the VAE takes them.

The layout: `<repeats>_<trigger> <class>/` folders of images, each with a `.txt` caption beside
it, or a `dataset.toml` naming the subsets (image_dir, num_repeats, is_reg, flip_aug). Repeats are
the sampling weight of a subset; `is_reg` marks regularisation images (prior preservation).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path


from persona_pipeline.training.params import TrainingConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


@dataclass(frozen=True)
class DatasetItem:
    image: Path
    caption: str
    repeats: int
    is_reg: bool = False


@dataclass(frozen=True)
class KohyaDataset:
    items: list[DatasetItem]
    flip: bool = False


def read_kohya_dataset(dataset_dir: Path) -> KohyaDataset:
    """The subsets of a kohya dataset: from `dataset.toml` when there is one (image_dir, num_repeats,
    is_reg, flip_aug), else every `<repeats>_<trigger> <class>/` folder. Every image needs a caption."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise TrainingConfigError(f"{dataset_dir}: dataset folder not found")
    toml_path = dataset_dir / "dataset.toml"
    subsets: list[tuple[Path, int, bool]] = []
    flip = False
    if toml_path.is_file():
        try:
            config = tomllib.loads(toml_path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise TrainingConfigError(f"{toml_path}: invalid TOML: {exc}") from None
        flip = bool(config.get("general", {}).get("flip_aug", False))
        for dataset in config.get("datasets", []):
            flip = bool(dataset.get("flip_aug", flip))
            for subset in dataset.get("subsets", []):
                image_dir = Path(subset["image_dir"])
                if not image_dir.is_absolute():
                    image_dir = dataset_dir / image_dir
                subsets.append((image_dir, int(subset.get("num_repeats", 1)), bool(subset.get("is_reg", False))))
    else:
        for sub in sorted(p for p in dataset_dir.iterdir() if p.is_dir()):
            repeats_text, _, _ = sub.name.partition("_")
            if repeats_text.isdigit():
                subsets.append((sub, int(repeats_text), False))
    items = []
    for image_dir, repeats, is_reg in subsets:
        if not image_dir.is_dir():
            raise TrainingConfigError(f"{toml_path}: image_dir {image_dir} does not exist")
        for image in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            caption_file = image.with_suffix(".txt")
            if not caption_file.is_file():
                raise TrainingConfigError(f"{image}: caption file {caption_file.name} is missing")
            items.append(DatasetItem(image, caption_file.read_text(encoding="utf-8").strip(), repeats, is_reg))
    if not any(not item.is_reg for item in items):
        raise TrainingConfigError(f"{dataset_dir}: the dataset has no training images "
                                  "(no `<repeats>_<trigger> <class>/` folder with images)")
    return KohyaDataset(items=items, flip=flip)


def load_pixels(path: Path, resolution: int, size: tuple[int, int] | None = None):
    """Resize to cover `size` (width, height; default a `resolution` square), centre-crop, scale to
    [-1, 1], NCHW. Also returns the original (height, width) and the crop's (top, left), which SDXL
    is conditioned on."""
    from PIL import Image
    import numpy as np
    import torch

    width, height = size or (resolution, resolution)
    with Image.open(path) as image:
        image = image.convert("RGB")
        original = (image.height, image.width)
        scale = max(width / image.width, height / image.height)
        image = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
        left, top = (image.width - width) // 2, (image.height - height) // 2
        image = image.crop((left, top, left + width, top + height))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0), original, (top, left)


def vary_caption(caption: str, rng, *, shuffle: bool = False, keep_tokens: int = 1, dropout: float = 0.0) -> str:
    """One step's version of a caption, as kohya sd-scripts' `process_caption` makes it: the caption is
    comma-separated tags; the first `keep_tokens` stay in place, the others are shuffled (`shuffle`) and
    then each dropped with probability `dropout`. `rng` is a numpy Generator (the training loop's, so a
    resumed run draws the same captions). A caption with no options on comes back unchanged."""
    if not shuffle and dropout <= 0:
        return caption
    tags = [tag.strip() for tag in caption.strip().split(",")]
    fixed, flexible = tags[:keep_tokens], tags[keep_tokens:]
    if shuffle and flexible:
        flexible = [flexible[i] for i in rng.permutation(len(flexible))]
    if dropout > 0 and flexible:
        flexible = [tag for tag, draw in zip(flexible, rng.random(len(flexible))) if draw >= dropout]
    return ", ".join(fixed + flexible)


def dataset_trigger(dataset: KohyaDataset) -> str:
    """The trigger word: the first word of every training caption (training_dataset's blocking check makes it so)."""
    words = sorted({item.caption.split(",")[0].split()[0] if item.caption.split() else "" for item in dataset.items
                    if not item.is_reg})
    if len(words) != 1 or not words[0]:
        raise TrainingConfigError(f"training.trigger_embedding_lr needs every training caption to start with the same "
                                  f"trigger word; they start with {', '.join(repr(w) for w in words[:5])}")
    return words[0]
