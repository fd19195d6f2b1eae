"""Dataset enrichment and the flywheel, without Dagster (docs/dataset.md).

Enrichment edits each accepted source photo with an image-edit model, through the generation
backends' one protocol (generation/backends: FLUX.1 Kontext or Qwen-Image-Edit, on diffusers or
ComfyUI), by the persona's `enrichment.instructions`, N per photo, seeded. The flywheel takes the
approved winners and published posts. Every image is then judged the same way (`judge`): a blank or
wrong-size output, identity below the bound against the source photos' centroid, or a near duplicate
of an image already in the dataset is `dropped` with the reason; the rest wait `pending` for review.
Files go under the persona's folder in PERSONA_HOME (`dataset_candidates/`), never outside it.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from persona_pipeline.domain.generation_request import GenerationRequest, build_request
from persona_pipeline.domain.generation_params import WorkflowError
from persona_pipeline.fileio import entry_refusal
from persona_pipeline.generation.backends import GenerationBackend, ImageJob, ImageResult
from persona_pipeline.identity import IdentityReference
from persona_pipeline.persona_dataset import EnrichmentSettings
from persona_pipeline.training.families.edit_models import EditModel, EditStepError, edit_model_named, resolve_edit_model

if TYPE_CHECKING:
    import numpy as np

FOLDER = "dataset_candidates"  # under the persona's folder in PERSONA_HOME
BLANK_STD = 2.0  # an output whose pixels vary less than this (0-255) is blank


class EnrichmentError(ValueError):
    """Enrichment that cannot run (its settings, its edit model, the template); the message names the field."""


@dataclass(frozen=True)
class SourceImage:
    """An image already in the dataset (an accepted photo, or an accepted candidate)."""

    path: Path
    sha256: str
    caption: str
    relpath: str  # relative to the persona's folder


@dataclass(frozen=True)
class PlannedEdit:
    photo: SourceImage
    kind: str
    instruction: str
    seed: int
    index: int  # the photo's k-th edit

    @property
    def stem(self) -> str:
        return f"{self.photo.sha256[:16]}-{self.index}-{self.seed}"


@dataclass
class Judged:
    """One image's scores and verdict: status `pending` or `dropped` (with `reason`)."""

    identity: float | None = None
    nearest_sha256: str | None = None
    nearest_path: str | None = None
    nearest_cosine: float | None = None
    status: str = "pending"
    reason: str | None = None
    notes: list[str] = field(default_factory=list)


def plan_edits(photos: Sequence[SourceImage], settings: EnrichmentSettings) -> list[PlannedEdit]:
    """`per_photo` edits of each photo, each by a different instruction while there are enough,
    chosen and seeded from `settings.seed` and the photo's hash (the same plan on every run)."""
    plans = []
    count = len(settings.instructions)
    for photo in photos:
        rng = random.Random(f"{settings.seed}:{photo.sha256}")
        order = rng.sample(range(count), count)
        for k in range(settings.per_photo):
            instruction = settings.instructions[order[k % count]]
            seed = int(hashlib.sha256(f"{settings.seed}:{photo.sha256}:{k}".encode()).hexdigest()[:8], 16) % 2**31
            plans.append(PlannedEdit(photo, instruction.kind, instruction.text, seed, k))
    return plans


def edit_model_for(settings: EnrichmentSettings, family: Callable[[], str | None], base_model: str | None) -> tuple[EditModel, str]:
    """(edit model, diffusers weights): `model`, checked against `edit_model` when both are set, else
    the persona family's edit model. Refused, naming persona.yaml's field: a family without an edit
    model, a model that is not an edit model, a model of the other edit family."""
    template = edit_model_named(settings.edit_model).template if settings.edit_model else None
    try:
        return resolve_edit_model("enrichment", settings.model, template, None if settings.model or template else family(),
                                  base_model)
    except EditStepError as exc:
        raise EnrichmentError(str(exc).replace("edit step 'enrichment'", "persona.yaml enrichment")
                              .replace("template ", "edit_model's template ")) from None


def edit_request(template, settings: EnrichmentSettings, edit: EditModel, weights: str, plan: PlannedEdit,
                 negative_prompt: str, backend: GenerationBackend) -> GenerationRequest:
    from PIL import Image

    with Image.open(plan.photo.path) as image:
        size = image.size
    params = {"edit_model": edit.name, "model": weights, "checkpoint": settings.checkpoint or edit.comfyui_file,
              "instruction": plan.instruction, "steps": settings.steps, "cfg": settings.cfg, "sampler": settings.sampler,
              "scheduler": settings.scheduler, "width": settings.width, "height": settings.height, "denoise": 1.0,
              "control_strength": 0.65}
    return build_request(template, params, prompt=plan.instruction, negative_prompt=negative_prompt, seed=plan.seed,
                         parent_image=None, pose_image=None, loras=(), default_size=backend.default_size,
                         min_side=backend.min_side, step_position=1, input_image=str(plan.photo.path), input_size=size)


def run_edits(backend: GenerationBackend, jobs: Sequence[ImageJob]) -> dict[str, ImageResult]:
    """Every job on the backend, through the protocol; its result by job key."""
    try:
        prepared = [backend.prepare(job) for job in jobs]
    except WorkflowError as exc:
        raise EnrichmentError(f"persona.yaml enrichment: {exc}") from None
    results: dict[str, ImageResult] = {}
    lock = threading.Lock()

    def done(result: ImageResult) -> None:
        with lock:
            results[result.key] = result

    backend.run(prepared, done)
    return results


def output_refusal(path: Path, size: tuple[int, int] | None) -> str | None:
    """Why an edit's output cannot be a dataset image: unreadable, of another size than asked, or blank."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            got = image.size
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    except (OSError, ValueError) as exc:
        return f"the output {path.name} is not a readable image ({exc})"
    if size is not None and got != tuple(size):
        return f"wrong size: the edit returned {got[0]}x{got[1]}, {size[0]}x{size[1]} was asked"
    spread = float(pixels.std())
    if spread < BLANK_STD:
        return f"blank image (pixel standard deviation {spread:.2f} < {BLANK_STD:g})"
    return None


def judge(paths: Sequence[Path], refusals: Sequence[str | None], identity: IdentityReference, min_identity: float,
          embed: Callable[[list[Path]], np.ndarray], dataset: Sequence[SourceImage], duplicate_cosine: float) -> list[Judged]:
    """Score each image for identity against the source photos' centroid and for near duplication
    against the dataset (open_clip, as training_dataset's near_duplicates check); drop, with the
    reason, a refused output, a face-less one, identity below `min_identity`, a near duplicate."""
    import numpy as np

    verdicts = [Judged(status="dropped", reason=r) if r else Judged() for r in refusals]
    live = [i for i, v in enumerate(verdicts) if v.status == "pending"]
    if not live:
        return verdicts
    scores, found = identity.score([paths[i] for i in live])
    vectors = embed([paths[i] for i in live])
    known = embed([image.path for image in dataset]) if dataset else None
    for row, i in enumerate(live):
        verdict = verdicts[i]
        verdict.identity = scores[row]
        if known is not None:
            cosines = known @ vectors[row]
            best = int(np.argmax(cosines))
            verdict.nearest_sha256, verdict.nearest_path = dataset[best].sha256, dataset[best].relpath
            verdict.nearest_cosine = float(cosines[best])
        if not found[row]:
            verdict.status, verdict.reason = "dropped", f"no face found ({identity.method})"
        elif verdict.identity is None:
            verdict.status, verdict.reason = "dropped", "no identity reference (no source photo scored)"
        elif verdict.identity < min_identity:
            verdict.status, verdict.reason = "dropped", (f"identity {verdict.identity:.3f} is below {min_identity:g} "
                                                         f"({identity.method})")
        elif verdict.nearest_cosine is not None and verdict.nearest_cosine > duplicate_cosine:
            verdict.status, verdict.reason = "dropped", (f"near duplicate of {verdict.nearest_path} (cosine "
                                                         f"{verdict.nearest_cosine:.3f} > {duplicate_cosine:g})")
    return verdicts


def edit_caption(source_caption: str, plan: PlannedEdit) -> str:
    """The source photo's caption with the edit's instruction after it (editable in the review queue)."""
    return f"{source_caption}, {plan.instruction.rstrip('.')}"


def copy_in(persona_dir: Path, source: Path, origin: str, sha256: str) -> str:
    """A winner's or post's image copied to `dataset_candidates/<origin>/<sha>.png` under the persona's
    folder (so the dataset never depends on a file that is cleaned up later); its relative path."""
    relpath = f"{FOLDER}/{origin}/{sha256[:16]}{source.suffix.lower() or '.png'}"
    target = persona_dir / relpath
    refusal = entry_refusal(persona_dir, Path(relpath))
    if refusal:
        raise EnrichmentError(f"{target}: {refusal}")
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return relpath


def inside(persona_dir: Path, path: Path) -> str:
    """`path` relative to the persona's folder; refuses one outside it or reached through a link."""
    try:
        relpath = Path(path).resolve().relative_to(Path(persona_dir).resolve())
    except ValueError:
        raise EnrichmentError(f"{path} is outside the persona's folder {persona_dir}") from None
    refusal = entry_refusal(persona_dir, relpath)
    if refusal:
        raise EnrichmentError(f"{path}: {refusal}")
    return relpath.as_posix()
