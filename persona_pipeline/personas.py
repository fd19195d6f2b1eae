"""The persona registry: `datasets/<slug>/persona.yaml` + `photos/`, validated with pydantic.

A bad file raises `PersonaFileError`, whose message names the file and the field.
"""

from __future__ import annotations

import hashlib
import os
import re
from datetime import date, time
from pathlib import Path
from time import time_ns
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from persona_pipeline.fileio import FolderScan, UnsafePath, entry_refusal, read_regular, scan_folder
from persona_pipeline.persona_formats import FormatSettings
from persona_pipeline.persona_dataset import EnrichmentSettings, FlywheelSettings
from persona_pipeline.persona_generation import GenerationSettings

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic"}
SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
WINDOW_RE = re.compile(r"^(\d{2}):(\d{2})-(\d{2}):(\d{2})$")


class PersonaFileError(ValueError):
    """persona.yaml could not be read or is invalid; the message names the file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Pillar(_Strict):
    name: str = Field(min_length=1, max_length=80)
    weight: int = Field(ge=0, le=100)
    priority: int = Field(default=3, ge=1, le=5)
    starts_on: date | None = None
    ends_on: date | None = None
    guidelines: str = ""
    prompt: str | None = None  # generation prompt; `{trigger}` and `{class_word}` are filled in
    target_posts_per_week: int | None = Field(default=None, ge=0, le=50)

    @model_validator(mode="after")
    def _window_order(self) -> "Pillar":
        if self.starts_on and self.ends_on and self.ends_on < self.starts_on:
            raise ValueError(f"ends_on {self.ends_on} is before starts_on {self.starts_on}")
        return self


class CaptionSettings(_Strict):
    tone: Literal["casual", "professional", "playful", "inspirational", "edgy"] = "casual"
    voice: list[str] = []
    topics: list[str] = []
    avoid_topics: list[str] = []
    examples: list[str] = []
    emoji: bool = True
    emoji_density: Literal["none", "low", "medium", "high"] = "low"
    length: Literal["short", "medium", "long"] = "short"
    # Used for posts until a caption model is configured; {pillar}, {guidelines}, {name} are filled.
    templates: list[str] = ["{guidelines}"]


class HashtagSettings(_Strict):
    """Hashtags by size: `broad` (large, general tags), `targets` (mid-size) and `niche` (small,
    specific); `size_mix` sets their shares in each post (domain/captions.select_hashtags)."""

    targets: list[str] = []
    broad: list[str] = []
    niche: list[str] = []
    avoid: list[str] = []
    size_mix: Literal["balanced", "niche_heavy", "broad_reach"] = "balanced"
    max_per_post: int = Field(default=5, ge=0, le=30)  # Instagram's limit since December 2025 is 5

    @field_validator("targets", "broad", "niche", "avoid")
    @classmethod
    def _normalise(cls, tags: list[str]) -> list[str]:
        out = []
        for tag in tags:
            clean = tag.strip().lstrip("#")
            if not clean or not re.fullmatch(r"\w+", clean):
                raise ValueError(f"hashtag {tag!r} must be letters, digits or underscores")
            out.append(clean)
        return out


class LearningConfig(_Strict):
    """Learning from the audience (domain/learning.py, docs/insights.md): off by default, and then the
    plan is exactly the configured weights' plan."""

    enabled: bool = False
    max_share_shift: float = Field(default=15, ge=0, le=100)  # ± points around each pillar's configured share
    pillar_bounds: dict[str, tuple[float, float]] = {}  # pillar -> [min %, max %], instead of the shift
    learn_hours: bool = True  # move slots to the best-performing hour inside the posting windows
    min_posts: int = Field(default=3, ge=1, le=10000)  # posts with insights before the shares and hours move
    half_life_days: float = Field(default=120, gt=0, le=3650)  # older posts count half after this
    seed: int = 0

    def settings(self) -> "learning.LearningSettings":
        from persona_pipeline.domain import learning

        return learning.LearningSettings(**self.model_dump())


class StrategySettings(_Strict):
    """How the posting strategy picks and spaces posts (domain/strategy.py, docs/posting.md#strategy)."""

    posts_per_week: float = Field(default=3, ge=0, le=50)  # the gap analysis plans for this rate
    weekly_cap: int = Field(default=5, ge=0, le=100)  # never more posts in any 7 days
    theme_spacing_days: float = Field(default=2, ge=0, le=60)
    theme_max_per_week: int = Field(default=3, ge=1, le=100)
    plan_ahead_days: int = Field(default=7, ge=1, le=60)  # scheduled_posts fills free slots this far ahead
    gap_horizon_days: int = Field(default=30, ge=1, le=365)
    learning: LearningConfig = LearningConfig()


class LibrarySettings(_Strict):
    """The content library: approved winners, and the source photos when `include_source_photos`."""

    include_source_photos: bool = False
    max_clusters: int = Field(default=20, ge=1, le=100)


class ScheduleSettings(_Strict):
    """When the persona's jobs run on their own: five-field cron expressions in the persona's
    timezone (docs/operations.md#schedules). `null` turns one off. Changing persona.yaml changes the schedule
    at the next minute, without a code change or a reload."""

    planning: str | None = "0 6 * * *"  # content_plan: prompts for the pillar gaps, themes in rotation
    generation: str | None = "30 6 * * *"  # candidates: runs for the planned prompts, open runs moved along
    posting: str | None = "0 7 * * *"  # the library job: library, clusters, gaps, scheduled posts, calendar
    report: str | None = "0 9 * * 1"  # weekly_report

    @field_validator("planning", "generation", "posting", "report")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        from persona_pipeline.domain.cron import CronError, parse_cron

        if value is None:
            return None
        try:
            return parse_cron(value).expression
        except CronError as exc:
            raise ValueError(str(exc)) from None


class InstagramAccount(_Strict):
    user_id: str = Field(min_length=1)
    token_env: str = Field(min_length=1, pattern=r"^[A-Z_][A-Z0-9_]*$")
    # The account's @name, which pages show instead of the numeric user id.
    username: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._]{1,30}$")


class RegularizationSettings(_Strict):
    """Class images from the base model without the LoRA, for prior preservation. 0 images = off."""

    images: int = Field(default=0, ge=0, le=1000)
    prompt: str = "photo of a {class_word}"
    repeats: int = Field(default=1, ge=1, le=100)
    seed: int = 0


class QualitySettings(_Strict):
    """Thresholds of the training set's quality checks (docs/training.md#dataset-quality-checks)."""

    blur_min_variance: float = Field(default=100.0, ge=0)
    duplicate_cosine: float = Field(default=0.95, gt=0, le=1)
    outlier_z: float = Field(default=3.5, gt=0, le=20)


class TrainingOverrides(_Strict):
    """Per-persona dataset and training settings; every unset training field takes the base
    model's preset (docs/training.md#training-presets)."""

    # Captions: a sidecar .txt next to the photo always wins; else `auto` uses Gemini when
    # GEMINI_API_KEY is set and open_clip zero-shot otherwise; `template` fills caption_template.
    captioner: Literal["auto", "gemini", "clip", "template"] = "auto"
    caption_template: str = "{trigger} {class_word}"
    repeats: int = Field(default=10, ge=1, le=100)
    min_photos: int = Field(default=10, ge=1, le=500)
    max_photos: int = Field(default=200, ge=1, le=5000)
    max_side: int = Field(default=1024, ge=256, le=4096)
    min_side: int = Field(default=256, ge=64, le=2048)
    # Off for characters whose look is asymmetric (a side parting, a scar, a logo).
    flip_augment: bool = True
    regularization: RegularizationSettings = RegularizationSettings()
    quality: QualitySettings = QualitySettings()
    rank: int | None = Field(default=None, ge=1, le=256)
    alpha: float | None = Field(default=None, gt=0, le=512)
    steps: int | None = Field(default=None, ge=1, le=100000)
    learning_rate: float | None = Field(default=None, gt=0, le=1e-2)
    batch_size: int | None = Field(default=None, ge=1, le=64)
    resolution: int | None = Field(default=None, ge=32, le=2048, multiple_of=8)
    optimizer: Literal["adamw", "adamw8bit"] | None = None
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] | None = None
    gradient_checkpointing: bool | None = None
    min_snr_gamma: float | None = Field(default=None, ge=0, le=20)
    noise_offset: float | None = Field(default=None, ge=0, le=1)
    prior_loss_weight: float | None = Field(default=None, ge=0, le=10)
    checkpoint_every: int | None = Field(default=None, ge=0, le=100000)
    text_encoder_lr: float | None = Field(default=None, ge=0, le=1e-2)
    trigger_embedding_lr: float | None = Field(default=None, ge=0, le=0.1)  # pivotal tuning (docs/training.md)
    # Caption variety (docs/training.md): kohya's shuffle_caption, keep_tokens, caption_tag_dropout_rate;
    # the dataset.toml that training_dataset writes for kohya carries the same values.
    shuffle_caption: bool | None = None
    keep_tokens: int | None = Field(default=None, ge=0, le=75)
    caption_tag_dropout_rate: float | None = Field(default=None, ge=0, le=1)
    # FLUX.1 only (docs/training.md#flux1); ranges are checked with the other settings (training/params.py).
    guidance: float | None = None
    timestep_sampling: Literal["logit_normal", "uniform"] | None = None
    max_sequence_length: int | None = None
    quantize_base: Literal["none", "int8", "fp8"] | None = None
    aspect_buckets: bool | None = None  # FLUX.1: each photo near its own shape (training/buckets.py)
    seed: int = 0
    # Checkpoint selection renders every checkpoint on these prompts and seeds.
    validation_prompts: list[str] = Field(default=[
        "photo of {trigger} {class_word}, close-up portrait",
        "photo of {trigger} {class_word} walking in a park, full-body shot",
    ], min_length=1, max_length=8)
    validation_seeds: list[int] = Field(default=[101, 202], min_length=1, max_length=8)

    @model_validator(mode="after")
    def _photo_range(self) -> "TrainingOverrides":
        if self.max_photos < self.min_photos:
            raise ValueError(f"max_photos {self.max_photos} is below min_photos {self.min_photos}")
        return self

    def param_overrides(self) -> dict:
        """The fields that override the preset's LoraTrainingParams."""
        return self.model_dump(include={"rank", "alpha", "steps", "learning_rate", "batch_size", "resolution", "optimizer",
                                        "mixed_precision", "gradient_checkpointing", "min_snr_gamma", "noise_offset",
                                        "prior_loss_weight", "checkpoint_every", "text_encoder_lr", "trigger_embedding_lr", "shuffle_caption",
                                        "keep_tokens", "caption_tag_dropout_rate", "guidance", "timestep_sampling",
                                        "max_sequence_length", "quantize_base", "aspect_buckets", "seed"})


class EvaluationSet(_Strict):
    """The fixed, seeded renders every new LoRA version is judged on (docs/training.md#evaluation-and-promotion):
    prompts × seeds, the same for the new version and the primary, so their scores compare."""

    prompts: list[str] = Field(default=[
        "photo of {trigger} {class_word}, close-up portrait, soft window light",
        "photo of {trigger} {class_word} walking in a city street, full-body shot",
        "photo of {trigger} {class_word} sitting in a cafe, smiling",
    ], min_length=1, max_length=12)
    seeds: list[int] = Field(default=[1001, 2002], min_length=1, max_length=8)

    @field_validator("prompts")
    @classmethod
    def _prompts_name_the_persona(cls, value: list[str]) -> list[str]:
        for prompt in value:
            if "{trigger}" not in prompt:
                raise ValueError(f"evaluation prompt {prompt!r} has no {{trigger}}: it would not test the LoRA")
        return value


class PersonaConfig(_Strict):
    name: str = Field(min_length=1)
    trigger_word: str = Field(min_length=2, max_length=40, pattern=r"^\S+$")
    class_word: str = Field(min_length=1, max_length=40)
    timezone: str = "UTC"
    posting_windows: list[str] = ["05:00-08:00", "10:00-15:00"]
    min_minutes_between_posts: int = Field(default=120, ge=1, le=7 * 24 * 60)
    pillars: list[Pillar] = Field(min_length=1)
    captions: CaptionSettings = CaptionSettings()
    hashtags: HashtagSettings = HashtagSettings()
    strategy: StrategySettings = StrategySettings()
    library: LibrarySettings = LibrarySettings()
    schedules: ScheduleSettings = ScheduleSettings()
    instagram: InstagramAccount | None = None
    formats: FormatSettings = FormatSettings()  # persona_formats.py
    training: TrainingOverrides = TrainingOverrides()
    generation: GenerationSettings = GenerationSettings()
    evaluation: EvaluationSet = EvaluationSet()
    enrichment: EnrichmentSettings = EnrichmentSettings()  # persona_dataset.py, docs/dataset.md
    flywheel: FlywheelSettings = FlywheelSettings()
    # This persona's base model (`tiny`, `tiny-flux`, `world`, a local folder or hub id); unset:
    # PERSONA_BASE_MODEL. `family` (sd15, sdxl, flux) says which family it must be: a base model of
    # another family is refused, naming both, before anything trains or draws.
    base_model: str | None = Field(default=None, min_length=1)
    family: str | None = None

    @field_validator("family")
    @classmethod
    def _registered_family(cls, value: str | None) -> str | None:
        from persona_pipeline.training.families import families

        names = [family.name for family in families()]
        if value is not None and value not in names:
            raise ValueError(f"unknown model family {value!r}; one of {', '.join(names)}")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {value!r}") from None
        return value

    @field_validator("posting_windows")
    @classmethod
    def _windows(cls, windows: list[str]) -> list[str]:
        if not windows:
            raise ValueError("at least one posting window is needed")
        for window in windows:
            parse_window(window)
        return windows

    @model_validator(mode="after")
    def _unique_pillars(self) -> "PersonaConfig":
        names = [p.name for p in self.pillars]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"pillar names must be unique; repeated: {', '.join(dupes)}")
        if sum(p.weight for p in self.pillars) <= 0:
            raise ValueError("pillar weights sum to 0")
        unknown = sorted(set(self.generation.themes) - set(names))
        if unknown:
            raise ValueError(f"generation.themes names unknown pillars: {', '.join(unknown)}")
        from persona_pipeline.domain.learning import share_bounds  # the one bounds rule

        share_bounds({p.name: p.weight for p in self.pillars}, self.strategy.learning.settings())
        return self

    def account_name(self, account: str) -> str:
        """What pages call a post's account (posts.account holds an Instagram user id or
        outbox:<slug>): its @username, never the id."""
        if self.instagram and account == self.instagram.user_id:
            return f"@{self.instagram.username}" if self.instagram.username else f"{self.name} on Instagram"
        if account.startswith("outbox:"):
            return f"{self.name} (outbox)"
        return f"{self.name}, an earlier account"

    def windows(self) -> list[tuple[time, time]]:
        return [parse_window(w) for w in self.posting_windows]

    def pillar_prompt(self, pillar: Pillar) -> str:
        template = pillar.prompt or "photo of {trigger} {class_word}, {pillar}"
        return template.format(trigger=self.trigger_word, class_word=self.class_word, pillar=pillar.name)


def parse_window(window: str) -> tuple[time, time]:
    """'HH:MM-HH:MM' in the persona's local time; '24:00' is allowed as an end."""
    match = WINDOW_RE.match(window.strip())
    if not match:
        raise ValueError(f"posting window {window!r} is not 'HH:MM-HH:MM'")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    if h1 > 23 or m1 > 59 or m2 > 59 or h2 > 24 or (h2 == 24 and m2 != 0):
        raise ValueError(f"posting window {window!r} has an impossible time")
    start = time(h1, m1)
    end = time.max if h2 == 24 else time(h2, m2)
    if end <= start:
        raise ValueError(f"posting window {window!r} ends before it starts")
    return start, end


class PhotoHashCache:
    """Each photo's sha256, reused while the file's size, mtime, inode and ctime are what they were
    when it was read (lora_import's rule, plus the two a copy or an in-place rewrite cannot keep), so
    the persona sensor's 30 s tick reads only changed files. A file whose mtime is within
    RACY_NS of the moment it was hashed is read again next time: a write in the same clock tick
    as the read would leave its times unchanged (git's "racily clean" entries)."""

    RACY_NS = 2_000_000_000

    def __init__(self) -> None:
        # folder -> {name: (size, mtime_ns, ino, ctime_ns, hashed_at_ns, digest)}
        self._folders: dict[Path, dict[str, tuple[int, int, int, int, int, bytes]]] = {}

    def digest(self, path: Path) -> bytes:
        """sha256 of `path` (a regular file, never through a link), from the cache when unchanged."""
        stat = os.lstat(path)
        key = (stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns)
        entries = self._folders.setdefault(path.parent, {})
        cached = entries.get(path.name)
        if cached is not None and cached[:4] == key and cached[1] < cached[4] - self.RACY_NS:
            return cached[5]
        hashed_at = time_ns()
        content = hashlib.sha256(read_regular(path)).digest()
        entries[path.name] = (*key, hashed_at, content)
        return content

    def forget_others(self, folder: Path, files: list[Path]) -> None:
        """Drop the entries of `folder` that are not in `files` (keeps the cache as big as the folders)."""
        names = {p.name for p in files}
        entries = self._folders.get(Path(folder), {})
        for name in [n for n in entries if n not in names]:
            del entries[name]


class Persona(BaseModel):
    """A loaded persona folder."""

    slug: str
    folder: Path
    config: PersonaConfig
    settings_hash: str

    @property
    def photos_dir(self) -> Path:
        return self.folder / "photos"

    def photo_scan(self) -> FolderScan:
        """photos/ listed without following links (fileio.scan_folder): a link in it, or photos/
        itself as a link, is refused by name and its target is never read."""
        scan = scan_folder(self.photos_dir, self.folder)
        scan.files = [p for p in scan.files if not p.name.startswith(".")]
        scan.refused = [(p, why) for p, why in scan.refused if not p.name.startswith(".")]
        return scan

    def photo_files(self) -> list[Path]:
        """Every regular file in photos/ that is not a caption sidecar (bad files included: ingestion
        judges them). Links are not here: `photo_scan().refused` has them."""
        return [p for p in self.photo_scan().files if p.suffix.lower() != ".txt"]

    def photo_set_hash(self, cache: PhotoHashCache | None = None) -> str:
        """Content hash of the photo set (names, bytes and sidecar captions, and each refused entry's
        name and reason: a link's text, never its target's bytes); changes trigger ingestion. With
        `cache`, a file whose size and times are unchanged is not read again."""
        digest = hashlib.sha256()
        scan = self.photo_scan()
        if cache is not None:
            cache.forget_others(self.photos_dir, scan.files)
        for path in scan.files:
            try:
                content = cache.digest(path) if cache is not None else hashlib.sha256(read_regular(path)).digest()
            except (OSError, UnsafePath) as exc:  # swapped or removed since the listing: hash the refusal
                content = b"unreadable\0" + str(exc).encode()
            digest.update(path.name.encode() + b"\0" + content)
        for path, reason in scan.refused:
            digest.update(path.name.encode() + b"\0refused\0" + reason.encode())
        return digest.hexdigest()


def _field_path(loc: tuple) -> str:
    return ".".join(str(part) if not isinstance(part, int) else f"[{part}]" for part in loc).replace(".[", "[")


def load_persona(folder: Path) -> Persona:
    """Load and validate `folder/persona.yaml`."""
    folder = Path(folder)
    path = folder / "persona.yaml"
    slug = folder.name
    if not SLUG_RE.match(slug):
        raise PersonaFileError(f"{folder}: folder name {slug!r} is not a valid persona slug (lowercase letters, digits, - and _)")
    refusal = entry_refusal(folder, Path("persona.yaml"))  # the user-folder rule: a link's target is not read
    if refusal:
        raise PersonaFileError(f"{path}: {refusal}")
    try:
        raw_text = read_regular(path).decode("utf-8")
    except FileNotFoundError:
        raise PersonaFileError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise PersonaFileError(f"{path}: not UTF-8 text ({exc})") from None
    try:
        raw = yaml.safe_load(raw_text)
    except yaml.YAMLError as exc:
        raise PersonaFileError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise PersonaFileError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        config = PersonaConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"field '{_field_path(err['loc']) or '(top level)'}': {err['msg']}" for err in exc.errors())
        raise PersonaFileError(f"{path}: {problems}") from None
    settings_hash = hashlib.sha256(config.model_dump_json().encode()).hexdigest()
    return Persona(slug=slug, folder=folder.resolve(), config=config, settings_hash=settings_hash)


def discover_personas(datasets_dir: Path) -> tuple[list[Persona], dict[str, str]]:
    """Every persona folder under `datasets_dir`: (loaded personas, {slug: error} for bad ones)."""
    personas: list[Persona] = []
    errors: dict[str, str] = {}
    if not Path(datasets_dir).is_dir():
        return personas, errors
    for folder in sorted(Path(datasets_dir).iterdir()):
        if not (folder / "persona.yaml").is_file():
            continue
        try:
            personas.append(load_persona(folder))
        except PersonaFileError as exc:
            errors[folder.name] = str(exc)
    return personas, errors
