"""Every environment setting, declared once.

Each `Settings` field the environment fills is declared with `setting(...)`: the variable's name, its
kind (how its text becomes a value, and the type the docs show), its default, its help text and whether
it is a secret. Everything else is derived from these declarations: `Settings.from_env`, the Dagster
resources (definitions.py passes each value the environment gave as `dg.EnvVar`, so the UI shows the
variable's name, never its value), `persona-pipeline settings`, and docs/settings.md, which is generated
(`persona-pipeline settings --markdown > docs/settings.md`) and compared with them by a test.

Every default runs the embedded quickstart (SQLite, tiny local models, dry-run outbox publisher, no network).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from persona_pipeline.generation.backends import backend_names

REPO_WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # S3's bucket naming rules
TRUE_WORDS = {"1", "true", "yes", "on"}
MIN_TOKEN_CHARS = 16


# --- kinds: how a variable's text becomes a value ---------------------------------------------------------

class Kind:
    """How a variable's (stripped, non-empty) text becomes a value; errors name the variable and value.

    `carried`: what a Dagster `EnvVar` can hand a resource field of this kind, "str" or "int"; None
    where it cannot (Dagster's EnvVar carries text and integers only) or where the value is not the
    text itself (a folder made absolute)."""

    label = "text"
    carried: str | None = "str"

    def parse(self, env: str, text: str) -> Any:
        return text


class Text(Kind):
    def __init__(self, label: str = "text", tidy: Callable[[str], str] | None = None) -> None:
        self.label, self.tidy = label, tidy

    def parse(self, env: str, text: str) -> str:
        return self.tidy(text) if self.tidy else text


class Choice(Kind):
    def __init__(self, *options: str) -> None:
        self.options = options
        self.label = " or ".join(f"`{option}`" for option in options)

    def parse(self, env: str, text: str) -> str:
        if text not in self.options:
            raise ValueError(f"{env}={text!r} must be {self.label}")
        return text


class Range(Kind):
    """An integer (`int`) or a number with a fraction (`float`) within [low, high]."""

    def __init__(self, type_: type, low: float, high: float) -> None:
        self.type_, self.low, self.high = type_, low, high
        self.noun = "integer" if type_ is int else "number"
        self.label = f"{self.noun} {low}..{high}"
        self.carried = "int" if type_ is int else None

    def parse(self, env: str, text: str) -> Any:
        try:
            value = self.type_(text)
        except ValueError:
            raise ValueError(f"{env}={text!r} is not {'an' if self.type_ is int else 'a'} {self.noun}") from None
        if not self.low <= value <= self.high:
            raise ValueError(f"{env}={value} is out of range {self.low}..{self.high}")
        return value


def Integer(low: int, high: int) -> Range:
    return Range(int, low, high)


def Number(low: float, high: float) -> Range:
    return Range(float, low, high)


class Flag(Kind):
    label = "flag (`1` or `0`)"
    carried = None

    def parse(self, env: str, text: str) -> bool:
        return text.lower() in TRUE_WORDS


class Folder(Kind):
    label = "folder"
    carried = None

    def parse(self, env: str, text: str) -> Path:
        return Path(text).expanduser().resolve()


class Home(Kind):
    """PERSONA_HOME: a folder or an s3:// URL; `Settings.from_env` resolves it with `parse_home`."""

    label = "folder or `s3://bucket/prefix`"
    carried = None


class EndpointUrl(Kind):
    label = "URL"

    def parse(self, env: str, text: str) -> str:
        parsed = urlsplit(text)
        if parsed.scheme not in {"http", "https"} or not parsed.netloc:
            raise ValueError(f"{env}={text!r} must be an http:// or https:// URL with a host")
        return text.rstrip("/")


class RateList(Kind):
    """`name=number,...` (the simulated audience's rates), checked here and handed on as the text."""

    label = "`name=rate` list"

    def parse(self, env: str, text: str) -> str:
        from persona_pipeline.domain.audience import parse_rates

        for name, rate in parse_rates(text, env).items():
            if not 0 < rate <= 10:
                raise ValueError(f"{env}: rate {name}={rate} must be above 0 and at most 10")
        return text


TEXT = Text()
URL = Text("URL")
BASE_URL = Text("URL", tidy=lambda text: text.rstrip("/"))
FOLDER = Folder()
FLAG = Flag()


# --- the declarations ------------------------------------------------------------------------------------

PARSE_DEFAULT = object()  # `Setting.unset`: the value when unset is `default` parsed


@dataclass(frozen=True)
class Setting:
    """One environment variable. `default` is the text the docs show and, unless `unset` is given, the
    text parsed when the variable is unset or blank (`$PERSONA_HOME` in it stands for the home folder)."""

    env: str
    kind: Kind
    default: str
    help: str
    secret: bool = False
    unset: Any = PARSE_DEFAULT
    attr: str = ""  # the Settings field it fills

    @property
    def type(self) -> str:
        return self.kind.label

    def value(self, text: str, home: Path) -> Any:
        """The value of the variable's stripped text, or the default when it is blank."""
        if text:
            return self.kind.parse(self.env, text)
        if self.unset is not PARSE_DEFAULT:
            return self.unset
        return self.kind.parse(self.env, self.default.replace("$PERSONA_HOME", str(home)))

    def carries_verbatim(self, raw: str, value: Any) -> bool:
        """Whether a resource field may take this variable as `dg.EnvVar` and read `value` from it: it
        is set, Dagster can carry its kind, and the loader did not tidy it. Secrets always go as
        EnvVar, tidied or not, so their value never reaches the UI."""
        if not raw.strip() or self.kind.carried is None:
            return False
        return self.secret or self.kind.carried == "int" or raw == value


def setting(env: str, kind: Kind, default: str, help: str, *, secret: bool = False, unset: Any = PARSE_DEFAULT,
            required: bool = False) -> Any:
    """A `Settings` field filled from `env`. `required`: no default when Settings is built directly
    (from_env still fills it); otherwise the field defaults to the value an unset variable gives."""
    declared = Setting(env, kind, default, help, secret, unset)
    metadata = {"setting": declared}
    if required:
        return field(metadata=metadata, repr=not secret)
    fallback = unset if unset is not PARSE_DEFAULT else kind.parse(env, default)
    return field(default=fallback, metadata=metadata, repr=not secret)


@dataclass(frozen=True)
class Settings:
    """The application's settings: `Settings.from_env()` in the code location and the CLI; tests
    build one directly (nothing then counts as from the environment)."""

    home: Path = setting(
        "PERSONA_HOME", Home(), "./.persona_home",
        "Root folder for every artifact (photos, datasets, LoRAs, images, media, outbox, tiny models), or an "
        "`s3://bucket/prefix` URL (see \"Object storage\"); with an s3:// URL this is the local cache folder.",
        required=True)
    database_url: str = setting(
        "PERSONA_DATABASE_URL", URL, "sqlite:///$PERSONA_HOME/persona.db",
        "Application database (SQLAlchemy URL). PostgreSQL in production, e.g. "
        "`postgresql+psycopg2://user:pw@host/db`.", secret=True, required=True)
    datasets_dir: Path = setting(
        "PERSONA_DATASETS_DIR", FOLDER, "./datasets",
        "Folder of persona folders (`<slug>/persona.yaml` + `photos/`) that the persona sensor watches.", required=True)
    artifact_store: str = ""  # from PERSONA_HOME: the s3:// URL of the durable copy of `home`; "" = `home` is all
    cache_dir: Path | None = setting(
        "PERSONA_CACHE_DIR", FOLDER, "~/.cache/persona-pipeline/<bucket>/<prefix>",
        "With an `s3://` `PERSONA_HOME`: the local working copy. Use the same path on every machine (database "
        "rows store absolute paths).", unset=None)
    s3_endpoint_url: str = setting(
        "PERSONA_S3_ENDPOINT_URL", EndpointUrl(), "",
        "Endpoint of an S3-compatible server (MinIO, Ceph, a test server), `http(s)://host:port`. Empty = AWS S3.",
        unset="")
    dagster_home: Path | None = setting(
        "DAGSTER_HOME", FOLDER, "",
        "The Dagster instance folder (read by Dagster itself). Embedded SQLite unless it holds the repo's "
        "`dagster.yaml`. Unset, `persona-pipeline demo` uses `$PERSONA_HOME/dagster`.", unset=None)
    base_model: str = setting(
        "PERSONA_BASE_MODEL", TEXT, "world",
        "Base model for training and generation: `world` (the committed model trained on the procedural world, "
        "64 px; docs/world.md), `tiny` (random weights, for tests that need shapes alone), `tiny-flux` (the same in "
        "FLUX.1 [dev]'s layout), or a local folder / hub id of a diffusers SD1.5 (or 2.x), SDXL or FLUX.1 model; the "
        "family is read from its `model_index.json` (docs/training.md#model-families).")
    clip_model: str = setting(
        "PERSONA_CLIP_MODEL", TEXT, "world",
        "open_clip model: `world` (the committed CLIP model trained on the procedural world; docs/world.md), `tiny` "
        "(random, built locally) or an architecture such as `ViT-B-32`.")
    clip_pretrained: str = setting(
        "PERSONA_CLIP_PRETRAINED", TEXT, "",
        "Weights for a real open_clip architecture: a local file, or a pretrained tag. Empty = random.")
    face_model: str = setting(
        "PERSONA_FACE_MODEL", TEXT, "",
        "An ArcFace-style face-embedding ONNX model (local path). Set, identity scores (candidate gate, checkpoint and "
        "LoRA evaluation) are face-embedding cosines; empty = the open_clip model (docs/training.md#identity). Needs "
        "the `face` extra (onnxruntime).")
    face_detector: str = setting(
        "PERSONA_FACE_DETECTOR", TEXT, "",
        "The face detector ONNX model (local path) that crops the face for `PERSONA_FACE_MODEL`; its input and output "
        "contract is in docs/training.md#identity.")
    promote_identity_tolerance: float = setting(
        "PERSONA_PROMOTE_IDENTITY_TOLERANCE", Number(0, 2), "0",
        "How far a new LoRA version's mean identity on the evaluation set may fall below the primary's and still "
        "replace it (0 = not worse at all; docs/training.md#evaluation-and-promotion).")
    promote_alignment_tolerance: float = setting(
        "PERSONA_PROMOTE_ALIGNMENT_TOLERANCE", Number(0, 2), "0.02",
        "How far a new LoRA version's prompt alignment on the evaluation set may fall below the primary's and "
        "still replace it.")
    gemini_api_key: str = setting(
        "GEMINI_API_KEY", TEXT, "",
        "Gemini API key (captions of training photos and posts, content prompts, cluster names). Empty = the "
        "offline fallbacks (open_clip zero-shot captions, templates).", secret=True)
    gemini_base_url: str = setting(
        "GEMINI_BASE_URL", URL, "", "Gemini API base URL, for proxies and tests. Empty = Google's endpoint.")
    gemini_model: str = setting("PERSONA_GEMINI_MODEL", TEXT, "gemini-2.5-flash", "Gemini model to call.")
    device: str = setting(
        "PERSONA_DEVICE", TEXT, "cpu", "torch device for training and generation (`cpu`, `cuda`, `cuda:1`).")
    candidates_per_run: int = setting(
        "PERSONA_CANDIDATES_PER_RUN", Integer(2, 64), "4", "Images per run when `persona.yaml` sets no `generation.steps`.")
    auto_review: bool = setting(
        "PERSONA_AUTO_REVIEW", FLAG, "0",
        "`1` casts votes, picks winners and approves posts from open_clip scores (the demo sets it).")
    publish_cron: str = setting("PERSONA_PUBLISH_CRON", TEXT, "*/5 * * * *", "Cron of the schedule that publishes due posts.")
    generation_backend: str = setting(
        "PERSONA_GENERATION_BACKEND", Choice(*backend_names()), "diffusers",
        "Default generation backend: `diffusers` (local, `PERSONA_BASE_MODEL` + LoRA) or `comfyui`; `persona.yaml` "
        "`generation.backend` and a step's `backend` override it.")
    controlnet_model: str = setting(
        "PERSONA_CONTROLNET_MODEL", TEXT, "tiny",
        "OpenPose ControlNet for the diffusers backend: `tiny` (random weights, built locally from the `tiny` or "
        "`world` base model) or a local folder / hub id.")
    generation_batch_size: int = setting(
        "PERSONA_GENERATION_BATCH_SIZE", Integer(1, 64), "4",
        "Images per diffusers pipeline call (jobs that differ only in seed share one).")
    workflows_dir: Path = setting(
        "PERSONA_WORKFLOWS_DIR", FOLDER, "<repo>/workflows",
        "Folder of ComfyUI API-format workflow templates (`<name>.json`).", unset=REPO_WORKFLOWS)
    comfyui_urls: str = setting(
        "COMFYUI_URLS", Text("URL list"), "",
        "ComfyUI servers, comma-separated base URLs (`http://gpu1:8188,http://gpu2:8188`).")
    comfyui_checkpoint: str = setting(
        "COMFYUI_CHECKPOINT", TEXT, "v1-5-pruned-emaonly.safetensors",
        "The `ckpt_name` the templates load on the servers (`persona.yaml` `generation.checkpoint` overrides it).")
    comfyui_lora_prefix: str = setting(
        "COMFYUI_LORA_PREFIX", Text(tidy=lambda text: text.strip("/")), "persona-pipeline",
        "Folder under the servers' `models/loras/` where `persona-pipeline lora export-comfyui` puts the library: "
        "LoRAs are named `<prefix>/<slug>/<file>`.")
    comfyui_max_in_flight: int = setting(
        "COMFYUI_MAX_IN_FLIGHT", Integer(1, 64), "2", "Jobs queued at once on one ComfyUI server.")
    comfyui_job_timeout_s: float = setting(
        "COMFYUI_JOB_TIMEOUT_S", Number(1, 24 * 3600), "600",
        "Seconds before a ComfyUI job is interrupted (`POST /interrupt`) and failed.")
    review_tokens: str = setting(
        "REVIEW_TOKENS", Text("`name:token` list"), "",
        "Reviewer logins for the review form: `name:token,name:token`; tokens of at least 16 characters "
        "(`persona-pipeline review-token NAME` prints one).", secret=True)
    review_secret_key: str = setting(
        "REVIEW_SECRET_KEY", TEXT, "",
        "Signs the review form's session cookie; set the same value on every form process. Empty = a random key "
        "made once and kept in `$PERSONA_HOME/review_secret.key`.", secret=True)
    review_host: str = setting(
        "REVIEW_HOST", TEXT, "127.0.0.1",
        "Address `persona-pipeline review` listens on (`0.0.0.0` to reach it from a phone on the network).")
    review_port: int = setting("REVIEW_PORT", Integer(1, 65535), "8090", "Port of the review form.")
    review_max_body_bytes: int = setting(
        "REVIEW_MAX_BODY_BYTES", Integer(1024, 1 << 30), "1000000",
        "Largest request body the review form accepts; a bigger one gets 413.")
    review_exploration: float = setting(
        "REVIEW_EXPLORATION", Number(0, 1), "0.1",
        "Share of vote pairs picked uniformly at random rather than at the top-K boundary.")
    review_https_only: bool = setting(
        "REVIEW_HTTPS_ONLY", FLAG, "0", "`1` sends the session cookie over HTTPS only (set it behind a TLS proxy).")
    publisher: str = setting(
        "PERSONA_PUBLISHER", Choice("outbox", "instagram"), "outbox",
        "`outbox` (dry run: JPEG + JSON under `$PERSONA_HOME/outbox/<slug>/`) or `instagram` (the Graph API; see "
        "\"Publishing\").")
    instagram_graph_url: str = setting(
        "INSTAGRAM_GRAPH_URL", BASE_URL, "https://graph.facebook.com/v23.0",
        "Base URL of the Instagram Graph API (tests point it at a local fake).")
    media_public_base_url: str = setting(
        "MEDIA_PUBLIC_BASE_URL", BASE_URL, "",
        "Public URL under which `MEDIA_PUBLIC_DIR` is served; Instagram fetches each post's JPEG from there. "
        "Required by the `instagram` publisher for images (videos: `INSTAGRAM_VIDEO_UPLOAD`).")
    instagram_video_upload: str = setting(
        "INSTAGRAM_VIDEO_UPLOAD", Choice("auto", "url", "resumable"), "auto",
        "How a reel's or video story's MP4 reaches Instagram: `url` (staged under `MEDIA_PUBLIC_BASE_URL`, "
        "fetched by Instagram), `resumable` (uploaded to the Graph API's rupload endpoint, resumed at its offset "
        "after an interruption), or `auto`: `resumable` when `MEDIA_PUBLIC_BASE_URL` is unset, else `url`.")
    media_public_dir: Path | None = setting(
        "MEDIA_PUBLIC_DIR", FOLDER, "$PERSONA_HOME/public_media",
        "Folder the publisher copies post JPEGs into (`<slug>/<post>-<sha12>.jpg`) for the web server (or bucket "
        "sync) behind `MEDIA_PUBLIC_BASE_URL`.", unset=None)
    publish_workers: int = setting(
        "PERSONA_PUBLISH_WORKERS", Integer(1, 256), "32",
        "Posts in flight at once (accounts run in parallel; each account's quota is reserved before every "
        "publish call).")
    publish_processes: int = setting(
        "PERSONA_PUBLISH_PROCESSES", Integer(1, 64), "1",
        "Processes the due accounts are dealt to (whole accounts; `PERSONA_PUBLISH_WORKERS` is the total across "
        "them). One process's Python caps publishing near 140 posts/s; more lift that where there are cores.")
    publish_max_retries: int = setting(
        "PERSONA_PUBLISH_MAX_RETRIES", Integer(0, 20), "3",
        "Failed publishes retried (with growing waits) before a post is abandoned.")
    instagram_poll_timeout_s: float = setting(
        "INSTAGRAM_POLL_TIMEOUT_S", Number(1, 24 * 3600), "120",
        "Seconds a media container may stay `IN_PROGRESS` before the attempt fails (it is retried later).")
    instagram_video_poll_timeout_s: float = setting(
        "INSTAGRAM_VIDEO_POLL_TIMEOUT_S", Number(1, 24 * 3600), "900",
        "The same for a reel's or video story's container, which Instagram processes for seconds to minutes.")
    instagram_token_warn_days: int = setting(
        "INSTAGRAM_TOKEN_WARN_DAYS", Integer(0, 365), "7",
        "Warn (log + run metadata) when an account's access token expires within this many days.")
    freshness_days: float = setting(
        "PERSONA_FRESHNESS_DAYS", Number(0, 365), "3",
        "Freshness: the checks `calendar_covers_ahead` and `library_runway` (and their alerts) warn when a "
        "persona's scheduled posts cover fewer days ahead than this, or its unposted library would run dry within it.")
    alert_webhook_url: str = setting(
        "ALERT_WEBHOOK_URL", URL, "",
        "Slack-compatible incoming webhook that gets alerts (failed runs, freshness, bad persona files). "
        "Empty = no alerts.", secret=True)
    dagster_ui_base_url: str = setting(
        "DAGSTER_UI_BASE_URL", BASE_URL, "http://localhost:3000",
        "Base URL of the Dagster UI; alerts and the weekly report link to runs and assets under it.")
    review_base_url: str = setting(
        "REVIEW_BASE_URL", BASE_URL, "http://127.0.0.1:8090",
        "Base URL of the review form as a browser reaches it; Dagster metadata links to its pages and shows "
        "preview images from its `/media/` (a reviewer logged in to the form sees them).")
    alert_max_attempts: int = setting(
        "ALERT_MAX_ATTEMPTS", Integer(1, 100), "8",
        "Deliveries tried per alert (waits grow from 30 s to 1 h; a sensor never waits on the webhook) before "
        "the alert is marked failed.")
    insights_cron: str = setting(
        "PERSONA_INSIGHTS_CRON", TEXT, "17 * * * *",
        "Cron of the schedule that reads published posts' insights (due at +1 h, +24 h, +72 h, +7 d) and each "
        "account's daily followers and reach (docs/insights.md).")
    insights_workers: int = setting(
        "PERSONA_INSIGHTS_WORKERS", Integer(1, 256), "32", "Accounts whose insights are read in parallel.")
    audience_seed: int = setting(
        "PERSONA_AUDIENCE_SEED", Integer(0, 2**31 - 1), "0",
        "Seed of the simulated audience that gives outbox (dry-run) posts their insights, labelled simulated.")
    audience_pillar_rates: str = setting(
        "PERSONA_AUDIENCE_PILLAR_RATES", RateList(), "",
        "The simulated audience's hidden engagement rate per pillar, `pillar=rate` (e.g. `travel=0.05,everyday=0.03`); "
        "a pillar not named gets 3.5 % times a seeded draw.")
    audience_peak_hour: float = setting(
        "PERSONA_AUDIENCE_PEAK_HOUR", Number(0, 23.99), "19",
        "Local hour at which the simulated audience engages most.")
    audience_hour_amplitude: float = setting(
        "PERSONA_AUDIENCE_HOUR_AMPLITUDE", Number(0, 2), "0.2",
        "Strength of the simulated audience's daily cycle (on the log engagement rate; 0.2 = about ±20 %).")
    audience_format_rates: str = setting(
        "PERSONA_AUDIENCE_FORMAT_RATES", RateList(), "image=1.0,carousel=1.1,reel=1.25",
        "The simulated audience's engagement multiplier per media format.")
    # The fields whose value the environment gave verbatim (see `Setting.carries_verbatim`).
    from_environment: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    @property
    def public_media_dir(self) -> Path:
        return self.media_public_dir or self.home / "public_media"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "Settings":
        """The settings from the environment; a bad value raises ValueError naming the variable and value."""
        raw = {s.env: environ.get(s.env, "") for s in SETTINGS}
        text = {name: value.strip() for name, value in raw.items()}
        home, artifact_store = parse_home(text["PERSONA_HOME"] or BY_ATTR["home"].default, text["PERSONA_CACHE_DIR"])
        values: dict[str, Any] = {"home": home, "artifact_store": artifact_store}
        for declared in SETTINGS:
            if declared.attr != "home":
                values[declared.attr] = declared.value(text[declared.env], home)
        verbatim = {s.attr for s in SETTINGS if s.carries_verbatim(raw[s.env], values[s.attr])}
        return cls(**values, from_environment=frozenset(verbatim))

    def variable_for(self, attr: str) -> Setting | None:
        """The declaration of `attr` when its value came verbatim from the environment, else None."""
        return BY_ATTR[attr] if attr in self.from_environment else None

    def reviewer_tokens(self) -> dict[str, str]:
        """REVIEW_TOKENS as token → reviewer name. Errors name the entry, never the token."""
        return parse_reviewer_tokens(self.review_tokens)


SETTINGS: tuple[Setting, ...] = tuple(replace(f.metadata["setting"], attr=f.name)
                                      for f in fields(Settings) if "setting" in f.metadata)
BY_ATTR: dict[str, Setting] = {s.attr: s for s in SETTINGS}

# Variables the application does not read itself; listed in docs/settings.md next to the settings.
OTHER_VARIABLES = [
    ("`DAGSTER_PG_HOST`, `DAGSTER_PG_PORT`, `DAGSTER_PG_USER`, `DAGSTER_PG_PASSWORD`, `DAGSTER_PG_DB`",
     "Dagster's own PostgreSQL storage, read by the repo's `dagster.yaml`."),
    ("`PERSONA_TEST_POSTGRES_URL`", "Tests only: the server on which each PostgreSQL test creates and drops its own "
     "database (default `postgresql+psycopg2://postgres@127.0.0.1:5432/postgres`)."),
    ("the token variable a `persona.yaml` names (`instagram.token_env`)", "The persona's long-lived Instagram token, "
     "read by the `instagram` publisher at publish time (never stored or logged)."),
]


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


# --- the table: `persona-pipeline settings` and docs/settings.md ------------------------------------------

MARKDOWN_INTRO = """# Settings

<!-- Generated from the declarations in persona_pipeline/settings.py: edit those, then run
     `persona-pipeline settings --markdown > docs/settings.md`. A test compares the two. -->

Every setting is an environment variable; every default runs the embedded quickstart (SQLite, tiny local
models, the dry-run outbox publisher, no network). `persona-pipeline settings` prints this table with the
values set in the current environment (secrets only as "set").

A value that comes from the environment reaches the Dagster resources as `dg.EnvVar("NAME")`, so the
Dagster UI shows the variable's name, never its value. Dagster's `EnvVar` carries text and integers only:
numbers with a fraction, flags and folders (made absolute on load) are passed as values, and so is text the
loader tidied (a trailing `/` dropped, spaces around it). Secrets always go as `EnvVar`.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def settings_markdown() -> str:
    """docs/settings.md: the declarations as a Markdown table."""
    lines = [MARKDOWN_INTRO, "| variable | type | default | secret | meaning |", "| --- | --- | --- | --- | --- |"]
    for s in SETTINGS:
        default = f"`{s.default}`" if s.default else "(empty)"
        lines.append(f"| `{s.env}` | {_cell(s.type)} | {_cell(default)} | {'yes' if s.secret else ''} | {_cell(s.help)} |")
    lines += ["", "## Read by others", "", "| variable | meaning |", "| --- | --- |"]
    lines += [f"| {name} | {_cell(meaning)} |" for name, meaning in OTHER_VARIABLES]
    return "\n".join(lines) + "\n"


def settings_table(environ: Mapping[str, str] = os.environ) -> str:
    """The declarations as a plain-text table, with what the environment sets now (a secret's value never)."""
    def now(s: Setting) -> str:
        value = environ.get(s.env, "").strip()
        return "" if not value else "set" if s.secret else value

    header = ("variable", "type", "default", "secret", "set to", "meaning")
    rows = [header] + [(s.env, s.type.replace("`", ""), s.default, "yes" if s.secret else "", now(s), s.help.replace("`", ""))
                       for s in SETTINGS]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]
                     for row in rows) + "\n"
