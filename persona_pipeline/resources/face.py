"""The face model resource: which identity embedder the assets use. With PERSONA_FACE_MODEL set it
is the ONNX face embedder (and detector), otherwise the open_clip model the assets already have."""

from __future__ import annotations

import dagster as dg

from persona_pipeline.identity import ClipIdentity, IdentityEmbedder, OnnxFaceIdentity


class FaceModel(dg.ConfigurableResource):
    model_path: str = ""
    detector_path: str = ""

    @property
    def configured(self) -> bool:
        return bool(self.model_path)

    def identity(self, clip) -> IdentityEmbedder:
        """The face embedder when configured (a wrong path raises FaceModelError naming the setting),
        else identity by `clip`."""
        if not self.model_path:
            return ClipIdentity(clip)
        return OnnxFaceIdentity(self.model_path, self.detector_path)
