"""Offline captioner for training photos: open_clip zero-shot over fixed vocabularies.

Each photo gets the vocabulary phrase closest to it for framing, pose, background and lighting.
On the tiny random preset the choices are noise; on real weights they are meaningful. Clothing is
left empty (see `persona_pipeline.domain.training_captions`).
"""

from __future__ import annotations

from pathlib import Path


from persona_pipeline.domain.training_captions import FIELD_NAMES, VOCABULARIES, CaptionFields
from persona_pipeline.resources.clip import ClipModel

PROMPT_TEMPLATE = "a photo of a person, {phrase}"


class ClipCaptioner:
    """Zero-shot caption fields from a `ClipModel`."""

    def __init__(self, clip: ClipModel, vocabularies: dict[str, list[str]] | None = None) -> None:
        self.clip = clip
        self.vocabularies = vocabularies or VOCABULARIES

    @property
    def name(self) -> str:
        return f"clip:{self.clip.model_name}"

    def caption_fields(self, paths: list[Path], *, trigger_word: str = "", class_word: str = "") -> list[CaptionFields]:
        """One `CaptionFields` per photo, in order. `trigger_word`/`class_word` are accepted so that
        this and `GeminiClient.caption_fields` are called alike; zero-shot does not need them."""
        import numpy as np

        if not paths:
            return []
        images = self.clip.embed_images(list(paths))
        fields: dict[str, list[str]] = {name: [""] * len(paths) for name in FIELD_NAMES}
        # Embed every vocabulary in one call per batch of photos, then argmax cosine per field.
        names = [name for name in FIELD_NAMES if self.vocabularies.get(name)]
        phrases = [phrase for name in names for phrase in self.vocabularies[name]]
        texts = self.clip.embed_texts([PROMPT_TEMPLATE.format(phrase=p) for p in phrases])
        start = 0
        for name in names:
            vocab = self.vocabularies[name]
            scores = images @ texts[start:start + len(vocab)].T
            fields[name] = [vocab[i] for i in np.argmax(scores, axis=1)]
            start += len(vocab)
        return [CaptionFields(**{name: fields[name][i] for name in FIELD_NAMES}) for i in range(len(paths))]
