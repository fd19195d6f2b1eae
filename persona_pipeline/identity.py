"""Identity embeddings: one protocol, two backends. With a face model configured, identity is the
cosine between ArcFace-style face embeddings (a face detector crops the face first, both ONNX run
by onnxruntime); otherwise it is the open_clip image embedding, which sees the whole picture
(clothes, background, light) and so only approximates "the same person".

An image in which the detector finds no face has no identity vector: its score is None and the
caller records the reason (`NO_FACE`), never a made-up number. No Dagster here; onnxruntime is
imported lazily (it is the optional `face` extra)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol, Sequence, TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: imported where used, not when the code location loads
    import numpy as np


NO_FACE = "no face found"
# A detector row counts as a face from this score up (the documented detector contract, docs/training.md).
FACE_MIN_SCORE = 0.5


class FaceModelError(ValueError):
    """A configured face model that cannot be used: the message names the setting and the path."""


@dataclass(frozen=True)
class IdentityEmbeddings:
    """One L2-normalised row per image; `found[i]` False = no face (the row is zeros)."""

    vectors: np.ndarray
    found: np.ndarray
    method: str

    def centroid(self) -> np.ndarray | None:
        """The normalised mean of the rows that have a face (None when none has)."""
        import numpy as np

        if not self.found.any():
            return None
        mean = self.vectors[self.found].mean(axis=0)
        norm = float(np.linalg.norm(mean))
        return mean / norm if norm > 0 else None

    def similarity(self, reference: np.ndarray | None) -> list[float | None]:
        """Cosine of each row to `reference`; None where there is no face or no reference."""
        if reference is None:
            return [None] * len(self.found)
        return [float(v @ reference) if ok else None for v, ok in zip(self.vectors, self.found)]

    @property
    def missing(self) -> int:
        return int((~self.found).sum())


class IdentityEmbedder(Protocol):
    """What identity scoring needs: `method` says which model made the vectors (it goes into metadata)."""

    method: str
    face: bool

    def embed(self, paths: list[Path]) -> IdentityEmbeddings: ...


@dataclass
class IdentityReference:
    """The embedder identity is scored with, the source photos' centroid in its space, and what
    the metadata must warn about (a face model that found no face)."""

    embedder: IdentityEmbedder
    centroid: np.ndarray | None
    warnings: list[str]

    @property
    def method(self) -> str:
        return self.embedder.method

    def score(self, paths: list[Path]) -> tuple[list[float | None], np.ndarray]:
        """Similarity of each image to the centroid (None: no face, or no reference) and the found mask;
        a face-less image is counted for the warning."""
        embedded = self.embedder.embed(paths)
        if embedded.missing:
            self.warnings.append(f"face model configured, but {NO_FACE} in {embedded.missing} of "
                                 f"{len(paths)} image(s); those have no identity score")
        return embedded.similarity(self.centroid), embedded.found

    def warning(self) -> str | None:
        return "; ".join(self.warnings) or None

    @property
    def digest(self) -> str:
        """A short hash of the centroid: scores against another reference (another persona's photos,
        a changed photo set) do not compare, so evaluations keyed by it are not reused across them."""
        if self.centroid is None:
            return "none"
        import hashlib

        import numpy as np

        rounded = np.round(np.asarray(self.centroid, dtype=np.float64), 5) + 0.0  # + 0.0: no -0.0 bytes
        return hashlib.sha256(rounded.tobytes()).hexdigest()[:16]


def reference_for(embedder: IdentityEmbedder, fallback: IdentityEmbedder, photo_paths: list[Path]) -> IdentityReference:
    """Identity against the persona's source photos. A face model that finds no face in any of them
    cannot score anything: identity falls back to `fallback` (open_clip), with a warning."""
    if not photo_paths:
        return IdentityReference(embedder, None, [])
    centroid = embedder.embed(photo_paths).centroid()
    if centroid is None and embedder.face:
        note = (f"face model configured, but {NO_FACE} in any of the {len(photo_paths)} source photo(s); "
                f"identity falls back to {fallback.method}")
        return IdentityReference(fallback, fallback.embed(photo_paths).centroid(), [note])
    return IdentityReference(embedder, centroid, [])


class ClipIdentity:
    """Identity from an open_clip model (anything with `embed_images`, `embed_texts` and `model_id`).

    `without`: texts (a persona's themes, the places its prompts vary) whose directions are taken out
    of every image embedding before it is compared, so identity compares the persona rather than the
    setting: the whole-picture embedding otherwise rates two images of the same scene alike, whoever
    is in them (docs/world.md measures it)."""

    face = False

    def __init__(self, clip, without: Sequence[str] = ()) -> None:
        self.clip = clip
        self.without = tuple(dict.fromkeys(without))  # each text once, in order
        self.method = f"clip:{clip.model_id}" + (f" without {len(self.without)} theme(s)" if self.without else "")
        self._directions = None

    def embed(self, paths: list[Path]) -> IdentityEmbeddings:
        import numpy as np

        vectors = self.clip.embed_images(paths) if paths else np.zeros((0, 0), dtype=np.float32)
        if self.without and len(paths):
            if self._directions is None:
                self._directions = self.clip.embed_texts(list(self.without))
            vectors = project_off(vectors, self._directions)
        return IdentityEmbeddings(vectors, np.ones(len(paths), dtype=bool), self.method)


def project_off(vectors: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """`vectors` (rows) with their components along the span of `directions` (rows) removed, each row
    normalised again. A row that lay wholly in the span keeps its zero vector (it scores 0)."""
    import numpy as np

    basis, _ = np.linalg.qr(np.asarray(directions, dtype=np.float64).T)
    rest = np.asarray(vectors, dtype=np.float64)
    rest = rest - (rest @ basis) @ basis.T
    norms = np.linalg.norm(rest, axis=1, keepdims=True)
    return (rest / np.where(norms > 1e-12, norms, 1.0)).astype(np.float32)


class OnnxFaceIdentity:
    """ArcFace-style embedder after a face detector, both ONNX files on local paths.

    Detector contract: one input `1×3×H×W` float32 RGB in [0, 1] (H, W read from the model; dynamic
    sizes get 320), one output of `N×5` (or `1×N×5`) rows `x1, y1, x2, y2, score` in coordinates
    relative to the image (0..1). The highest-scoring row ≥ FACE_MIN_SCORE is the face.
    Embedder contract (ArcFace / insightface): input `1×3×S×S` RGB as (pixel − 127.5) / 127.5
    (S from the model, 112 when dynamic), output `1×D`; the vector is L2-normalised here."""

    face = True

    def __init__(self, model_path: str, detector_path: str, model_setting: str = "PERSONA_FACE_MODEL",
                 detector_setting: str = "PERSONA_FACE_DETECTOR") -> None:
        if not detector_path:
            raise FaceModelError(f"{model_setting}={model_path} is set but {detector_setting} is empty: "
                                 "a face embedder needs a face detector to crop the face")
        self.model_path = _checked(model_setting, model_path)
        self.detector_path = _checked(detector_setting, detector_path)
        self.detector = _session(detector_setting, str(self.detector_path))
        self.model = _session(model_setting, str(self.model_path))
        self.method = f"face:{self.model_path.name}+{self.detector_path.name}"

    def embed(self, paths: list[Path]) -> IdentityEmbeddings:
        import numpy as np
        from PIL import Image

        rows, found = [], []
        for path in paths:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
            box = self.detect(rgb)
            found.append(box is not None)
            rows.append(self._embed_face(rgb.crop(box)) if box is not None else None)
        dim = next((len(r) for r in rows if r is not None), 0)
        vectors = np.stack([r if r is not None else np.zeros(dim, np.float32) for r in rows]) if rows and dim \
            else np.zeros((len(paths), dim), np.float32)
        return IdentityEmbeddings(vectors, np.array(found, dtype=bool), self.method)

    def detect(self, image: Image.Image) -> tuple[int, int, int, int] | None:
        """The pixel box of the best face in `image`, or None."""
        import numpy as np
        from PIL import Image

        height, width = _spatial(self.detector, 320)
        pixels = np.asarray(image.resize((width, height), Image.BILINEAR), dtype=np.float32) / 255.0
        feed = {self.detector.get_inputs()[0].name: pixels.transpose(2, 0, 1)[None]}
        boxes = np.asarray(self.detector.run(None, feed)[0], dtype=np.float32).reshape(-1, 5)
        boxes = boxes[np.isfinite(boxes).all(axis=1) & (boxes[:, 4] >= FACE_MIN_SCORE)]
        if not len(boxes):
            return None
        x1, y1, x2, y2, _ = boxes[int(np.argmax(boxes[:, 4]))]
        w, h = image.size
        left, top = int(np.clip(min(x1, x2), 0, 1) * w), int(np.clip(min(y1, y2), 0, 1) * h)
        right, bottom = int(np.ceil(np.clip(max(x1, x2), 0, 1) * w)), int(np.ceil(np.clip(max(y1, y2), 0, 1) * h))
        if right - left < 2 or bottom - top < 2:
            return None  # a degenerate box is no face to embed
        return left, top, right, bottom

    def _embed_face(self, face: Image.Image) -> np.ndarray:
        import numpy as np
        from PIL import Image

        height, width = _spatial(self.model, 112)
        pixels = (np.asarray(face.resize((width, height), Image.BILINEAR), dtype=np.float32) - 127.5) / 127.5
        vector = np.asarray(self.model.run(None, {self.model.get_inputs()[0].name: pixels.transpose(2, 0, 1)[None]})[0],
                            dtype=np.float32).reshape(-1)
        norm = float(np.linalg.norm(vector))
        return vector / norm if norm > 0 else vector


def _checked(setting: str, path: str) -> Path:
    """The file behind a face-model setting; a clear error naming the setting and path otherwise."""
    target = Path(path).expanduser()
    if not target.is_file():
        raise FaceModelError(f"{setting}={path}: no such file (give the path of an .onnx model)")
    return target


@lru_cache(maxsize=4)
def _session(setting: str, path: str):
    """An onnxruntime CPU session, once per file; a file that is not an ONNX model names its setting."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise FaceModelError(f"{setting}={path}: onnxruntime is not installed "
                             "(pip install 'persona-pipeline[face]')") from None
    try:
        return ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
        raise FaceModelError(f"{setting}={path}: not a usable ONNX model ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]})") from None


def _spatial(session, default: int) -> tuple[int, int]:
    """The model's fixed input height and width (`default` for dynamic axes)."""
    shape = session.get_inputs()[0].shape
    dims = [d if isinstance(d, int) and d > 0 else default for d in shape[-2:]]
    return dims[0], dims[1]


def identity_stats(values: list[float | None]) -> tuple[float, float]:
    """Mean and spread (population std) of identity scores. An image without a face counts as 0, no
    resemblance: a LoRA that loses the face must not win on the few faces it kept."""
    import numpy as np

    if not values:
        return 0.0, 0.0
    array = np.array([0.0 if v is None else v for v in values], dtype=np.float64)
    return float(array.mean()), float(array.std())
