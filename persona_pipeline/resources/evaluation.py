"""The identity and promotion resources: which identity embedder the assets use (with
PERSONA_FACE_MODEL set, the ONNX face embedder and detector, otherwise open_clip), and the promotion
rule's tolerances for new LoRA versions."""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg

from persona_pipeline.identity import ClipIdentity, IdentityEmbedder, OnnxFaceIdentity


class FaceModel(dg.ConfigurableResource):
    model_path: str = ""
    detector_path: str = ""

    @property
    def configured(self) -> bool:
        return bool(self.model_path)

    def identity(self, clip, without: Sequence[str] = ()) -> IdentityEmbedder:
        """The face embedder when configured (a wrong path raises FaceModelError naming the setting),
        else identity by `clip`, with `without`'s directions taken out (ClipIdentity)."""
        if not self.model_path:
            return ClipIdentity(clip, without)
        return OnnxFaceIdentity(self.model_path, self.detector_path)


class PromotionRules(dg.ConfigurableResource):
    """When a new LoRA version replaces the primary (persona_pipeline/domain/promotion.py): how far its
    identity and its prompt alignment on the evaluation set may fall below the primary's."""

    identity_tolerance: float = 0.0
    alignment_tolerance: float = 0.02
