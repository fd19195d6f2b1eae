"""Environment settings in one place.

Every setting has a default that runs the embedded quickstart (SQLite, tiny local models, dry-run
outbox publisher, no network). README.md has the table; keep it in step with `SETTINGS` below.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Setting:
    env: str
    default: str
    help: str


SETTINGS: list[Setting] = [
    Setting("PERSONA_HOME", "./.persona_home", "Root folder for every artifact (photos, datasets, LoRAs, images, outbox), or an `s3://bucket/prefix` URL (see \"Object storage\")."),
    Setting("PERSONA_CACHE_DIR", "~/.cache/persona-pipeline/<bucket>/<prefix>", "With an s3:// PERSONA_HOME: the local working copy. Use the same path on every machine (rows store absolute paths)."),
    Setting("PERSONA_S3_ENDPOINT_URL", "", "Endpoint of an S3-compatible server (MinIO, Ceph, a test server). Empty = AWS S3."),
    Setting("PERSONA_DATABASE_URL", "sqlite:///$PERSONA_HOME/persona.db", "Application database (SQLAlchemy URL); PostgreSQL in production."),
    Setting("PERSONA_DATASETS_DIR", "./datasets", "Folder of persona folders (`<slug>/persona.yaml` + `photos/`) the persona sensor watches."),
    Setting("DAGSTER_HOME", "$PERSONA_HOME/dagster (demo only)", "The Dagster instance folder. Put the repo's dagster.yaml there for PostgreSQL storage."),
    Setting("PERSONA_BASE_MODEL", "tiny", "Base model for training and generation: `tiny` (random, built locally), a local folder or a hub id."),
    Setting("PERSONA_CLIP_MODEL", "tiny", "open_clip model: `tiny` (random, built locally) or an architecture name such as `ViT-B-32`."),
    Setting("PERSONA_CLIP_PRETRAINED", "", "open_clip weights for a real architecture: a local file path or a pretrained tag. Empty = random."),
    Setting("GEMINI_API_KEY", "", "Gemini API key for captioning training photos; empty = the offline open_clip captioner."),
    Setting("GEMINI_BASE_URL", "", "Gemini API base URL, for proxies and tests. Empty = Google's endpoint."),
    Setting("PERSONA_GEMINI_MODEL", "gemini-2.5-flash", "Gemini model that captions training photos."),
    Setting("PERSONA_DEVICE", "cpu", "torch device for training and generation (`cpu`, `cuda`, `cuda:1`)."),
    Setting("PERSONA_CANDIDATES_PER_RUN", "4", "Images per run when persona.yaml sets no generation.steps."),
    Setting("PERSONA_GENERATION_BACKEND", "diffusers", "Default generation backend: `diffusers` (local, PERSONA_BASE_MODEL + LoRA) or `comfyui`; persona.yaml `generation.backend` and each step's `backend` override it."),
    Setting("PERSONA_CONTROLNET_MODEL", "tiny", "OpenPose ControlNet for the diffusers backend: `tiny` (random, built locally) or a local folder / hub id."),
    Setting("PERSONA_GENERATION_BATCH_SIZE", "4", "Images per diffusers pipeline call (jobs that differ only in seed share one)."),
    Setting("PERSONA_WORKFLOWS_DIR", "<repo>/workflows", "Folder of ComfyUI API-format workflow templates (`<name>.json`)."),
    Setting("COMFYUI_URLS", "", "ComfyUI servers, comma-separated base URLs (`http://gpu1:8188,http://gpu2:8188`)."),
    Setting("COMFYUI_CHECKPOINT", "v1-5-pruned-emaonly.safetensors", "The `ckpt_name` the templates load on the ComfyUI servers (persona.yaml `generation.checkpoint` overrides it)."),
    Setting("COMFYUI_LORA_PREFIX", "persona-pipeline", "Folder under the servers' `models/loras/` where `persona-pipeline lora export-comfyui` puts the library: LoRAs are named `<prefix>/<slug>/<file>`."),
    Setting("COMFYUI_MAX_IN_FLIGHT", "2", "Jobs queued at once on one ComfyUI server."),
    Setting("COMFYUI_JOB_TIMEOUT_S", "600", "Seconds before a ComfyUI job is interrupted (`POST /interrupt`) and failed."),
    Setting("PERSONA_AUTO_REVIEW", "0", "1 = cast votes, pick winners and approve posts from open_clip scores (the demo turns it on)."),
    Setting("PERSONA_PUBLISH_CRON", "*/5 * * * *", "Cron of the schedule that publishes due posts."),
    Setting("PERSONA_PUBLISHER", "outbox", "`outbox` (dry run: JPEG + JSON under `$PERSONA_HOME/outbox/<slug>/`) or `instagram` (the Graph API, see \"Publishing\")."),
    Setting("INSTAGRAM_GRAPH_URL", "https://graph.facebook.com/v23.0", "Base URL of the Instagram Graph API (a local fake in tests)."),
    Setting("MEDIA_PUBLIC_BASE_URL", "", "Public URL under which MEDIA_PUBLIC_DIR is served; Instagram fetches each post's JPEG from there. Required by the `instagram` publisher."),
    Setting("MEDIA_PUBLIC_DIR", "$PERSONA_HOME/public_media", "Folder the publisher copies post JPEGs into (`<slug>/<post>-<sha>.jpg`) for the web server behind MEDIA_PUBLIC_BASE_URL."),
    Setting("PERSONA_PUBLISH_WORKERS", "32", "Posts published at once (accounts in parallel; each account's quota is reserved before each publish call)."),
    Setting("PERSONA_PUBLISH_MAX_RETRIES", "3", "Failed publishes retried (with growing waits) before a post is abandoned."),
    Setting("INSTAGRAM_POLL_TIMEOUT_S", "120", "Seconds a container may stay IN_PROGRESS before the attempt fails (it is retried later)."),
    Setting("INSTAGRAM_TOKEN_WARN_DAYS", "7", "Warn when an account's access token expires within this many days."),
    Setting("PERSONA_FRESHNESS_DAYS", "3", "Freshness: warn (asset checks, alerts) when a persona's scheduled posts cover fewer days ahead than this, or its unposted library would run dry within it."),
    Setting("ALERT_WEBHOOK_URL", "", "Slack-compatible incoming webhook for alerts (failed runs, freshness, bad persona files). Empty = no alerts."),
    Setting("DAGSTER_UI_BASE_URL", "http://localhost:3000", "Base URL of the Dagster UI; alerts and reports link to runs and assets under it."),
    Setting("ALERT_MAX_ATTEMPTS", "8", "Deliveries tried per alert (with growing waits, never blocking a sensor) before it is marked failed."),
    Setting("REVIEW_TOKENS", "", "Reviewer logins for the review form: `name:token,name:token` (tokens ≥ 16 characters; `persona-pipeline review-token NAME` makes one)."),
    Setting("REVIEW_SECRET_KEY", "$PERSONA_HOME/review_secret.key", "Key that signs the review form's session cookie; when unset, a random key is made once and kept in that file."),
    Setting("REVIEW_HOST", "127.0.0.1", "Address `persona-pipeline review` listens on (0.0.0.0 to reach it from a phone on the network)."),
    Setting("REVIEW_PORT", "8090", "Port of the review form."),
    Setting("REVIEW_MAX_BODY_BYTES", "1000000", "Largest request body the review form accepts (bigger: 413)."),
    Setting("REVIEW_EXPLORATION", "0.1", "Share of vote pairs chosen uniformly at random instead of at the top-K boundary (0..1)."),
    Setting("REVIEW_HTTPS_ONLY", "0", "1 = the session cookie is sent over HTTPS only (set it behind a TLS proxy)."),
]


REPO_WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value if value else default


S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # S3's bucket naming rules


def parse_home(raw: str, cache_dir: str = "") -> tuple[Path, str]:
    """PERSONA_HOME (+ PERSONA_CACHE_DIR) as (local folder, artifact store URL). A local path gives
    (that folder, ""); `s3://bucket/prefix` gives (the cache folder, the normalised URL)."""
    scheme, sep, rest = raw.partition("://")
    if not sep:
        return Path(raw).expanduser().resolve(), ""
    if scheme.lower() != "s3":
        raise ValueError(f"PERSONA_HOME={raw!r}: the scheme {scheme}:// is not supported; "
                         "use a local folder or an s3://bucket/prefix URL")
    bucket, _, prefix = rest.partition("/")
    prefix = "/".join(part for part in prefix.split("/") if part)
    if not bucket:
        raise ValueError(f"PERSONA_HOME={raw!r} names no bucket (s3://bucket/prefix)")
    if not S3_BUCKET.match(bucket):
        raise ValueError(f"PERSONA_HOME={raw!r}: {bucket!r} is not a valid S3 bucket name "
                         "(3-63 lowercase letters, digits, dots and hyphens)")
    if any(part in (".", "..") for part in prefix.split("/")):
        raise ValueError(f"PERSONA_HOME={raw!r}: the prefix may not hold `.` or `..` segments")
    url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    default = Path("~/.cache/persona-pipeline") / bucket / prefix
    return Path(cache_dir or default).expanduser().resolve(), url


def _endpoint_url(raw: str) -> str:
    """PERSONA_S3_ENDPOINT_URL: empty, or an http(s) URL with a host."""
    if not raw:
        return ""
    parsed = urlsplit(raw)
    if parsed.scheme not in {"http", "https"} or not parsed.netloc:
        raise ValueError(f"PERSONA_S3_ENDPOINT_URL={raw!r} must be an http:// or https:// URL with a host")
    return raw.rstrip("/")


@dataclass(frozen=True)
class Settings:
    home: Path  # with an s3:// PERSONA_HOME, the local cache folder (PERSONA_CACHE_DIR)
    database_url: str
    datasets_dir: Path
    artifact_store: str = ""  # the s3:// URL that holds the durable copy of `home`; "" = `home` is all there is
    s3_endpoint_url: str = ""
    base_model: str = "tiny"
    clip_model: str = "tiny"
    clip_pretrained: str = ""
    gemini_model: str = "gemini-2.5-flash"
    gemini_base_url: str = ""
    device: str = "cpu"
    candidates_per_run: int = 4
    auto_review: bool = False
    publish_cron: str = "*/5 * * * *"
    generation_backend: str = "diffusers"
    controlnet_model: str = "tiny"
    generation_batch_size: int = 4
    workflows_dir: Path = REPO_WORKFLOWS
    comfyui_urls: str = ""
    comfyui_checkpoint: str = "v1-5-pruned-emaonly.safetensors"
    comfyui_lora_prefix: str = "persona-pipeline"
    comfyui_max_in_flight: int = 2
    comfyui_job_timeout_s: float = 600.0
    review_tokens: str = ""
    review_secret_key: str = ""
    review_host: str = "127.0.0.1"
    review_port: int = 8090
    review_max_body_bytes: int = 1_000_000
    review_exploration: float = 0.1
    review_https_only: bool = False
    publisher: str = "outbox"
    instagram_graph_url: str = "https://graph.facebook.com/v23.0"
    media_public_base_url: str = ""
    media_public_dir: Path | None = None  # None: home / "public_media"
    publish_workers: int = 32
    publish_max_retries: int = 3
    instagram_poll_timeout_s: float = 120.0
    instagram_token_warn_days: int = 7
    freshness_days: float = 3.0
    alert_webhook_url: str = ""
    dagster_ui_base_url: str = "http://localhost:3000"
    alert_max_attempts: int = 8

    @property
    def public_media_dir(self) -> Path:
        return self.media_public_dir or self.home / "public_media"

    @classmethod
    def from_env(cls) -> "Settings":
        home, artifact_store = parse_home(_env("PERSONA_HOME", "./.persona_home"), _env("PERSONA_CACHE_DIR", ""))
        database_url = _env("PERSONA_DATABASE_URL", f"sqlite:///{home / 'persona.db'}")
        try:
            candidates = int(_env("PERSONA_CANDIDATES_PER_RUN", "4"))
        except ValueError as exc:
            raise ValueError(f"PERSONA_CANDIDATES_PER_RUN must be an integer: {exc}") from None
        if not 2 <= candidates <= 64:
            raise ValueError(f"PERSONA_CANDIDATES_PER_RUN={candidates} is out of range 2..64")
        backend = _env("PERSONA_GENERATION_BACKEND", "diffusers")
        if backend not in {"diffusers", "comfyui"}:
            raise ValueError(f"PERSONA_GENERATION_BACKEND={backend!r} must be `diffusers` or `comfyui`")
        in_flight = _number("COMFYUI_MAX_IN_FLIGHT", "2", int, 1, 64)
        publisher = _env("PERSONA_PUBLISHER", "outbox")
        if publisher not in {"outbox", "instagram"}:
            raise ValueError(f"PERSONA_PUBLISHER={publisher!r} must be `outbox` or `instagram`")
        timeout = _number("COMFYUI_JOB_TIMEOUT_S", "600", float, 1, 24 * 3600)
        return cls(
            home=home,
            database_url=database_url,
            artifact_store=artifact_store,
            s3_endpoint_url=_endpoint_url(_env("PERSONA_S3_ENDPOINT_URL", "")),
            datasets_dir=Path(_env("PERSONA_DATASETS_DIR", "./datasets")).expanduser().resolve(),
            base_model=_env("PERSONA_BASE_MODEL", "tiny"),
            clip_model=_env("PERSONA_CLIP_MODEL", "tiny"),
            clip_pretrained=_env("PERSONA_CLIP_PRETRAINED", ""),
            gemini_model=_env("PERSONA_GEMINI_MODEL", "gemini-2.5-flash"),
            gemini_base_url=_env("GEMINI_BASE_URL", ""),
            device=_env("PERSONA_DEVICE", "cpu"),
            candidates_per_run=candidates,
            auto_review=_env("PERSONA_AUTO_REVIEW", "0").lower() in {"1", "true", "yes", "on"},
            publish_cron=_env("PERSONA_PUBLISH_CRON", "*/5 * * * *"),
            generation_backend=backend,
            controlnet_model=_env("PERSONA_CONTROLNET_MODEL", "tiny"),
            generation_batch_size=_number("PERSONA_GENERATION_BATCH_SIZE", "4", int, 1, 64),
            workflows_dir=Path(_env("PERSONA_WORKFLOWS_DIR", str(REPO_WORKFLOWS))).expanduser().resolve(),
            comfyui_urls=_env("COMFYUI_URLS", ""),
            comfyui_checkpoint=_env("COMFYUI_CHECKPOINT", "v1-5-pruned-emaonly.safetensors"),
            comfyui_lora_prefix=_env("COMFYUI_LORA_PREFIX", "persona-pipeline").strip("/"),
            comfyui_max_in_flight=in_flight,
            comfyui_job_timeout_s=timeout,
            review_tokens=_env("REVIEW_TOKENS", ""),
            review_secret_key=_env("REVIEW_SECRET_KEY", ""),
            review_host=_env("REVIEW_HOST", "127.0.0.1"),
            review_port=_number("REVIEW_PORT", "8090", int, 1, 65535),
            review_max_body_bytes=_number("REVIEW_MAX_BODY_BYTES", "1000000", int, 1024, 1 << 30),
            review_exploration=_number("REVIEW_EXPLORATION", "0.1", float, 0, 1),
            review_https_only=_env("REVIEW_HTTPS_ONLY", "0").lower() in {"1", "true", "yes", "on"},
            publisher=publisher,
            instagram_graph_url=_env("INSTAGRAM_GRAPH_URL", "https://graph.facebook.com/v23.0").rstrip("/"),
            media_public_base_url=_env("MEDIA_PUBLIC_BASE_URL", "").rstrip("/"),
            media_public_dir=Path(_env("MEDIA_PUBLIC_DIR", str(home / "public_media"))).expanduser().resolve(),
            publish_workers=_number("PERSONA_PUBLISH_WORKERS", "32", int, 1, 256),
            publish_max_retries=_number("PERSONA_PUBLISH_MAX_RETRIES", "3", int, 0, 20),
            instagram_poll_timeout_s=_number("INSTAGRAM_POLL_TIMEOUT_S", "120", float, 1, 24 * 3600),
            instagram_token_warn_days=_number("INSTAGRAM_TOKEN_WARN_DAYS", "7", int, 0, 365),
            freshness_days=_number("PERSONA_FRESHNESS_DAYS", "3", float, 0, 365),
            alert_webhook_url=_env("ALERT_WEBHOOK_URL", ""),
            dagster_ui_base_url=_env("DAGSTER_UI_BASE_URL", "http://localhost:3000").rstrip("/"),
            alert_max_attempts=_number("ALERT_MAX_ATTEMPTS", "8", int, 1, 100),
        )

    def reviewer_tokens(self) -> dict[str, str]:
        """REVIEW_TOKENS as token → reviewer name. Errors name the entry, never the token."""
        return parse_reviewer_tokens(self.review_tokens)


MIN_TOKEN_CHARS = 16


def parse_reviewer_tokens(raw: str) -> dict[str, str]:
    tokens: dict[str, str] = {}
    for position, entry in enumerate(filter(None, (e.strip() for e in raw.split(","))), start=1):
        name, sep, token = entry.partition(":")
        name, token = name.strip(), token.strip()
        if not sep or not name or not token:
            raise ValueError(f"REVIEW_TOKENS entry {position} is not `name:token`")
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"REVIEW_TOKENS entry {position} ({name}): the token has {len(token)} characters; "
                             f"at least {MIN_TOKEN_CHARS} are needed")
        if token in tokens:
            raise ValueError(f"REVIEW_TOKENS entry {position} ({name}) reuses the token of {tokens[token]}")
        tokens[token] = name
    return tokens


def _number(name: str, default: str, kind: type, low: float, high: float):
    """An integer or float setting within [low, high]; the error names the variable and value."""
    raw = _env(name, default)
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a{'n integer' if kind is int else ' number'}") from None
    if not low <= value <= high:
        raise ValueError(f"{name}={value} is out of range {low:g}..{high:g}")
    return value
