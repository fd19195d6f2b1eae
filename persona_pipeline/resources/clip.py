"""open_clip embeddings: `world` (the committed CLIP model trained on the world, docs/world.md), the
tiny random preset (scores are noise: shapes alone), or a real architecture with weights from a local
file (PERSONA_CLIP_PRETRAINED)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg

from persona_pipeline.training.tiny_models import register_tiny_clip

if TYPE_CHECKING:  # annotations only: imported where used, not when the code location loads
    import numpy as np

WORLD_CLIP_MODEL = "world"


class ClipModel(dg.ConfigurableResource):
    model_name: str = "tiny"
    pretrained: str = ""
    device: str = "cpu"

    @property
    def model_id(self) -> str:
        """What an embedding was made with: a change of model re-embeds the whole library."""
        if self.model_name == WORLD_CLIP_MODEL:
            from persona_pipeline.world.world_models import world_models_id

            return f"world:{world_models_id()}"
        return f"{self.model_name}:{self.pretrained or 'random'}"

    def embed_images(self, paths: list[Path], batch_size: int = 32) -> np.ndarray:
        """L2-normalised image embeddings, one row per path."""
        import numpy as np
        from PIL import Image
        import torch

        model, preprocess, _ = _load(self.model_name, self.pretrained, self.device)
        rows = []
        with torch.no_grad():
            for start in range(0, len(paths), batch_size):
                batch = []
                for path in paths[start:start + batch_size]:
                    with Image.open(path) as image:
                        batch.append(preprocess(image.convert("RGB")))
                features = model.encode_image(torch.stack(batch).to(self.device))
                rows.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.float32)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        model, _, tokenizer = _load(self.model_name, self.pretrained, self.device)
        with torch.no_grad():
            features = model.encode_text(tokenizer(texts).to(self.device))
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()

    def prompt_scores(self, paths: list[Path], prompt: str) -> list[float]:
        """Cosine similarity of each image to the prompt (CLIP score / 100)."""
        if not paths:
            return []
        images = self.embed_images(paths)
        text = self.embed_texts([prompt])[0]
        return [float(x) for x in images @ text]


@lru_cache(maxsize=2)
def _load(model_name: str, pretrained: str, device: str):
    import open_clip

    if model_name == WORLD_CLIP_MODEL:
        from persona_pipeline.world.model_manifest import COMMITTED_WORLD_MODELS
        from persona_pipeline.world.world_models import load_world_clip

        if pretrained:
            raise ValueError(f"PERSONA_CLIP_PRETRAINED={pretrained!r} does not apply to PERSONA_CLIP_MODEL=world "
                             "(its weights are the committed world models)")
        model, preprocess, tokenizer = load_world_clip(COMMITTED_WORLD_MODELS)
        return model.to(device), preprocess, tokenizer

    name = register_tiny_clip() if model_name == "tiny" else model_name
    if pretrained and Path(pretrained).suffix in {".safetensors", ".bin", ".pt", ".pth"} and not Path(pretrained).is_file():
        raise FileNotFoundError(f"PERSONA_CLIP_PRETRAINED={pretrained}: file not found")
    import torch

    # Random weights must be the same in every process (the docstring of tiny_models promises it):
    # captions, checks and checkpoint scores on the tiny model would otherwise change per run.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained or None, device=device)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name)
