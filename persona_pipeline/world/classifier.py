"""The world's attribute classifier: a small CNN with one head per measured attribute (hair colour,
hair style, jacket colour, scarf colour, scene), trained on rendered world images by
`persona-pipeline world train-classifier` (classifier_training.py). It is the measuring tool of
issue 21: quality figures come from what it reads in an image, checked first against the world's
own labels on held-out images.

The committed weights sit next to a manifest (seed, steps, data hash, command, held-out accuracy,
the weights' sha256); the loader refuses a missing or unreadable weight file and a manifest whose
hash does not match, naming the file and the command that rebuilds it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from persona_pipeline.fileio import sha256_file
from persona_pipeline.world.attributes import HAIR_COLOURS, HAIR_STYLES, JACKET_COLOURS, SCARF_CHOICES, SCENES
from persona_pipeline.world.classifier_config import INPUT_SIZE, MANIFEST_FILE, REBUILD_COMMAND, WEIGHTS_DIR, WEIGHTS_FILE
from persona_pipeline.world.model_manifest import WorldWeightsError

# head -> classes, in the order of the head's outputs.
HEADS: dict[str, tuple[str, ...]] = {
    "hair_colour": tuple(HAIR_COLOURS), "hair_style": tuple(HAIR_STYLES), "jacket_colour": tuple(JACKET_COLOURS),
    "scarf_colour": SCARF_CHOICES, "scene": SCENES,
}


class AttributeNet(nn.Module):
    """A stride-2 stem and three conv blocks (64 -> 4 px), a shared dense layer, one linear head per
    attribute. The dense layer sees the 4x4 map, not a global average, so where a colour sits (hair
    above the face, scarf under it) survives to the heads. Sized for one CPU thread: a training
    step of 64 images takes about 0.15 s here."""

    def __init__(self, heads: dict[str, Sequence[str]] = HEADS, channels: Sequence[int] = (24, 48, 64, 96)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(channels[0]),
                                   nn.ReLU(inplace=True)]
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.shared = nn.Sequential(nn.Flatten(), nn.Linear(channels[-1] * 16, 128), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(classes)) for name, classes in heads.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        shared = self.shared(self.features(x))
        return {name: head(shared) for name, head in self.heads.items()}


def to_array(image: Image.Image, size: int = INPUT_SIZE) -> np.ndarray:
    """An image as uint8 RGB, size x size x 3, box-resized (any input size is accepted)."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8)


def to_tensor(images: Sequence[Image.Image], size: int = INPUT_SIZE) -> torch.Tensor:
    """RGB images as a float batch in [0, 1] (N x 3 x size x size)."""
    return torch.from_numpy(np.stack([to_array(image, size) for image in images])).permute(0, 3, 1, 2).float().div_(255.0)


@dataclass
class AttributeClassifier:
    net: AttributeNet
    manifest: dict

    @property
    def input_size(self) -> int:
        return int(self.manifest.get("input_size", INPUT_SIZE))

    @torch.no_grad()
    def predict(self, images: Sequence[Image.Image], batch_size: int = 256) -> list[dict[str, str]]:
        """Per image, the most likely class of every head."""
        self.net.eval()
        out: list[dict[str, str]] = []
        for start in range(0, len(images), batch_size):
            logits = self.net(to_tensor(images[start:start + batch_size], self.input_size))
            picks = {name: logits[name].argmax(dim=1).tolist() for name in HEADS}
            out += [{name: HEADS[name][picks[name][i]] for name in HEADS} for i in range(len(picks["scene"]))]
        return out


def accuracy(predicted: Sequence[dict[str, str]], labels: Sequence[dict[str, str]]) -> dict[str, float]:
    """Per head, the fraction of images whose prediction equals the label."""
    return {name: sum(p[name] == l[name] for p, l in zip(predicted, labels)) / max(1, len(labels)) for name in HEADS}


def load_classifier(folder: Path = WEIGHTS_DIR) -> AttributeClassifier:
    """The classifier in `folder` (the committed one by default), checked against its manifest."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights, manifest_path = Path(folder) / WEIGHTS_FILE, Path(folder) / MANIFEST_FILE
    fix = f"rebuild it with `{REBUILD_COMMAND}`"
    for path in (weights, manifest_path):
        if not path.is_file():
            raise WorldWeightsError(f"{path} is missing; {fix}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        expected = manifest["weights_sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise WorldWeightsError(f"{manifest_path} is not a classifier manifest ({exc}); {fix}") from None
    actual = sha256_file(weights)
    if actual != expected:
        raise WorldWeightsError(f"{weights} has sha256 {actual} but {manifest_path} says {expected}: "
                              f"refused (weights and manifest are from different builds); {fix}")
    if manifest.get("heads") != {name: list(classes) for name, classes in HEADS.items()}:
        raise WorldWeightsError(f"{manifest_path} names other classes than the world's vocabulary (it changed since "
                              f"training); {fix}")
    net = AttributeNet()
    try:
        net.load_state_dict(load_file(str(weights)))
    except (SafetensorError, RuntimeError, OSError, ValueError) as exc:
        raise WorldWeightsError(f"{weights} is corrupt or not this classifier's weights ({str(exc).splitlines()[0]}); {fix}") from None
    net.eval()
    return AttributeClassifier(net, manifest)
