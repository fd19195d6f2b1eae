"""The bad-input census: every bad-input case the earlier issues promised, in one table, each fed
through its real entry point (the source_photos asset, persona.yaml loading, Settings.from_env,
the LoRA import job, the workflow template loader, the review form over HTTP...) on PostgreSQL.

Each row says what the error must name (the file, field or value) and checks that nothing was lost:
the bad file is kept (quarantined or moved with its reason), the rows and files around it are
unchanged, nothing half-built is left. `test_census_counts_every_case` counts the table by area
and records the figure."""

from __future__ import annotations

import html
import io
import json
import re
import shutil
import struct
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterator

import pytest
import yaml
from PIL import Image
from sqlalchemy import func, select

from persona_pipeline.assets.source_photos import source_photos
from persona_pipeline.automation.lora_import import lora_import_job
from persona_pipeline.db import alerts as alert_outbox
from persona_pipeline.db import models
from persona_pipeline.db.session import session_scope
from persona_pipeline.domain.captions import TemplateError as CaptionTemplateError
from persona_pipeline.domain.captions import template_caption, validate_post_text
from persona_pipeline.domain.cron import CronError, parse_cron
from persona_pipeline.domain.workflows import TemplateError, load_templates
from persona_pipeline.fileio import sha256_file
from persona_pipeline.personas import discover_personas
from persona_pipeline.resources.alerts import AlertWebhook
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.diffusion import DiffusionBackend, GenerationParamError, check_generation_params
from persona_pipeline.resources.storage import PersonaStorage
from persona_pipeline.settings import REPO_WORKFLOWS, Settings
from persona_pipeline.training.lora import TrainingConfigError
from persona_pipeline_tests.conftest import DEMO, make_database, make_settings, materialise_persona, write_persona
from persona_pipeline_tests.test_lora_library import _foreign_lora, _raw_safetensors
from persona_pipeline_tests.test_parameters import GOOD as GOOD_GENERATION
from persona_pipeline_tests.test_review_form import Form, make_form

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

# --------------------------------------------------------------------------- the table


@dataclass
class Fed:
    """What feeding one bad input gave: the error text the user sees, and what the nothing-lost
    check found missing or changed (empty: nothing was lost)."""

    error: str
    lost: list[str]


@dataclass(frozen=True)
class Case:
    area: str
    bad_input: str
    feed: Callable[["Env"], Fed]
    must_name: tuple[str, ...]  # texts the error must contain: the file, field or value

    @property
    def id(self) -> str:
        return f"{self.area}: {self.bad_input}"


@dataclass
class Env:
    tmp: Path
    url: str
    photos: dict[str, models.SourcePhoto]  # source_photos' rows by original file name
    photo_originals: dict[str, bytes]
    photo_run_ok: bool
    photo_home: Path
    review: Form
    lora_resources: dict
    lora_incoming: Path


def _error_of(call: Callable[[], object], *errors: type[BaseException]) -> str:
    """The message `call` raised (one of `errors`); a call that does not raise is a failed case."""
    try:
        call()
    except errors as exc:
        return str(exc)
    pytest.fail(f"{call} accepted the bad input")


# --- photos: the source_photos asset, materialised once on the whole corpus -----------------------


def _png(size: tuple[int, int], colour=(200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb_png(side: int = 20000) -> bytes:
    """A PNG whose header claims side x side pixels (a decompression bomb) with no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


FIRST_DEMO = sorted((DEMO / "photos").glob("*.jpg"))[0]


def _same_pixels_as_png() -> bytes:
    """The first demo photo re-encoded losslessly: other bytes, the same pixels."""
    with Image.open(FIRST_DEMO) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        return buffer.getvalue()


PHOTO_CORPUS: dict[str, Callable[[], bytes]] = {
    "zero.jpg": lambda: b"",
    "truncated.png": lambda: _png((400, 400))[:200],
    "notes.jpg": lambda: b"this is a text file, not a photo\n",
    "tiny.png": lambda: _png((16, 16)),
    "zz_duplicate.jpg": lambda: FIRST_DEMO.read_bytes(),
    "zz_same_pixels.png": _same_pixels_as_png,
    "bomb.png": _bomb_png,
    "half_jpeg.jpg": lambda: FIRST_DEMO.read_bytes()[: len(FIRST_DEMO.read_bytes()) // 2],
}


def _photo(name: str) -> Callable[[Env], Fed]:
    def feed(env: Env) -> Fed:
        row = env.photos.get(name)
        if row is None:
            return Fed("", [f"{name}: no source_photos row"])
        lost = []
        if not env.photo_run_ok:
            lost.append("the run failed: one bad photo stopped the others")
        if row.status != "quarantined":
            lost.append(f"{name} is {row.status}, not quarantined")
        kept = Path(row.path)
        if not kept.is_file() or kept.read_bytes() != env.photo_originals[name]:
            lost.append(f"{name}: the quarantined copy is missing or differs from the original")
        reasons = json.loads((env.photo_home / "quarantine" / "reasons.json").read_text())
        if reasons.get(name) != row.reason:
            lost.append(f"{name}: reasons.json says {reasons.get(name)!r}, the row {row.reason!r}")
        # The error as a reviewer reads it in reasons.json and the run's log: "<file>: <reason>".
        return Fed(f"{row.original_name}: {row.reason}", lost)
    return feed


# Links in photos/: their targets must never be read or copied (the corpus above is bytes).
PHOTO_LINKS = {"passwd_link.jpg": Path("/etc/passwd")}


def _photo_link(name: str) -> Callable[[Env], Fed]:
    def feed(env: Env) -> Fed:
        row = env.photos.get(name)
        if row is None:
            return Fed("", [f"{name}: no source_photos row"])
        lost = []
        if row.status != "quarantined":
            lost.append(f"{name} is {row.status}, not quarantined")
        if row.path is not None:
            lost.append(f"{name}: the row points at a copy ({row.path}); a link's target must not be copied")
        target_start = PHOTO_LINKS[name].read_bytes()[:64]
        copies = [str(f) for f in env.photo_home.rglob("*") if f.is_file() and target_start in f.read_bytes()]
        if copies:
            lost.append(f"{name}: the link's target was copied to {copies}")
        if not (env.tmp / "datasets" / "tester" / "photos" / name).is_symlink():
            lost.append(f"{name}: the user's link was removed")
        reasons = json.loads((env.photo_home / "quarantine" / "reasons.json").read_text())
        if reasons.get(name) != row.reason:
            lost.append(f"{name}: reasons.json says {reasons.get(name)!r}, the row {row.reason!r}")
        return Fed(f"{row.original_name}: {row.reason}", lost)
    return feed


PHOTO_CASES = [
    Case("photos", "link to /etc/passwd", _photo_link("passwd_link.jpg"), ("passwd_link.jpg", "symbolic link", "/etc/passwd")),
    Case("photos", "empty file", _photo("zero.jpg"), ("zero.jpg", "empty file")),
    Case("photos", "truncated PNG", _photo("truncated.png"), ("truncated.png", "corrupt image")),
    Case("photos", "half a JPEG", _photo("half_jpeg.jpg"), ("half_jpeg.jpg", "corrupt image")),
    Case("photos", "text file named .jpg", _photo("notes.jpg"), ("notes.jpg", "not an image")),
    Case("photos", "16x16 image", _photo("tiny.png"), ("tiny.png", "too small: 16x16", "at least 256 px")),
    Case("photos", "byte-identical duplicate", _photo("zz_duplicate.jpg"), ("zz_duplicate.jpg", f"duplicate of {FIRST_DEMO.name}")),
    Case("photos", "same pixels, other encoding", _photo("zz_same_pixels.png"), ("zz_same_pixels.png", "same pixels")),
    Case("photos", "20000x20000 decompression bomb", _photo("bomb.png"), ("bomb.png", "decompression bomb", "400000000")),
]

# --- persona.yaml: discovery keeps the good persona and names the bad file and field -------------


def _persona_yaml(change: dict | None = None, text: str | None = None) -> Callable[[Env], Fed]:
    def feed(env: Env) -> Fed:
        root = env.tmp / "personas" / f"case{time.monotonic_ns()}"
        write_persona(root, "good", photos=0)
        folder = write_persona(root, "bad", photos=0)
        path = folder / "persona.yaml"
        if text is not None:
            path.write_text(text)
        else:
            config = yaml.safe_load(path.read_text())
            config.update(change or {})
            path.write_text(yaml.safe_dump(config))
        before = path.read_bytes()
        personas, errors = discover_personas(root)
        lost = []
        if [p.slug for p in personas] != ["good"]:
            lost.append(f"the good persona was not kept: {[p.slug for p in personas]}")
        if path.read_bytes() != before:
            lost.append("the bad persona.yaml was changed")
        return Fed(errors.get("bad", ""), lost)
    return feed


def _yaml_case(bad_input: str, change: dict, field: str, message: str) -> Case:
    return Case("persona.yaml", bad_input, _persona_yaml(change), ("bad/persona.yaml", f"field '{field}'", message))


PERSONA_CASES = [
    _yaml_case("unknown timezone", {"timezone": "Mars/Olympus"}, "timezone", "Mars/Olympus"),
    _yaml_case("pillar weight 150", {"pillars": [{"name": "a", "weight": 150}]}, "pillars[0].weight", "less than or equal to 100"),
    _yaml_case("pillar priority 9", {"pillars": [{"name": "a", "weight": 10, "priority": 9}]}, "pillars[0].priority",
               "less than or equal to 5"),
    _yaml_case("posting window '9-5'", {"posting_windows": ["9-5"]}, "posting_windows", "9-5"),
    _yaml_case("posting window ending before it starts", {"posting_windows": ["15:00-10:00"]}, "posting_windows",
               "ends before it starts"),
    _yaml_case("trigger word with a space", {"trigger_word": "two words"}, "trigger_word", "pattern"),
    _yaml_case("hashtag with '!'", {"hashtags": {"targets": ["ok", "not ok!"]}}, "hashtags.targets", "not ok!"),
    _yaml_case("lower-case token_env", {"instagram": {"user_id": "1", "token_env": "lower"}}, "instagram.token_env", "pattern"),
    _yaml_case("unknown top-level key", {"unknown_key": 1}, "unknown_key", "Extra inputs"),
    _yaml_case("training.min_photos 0", {"training": {"min_photos": 0}}, "training.min_photos", "greater than or equal to 1"),
    _yaml_case("cron with minute 61", {"schedules": {"planning": "61 6 * * *"}}, "schedules.planning", "61"),
    _yaml_case("cron with four fields", {"schedules": {"report": "0 9 * *"}}, "schedules.report", "0 9 * *"),
    _yaml_case("generation cfg 31", {"generation": {"steps": [{"name": "base", "template": "txt2img_lora", "params": {"cfg": 31}}]}},
               "generation.steps[0].params.cfg", "less than or equal to 30"),
    _yaml_case("generation sampler 'euler_a'",
               {"generation": {"steps": [{"name": "base", "template": "txt2img_lora", "params": {"sampler": "euler_a"}}]}},
               "generation.steps[0].params.sampler", "euler_a"),
    _yaml_case("keep more than generated", {"generation": {"steps": [{"name": "base", "template": "txt2img_lora", "n": 2, "keep": 3}]}},
               "generation.steps[0]", "keep"),
    _yaml_case("weekly_cap -1", {"strategy": {"weekly_cap": -1}}, "strategy.weekly_cap", "greater than or equal to"),
    Case("persona.yaml", "broken YAML", _persona_yaml(text="name: [unclosed\n"), ("bad/persona.yaml", "invalid YAML")),
    Case("persona.yaml", "missing trigger_word", _persona_yaml(text="name: only a name\n"),
         ("bad/persona.yaml", "field 'trigger_word'", "Field required")),
    Case("persona.yaml", "a list, not a mapping", _persona_yaml(text="- a list\n"), ("bad/persona.yaml", "expected a mapping")),
]

# --- training parameters: refused before anything is built ----------------------------------------


def _training(override: dict) -> Callable[[Env], Fed]:
    def feed(env: Env) -> Fed:
        models_dir = env.tmp / f"models{time.monotonic_ns()}"
        models_dir.mkdir()
        error = _error_of(lambda: DiffusionBackend(models_dir=str(models_dir)).training_params(override), TrainingConfigError)
        built = sorted(p.name for p in models_dir.iterdir())
        return Fed(error, [f"built {built} before refusing"] if built else [])
    return feed


TRAINING_CASES = [
    Case("training", "rank 0", _training({"rank": 0}), ("training.rank=0", "[1, 256]")),
    Case("training", "learning rate 0.5", _training({"learning_rate": 0.5}), ("training.learning_rate=0.5", "out of range")),
    Case("training", "resolution 100", _training({"resolution": 100}), ("training.resolution=100", "multiple of 8")),
    Case("training", "steps 0", _training({"steps": 0}), ("training.steps=0", "out of range")),
]

# --- settings: Settings.from_env with the variable out of range -----------------------------------


def _setting(name: str, value: str, call: Callable[[Settings], object] | None = None) -> Callable[[Env], Fed]:
    def feed(env: Env) -> Fed:
        home = env.tmp / f"settings-home-{time.monotonic_ns()}"
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("PERSONA_HOME", str(home))
            patch.setenv(name, value)
            if call is None:
                error = _error_of(Settings.from_env, ValueError)
            else:
                error = _error_of(lambda: call(Settings.from_env()), ValueError)
        # Refused at start-up: no PERSONA_HOME, database or file was made on the way.
        return Fed(error, [f"{home} was created"] if home.exists() else [])
    return feed


SETTING_CASES = [
    Case("settings", "PERSONA_CANDIDATES_PER_RUN=1", _setting("PERSONA_CANDIDATES_PER_RUN", "1"),
         ("PERSONA_CANDIDATES_PER_RUN=1", "2..64")),
    Case("settings", "PERSONA_CANDIDATES_PER_RUN=65", _setting("PERSONA_CANDIDATES_PER_RUN", "65"),
         ("PERSONA_CANDIDATES_PER_RUN=65", "2..64")),
    Case("settings", "PERSONA_CANDIDATES_PER_RUN=four", _setting("PERSONA_CANDIDATES_PER_RUN", "four"),
         ("PERSONA_CANDIDATES_PER_RUN", "four")),
    Case("settings", "PERSONA_GENERATION_BACKEND=torch", _setting("PERSONA_GENERATION_BACKEND", "torch"),
         ("PERSONA_GENERATION_BACKEND='torch'",)),
    Case("settings", "PERSONA_GENERATION_BATCH_SIZE=0", _setting("PERSONA_GENERATION_BATCH_SIZE", "0"),
         ("PERSONA_GENERATION_BATCH_SIZE=0", "1..64")),
    Case("settings", "COMFYUI_MAX_IN_FLIGHT=0", _setting("COMFYUI_MAX_IN_FLIGHT", "0"), ("COMFYUI_MAX_IN_FLIGHT=0",)),
    Case("settings", "COMFYUI_JOB_TIMEOUT_S=soon", _setting("COMFYUI_JOB_TIMEOUT_S", "soon"), ("COMFYUI_JOB_TIMEOUT_S='soon'",)),
    Case("settings", "PERSONA_PUBLISHER=facebook", _setting("PERSONA_PUBLISHER", "facebook"), ("PERSONA_PUBLISHER='facebook'",)),
    Case("settings", "PERSONA_PUBLISH_WORKERS=0", _setting("PERSONA_PUBLISH_WORKERS", "0"), ("PERSONA_PUBLISH_WORKERS=0", "1..256")),
    Case("settings", "PERSONA_PUBLISH_MAX_RETRIES=21", _setting("PERSONA_PUBLISH_MAX_RETRIES", "21"),
         ("PERSONA_PUBLISH_MAX_RETRIES=21", "0..20")),
    Case("settings", "REVIEW_PORT=70000", _setting("REVIEW_PORT", "70000"), ("REVIEW_PORT=70000", "1..65535")),
    Case("settings", "REVIEW_EXPLORATION=1.5", _setting("REVIEW_EXPLORATION", "1.5"), ("REVIEW_EXPLORATION=1.5", "0..1")),
    Case("settings", "REVIEW_MAX_BODY_BYTES=10", _setting("REVIEW_MAX_BODY_BYTES", "10"), ("REVIEW_MAX_BODY_BYTES=10",)),
    Case("settings", "REVIEW_TOKENS with a 5-character token",
         _setting("REVIEW_TOKENS", "alice:short", lambda s: s.reviewer_tokens()), ("REVIEW_TOKENS entry 1 (alice)", "5 characters")),
    Case("settings", "REVIEW_TOKENS entry without ':'",
         _setting("REVIEW_TOKENS", "alice-token-0123456789", lambda s: s.reviewer_tokens()), ("REVIEW_TOKENS entry 1", "name:token")),
    Case("settings", "PERSONA_FRESHNESS_DAYS=-1", _setting("PERSONA_FRESHNESS_DAYS", "-1"), ("PERSONA_FRESHNESS_DAYS=-1", "0..365")),
]

# --- alert webhook settings -----------------------------------------------------------------------


def _alert_setting(name: str, value: str) -> Callable[[Env], Fed]:
    return _setting(name, value)


def _alert_delivery(url: str) -> Callable[[Env], Fed]:
    """An alert waiting in the outbox, delivered to a webhook URL that cannot work."""
    def feed(env: Env) -> Fed:
        key = f"census:{time.monotonic_ns()}"
        now = datetime.now(timezone.utc)
        with session_scope(env.url) as session:
            alert_outbox.enqueue(session, dedupe_key=key, kind="run_failure", subject="job census",
                                 text="census alert", persona_slug="tester", now=now)
        alert_outbox.deliver_due(AppDatabase(url=env.url), AlertWebhook(url=url, timeout_s=2, max_attempts=8), now=now)
        with session_scope(env.url) as session:
            alert = session.scalar(select(models.Alert).where(models.Alert.dedupe_key == key))
            status, error, text = alert.status, alert.last_error or "", alert.text
        lost = [] if status == "pending" and text == "census alert" else [f"the alert is {status}, no longer waiting for a retry"]
        return Fed(error, lost)
    return feed


ALERT_CASES = [
    Case("alerts", "ALERT_MAX_ATTEMPTS=0", _alert_setting("ALERT_MAX_ATTEMPTS", "0"), ("ALERT_MAX_ATTEMPTS=0", "1..100")),
    Case("alerts", "ALERT_MAX_ATTEMPTS=many", _alert_setting("ALERT_MAX_ATTEMPTS", "many"), ("ALERT_MAX_ATTEMPTS='many'",)),
    Case("alerts", "ALERT_WEBHOOK_URL without a scheme", _alert_delivery("hooks.slack.example/services/T0/B0/x"),
         ("ALERT_WEBHOOK_URL could not be reached",)),
    Case("alerts", "ALERT_WEBHOOK_URL on a closed port", _alert_delivery("http://127.0.0.1:9/services/T0/B0/x"),
         ("ALERT_WEBHOOK_URL could not be reached",)),
]

# --- ComfyUI workflow templates: the folder loader names the bad file; the good ones stay ---------


def _workflow(make: Callable[[str], str], name: str = "zz_bad.json") -> Callable[[Env], Fed]:
    def feed(env: Env) -> Fed:
        folder = env.tmp / f"workflows{time.monotonic_ns()}"
        shutil.copytree(REPO_WORKFLOWS, folder)
        good = {p.name: p.read_bytes() for p in folder.glob("*.json")}
        (folder / name).write_text(make((REPO_WORKFLOWS / "txt2img_lora.json").read_text()))
        error = _error_of(lambda: load_templates(folder), TemplateError)
        lost = [n for n, data in good.items() if (folder / n).read_bytes() != data]
        (folder / name).unlink()
        loaded = sorted(load_templates(folder))  # without the bad file, every good template still loads
        if loaded != sorted(Path(n).stem for n in good):
            lost.append(f"the good templates no longer load: {loaded}")
        return Fed(error, lost)
    return feed


def _ui_format(_: str) -> str:
    return json.dumps({"last_node_id": 9, "nodes": [{"id": 3, "type": "KSampler"}], "links": [[1, 4, 0, 3, 0, "MODEL"]]})


def _misspelt_placeholder(text: str) -> str:
    assert "{{prompt}}" in text
    return text.replace("{{prompt}}", "{{promt}}", 1)


def _no_class_type(text: str) -> str:
    graph = json.loads(text)
    first = sorted(graph)[0]
    del graph[first]["class_type"]
    return json.dumps(graph)


WORKFLOW_CASES = [
    Case("workflows", "not JSON", _workflow(lambda t: t[: len(t) // 2]), ("zz_bad.json", "not valid JSON")),
    Case("workflows", "UI export instead of API format", _workflow(_ui_format), ("zz_bad.json", "Save (API format)")),
    Case("workflows", "top level is a list", _workflow(lambda t: "[1, 2]"), ("zz_bad.json", "top level must be a JSON object")),
    Case("workflows", "misspelt placeholder {{promt}}", _workflow(_misspelt_placeholder), ("zz_bad.json", "{{promt}}", "'text'")),
    Case("workflows", "node without class_type", _workflow(_no_class_type), ("zz_bad.json", "has no class_type")),
    Case("workflows", "no nodes", _workflow(lambda t: "{}"), ("zz_bad.json", "has no nodes")),
]

# --- generation parameters ------------------------------------------------------------------------


def _generation(change: dict) -> Callable[[Env], Fed]:
    def feed(env: Env) -> Fed:
        params = {**GOOD_GENERATION, **change}
        error = _error_of(lambda: check_generation_params(**params), GenerationParamError)
        # The check is pure: the caller's parameters are as they were.
        return Fed(error, [] if params == {**GOOD_GENERATION, **change} else ["the parameters were changed"])
    return feed


GENERATION_CASES = [
    Case("generation", "width 500", _generation({"width": 500}), ("width = 500", "multiple of 8")),
    Case("generation", "height 4096", _generation({"height": 4096}), ("height = 4096", "256 to 2048")),
    Case("generation", "steps 0", _generation({"steps": 0}), ("steps = 0", "1 to 150")),
    Case("generation", "cfg 31", _generation({"cfg": 31}), ("cfg = 31",)),
    Case("generation", "sampler 'euler_a'", _generation({"sampler": "euler_a"}), ("sampler = 'euler_a'", "euler_ancestral")),
    Case("generation", "scheduler 'fancy'", _generation({"scheduler": "fancy"}), ("scheduler = 'fancy'",)),
    Case("generation", "denoise 0", _generation({"denoise": 0}), ("denoise = 0",)),
]

# --- LoRA files dropped in loras/incoming: the import job refuses and moves them with the reason ---


def _lora(relpath: str, make: Callable[[Path], object], metadata: dict | None = None) -> Callable[[Env], Fed]:
    def feed(env: Env) -> Fed:
        source = env.lora_incoming / relpath
        source.parent.mkdir(parents=True, exist_ok=True)
        make(source)
        original = source.read_bytes()
        meta_path = source.with_name(source.name.rsplit(".", 1)[0] + ".metadata.json")
        if metadata is not None:
            meta_path.write_text(json.dumps(metadata))
        with session_scope(env.url) as session:
            library_before = session.scalar(select(func.count()).select_from(models.LoraModel))
        run_config = {"ops": {"import_lora": {"config": {"path": relpath, "sha256": sha256_file(source)}}}}
        result = lora_import_job.execute_in_process(run_config=run_config, resources=env.lora_resources, raise_on_error=False)
        failure = next((e for e in result.all_events if e.is_step_failure), None)
        if failure is None:
            return Fed("", ["the import job succeeded"])
        data = failure.step_failure_data
        error = data.user_failure_data.description if data.user_failure_data else data.error.message
        slug = Path(relpath).parent.name
        moved = env.lora_incoming / "rejected" / slug / source.name
        lost = []
        if not moved.is_file() or moved.read_bytes() != original:
            lost.append(f"{moved} is missing or differs from the dropped file")
        reason = moved.with_name(moved.name + ".reason.txt")
        if not reason.is_file() or reason.read_text().strip() != error:
            lost.append(f"{reason} does not hold the reason")
        if source.exists():
            lost.append(f"{source} is still in incoming/ (it would be retried forever)")
        with session_scope(env.url) as session:
            if session.scalar(select(func.count()).select_from(models.LoraModel)) != library_before:
                lost.append("a library row was added for a refused file")
        return Fed(error, lost)
    return feed


def _good_header(path: Path) -> None:
    _raw_safetensors(path, {"lora_unet_x.lora_down.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)


def _outside_link(path: Path) -> None:
    """`path` as a link to a LoRA-looking file outside the drop folder (incoming/../)."""
    outside = path.parents[2] / f"outside-{path.name}"
    _good_header(outside)
    path.symlink_to(outside)


LORA_CASES = [
    Case("lora import", "link to a file outside the drop folder", _lora("tester/linked.safetensors", _outside_link),
         ("tester/linked.safetensors", "symbolic link")),
    Case("lora import", "two-byte file", _lora("tester/short.safetensors", lambda p: p.write_bytes(b"\x01\x02")),
         ("short.safetensors", "too short")),
    Case("lora import", "header length past the end", _lora("tester/past.safetensors", lambda p: _raw_safetensors(p, b'{"a": 1}', length=5000)),
         ("past.safetensors", "runs past the end")),
    Case("lora import", "header not JSON", _lora("tester/nojson.safetensors", lambda p: _raw_safetensors(p, b"\xfe\xfe not json")),
         ("nojson.safetensors", "not UTF-8 JSON")),
    Case("lora import", "tensor data past the end",
         _lora("tester/cut.safetensors", lambda p: _raw_safetensors(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)),
         ("cut.safetensors", "run past")),
    Case("lora import", "a pickle .ckpt", _lora("tester/model.ckpt", lambda p: p.write_bytes(b"PK\x03\x04 pickle")),
         ("model.ckpt", "not a .safetensors file")),
    Case("lora import", "SD1.5 LoRA for a tiny-sd base", _lora("tester/sd15.safetensors", lambda p: _foreign_lora(p, 768)),
         ("sd15.safetensors", "LoRA is for sd15", "tiny-sd")),
    Case("lora import", "folder of an unknown persona", _lora("nobody/x.safetensors", lambda p: _foreign_lora(p, 32)),
         ("x.safetensors", "unknown persona 'nobody'")),
    Case("lora import", "metadata weight 3.5", _lora("tester/heavy.safetensors", lambda p: _foreign_lora(p, 32), {"weight": 3.5}),
         ("heavy.metadata.json", "weight = 3.5", "0.0 to 2.0")),
    Case("lora import", "metadata primary 'yes'", _lora("tester/prim.safetensors", lambda p: _foreign_lora(p, 32), {"primary": "yes"}),
         ("prim.metadata.json", "primary='yes'")),
]

# --- the review form over HTTP: bad votes, ids, captions and slots -------------------------------


def _review_state(env: Env) -> tuple:
    """Everything a refused review request must leave as it was."""
    with session_scope(env.url) as session:
        votes = session.scalar(select(func.count()).select_from(models.Vote))
        events = session.scalar(select(func.count()).select_from(models.ReviewEvent))
        posts = [(p.id, p.caption, tuple(p.hashtags or ()), p.scheduled_at, p.status)
                 for p in session.scalars(select(models.Post).order_by(models.Post.id))]
        steps = [(s.id, s.status, s.top_k) for s in session.scalars(select(models.RunStep).order_by(models.RunStep.id))]
        offers = [(o.id, o.outcome) for o in session.scalars(select(models.PairOffer).order_by(models.PairOffer.id))]
    return votes, events, posts, steps, offers


def _review(send: Callable[..., object], status: int, prepare: Callable[[Env], object] | None = None) -> Callable[[Env], Fed]:
    """`prepare(env)` (e.g. asking for a pair to vote on) runs before the state is taken;
    `send(env, csrf[, prepared])` makes the bad request."""
    def feed(env: Env) -> Fed:
        csrf = env.review.login()
        prepared = prepare(env) if prepare else None
        before = _review_state(env)
        response = send(env, csrf, prepared) if prepare else send(env, csrf)
        text = response.json().get("error", "") if response.headers.get("content-type", "").startswith("application/json") \
            else html.unescape(re.sub(r"<[^>]+>", " ", response.text))
        lost = [] if _review_state(env) == before else ["a refused request changed votes, posts, steps or offers"]
        if response.status_code != status:
            lost.append(f"HTTP {response.status_code}, expected {status}")
        return Fed(" ".join(text.split()), lost)
    return feed


def _pair(env: Env) -> dict:
    return env.review.pair()


def _vote(change: Callable[[dict, list[int]], dict]) -> Callable[[Env, str, dict], object]:
    """A vote on the offered pair, with `change` applied to its body."""
    def send(env: Env, csrf: str, pair: dict):
        body = {"offer_id": pair["offer_id"], "winner_id": pair["left"]["id"], "loser_id": pair["right"]["id"]}
        return env.review.client.post("/api/votes", json=change(body, env.review.seed.candidate_ids), headers={"X-CSRF-Token": csrf})
    return send


def _outside_pair(body: dict, ids: list[int]) -> dict:
    outsider = next(i for i in ids if i not in (body["winner_id"], body["loser_id"]))
    return {**body, "winner_id": outsider}


def _post_form(action: str, **fields: str) -> Callable[[Env, str], object]:
    def send(env: Env, csrf: str):
        post_id = env.review.seed.post_ids[0]
        return env.review.client.post(f"/posts/{post_id}/{action}", data={"csrf_token": csrf, **fields}, follow_redirects=False)
    return send


def _slot_of_second_post(env: Env, minutes: int) -> str:
    """The first post moved `minutes` after the second post's slot, as local time in Lisbon."""
    from zoneinfo import ZoneInfo

    with session_scope(env.url) as session:
        slot = session.get(models.Post, env.review.seed.post_ids[1]).scheduled_at
    return (slot + timedelta(minutes=minutes)).astimezone(ZoneInfo("Europe/Lisbon")).strftime("%Y-%m-%dT%H:%M")


def _move_near(env: Env, csrf: str):
    return _post_form("move", new_time=_slot_of_second_post(env, 20))(env, csrf)


def _dst_gap_slot() -> str:
    """02:30 on the next last Sunday of March: that hour does not exist in Lisbon (01:00 → 02:00)."""
    year = datetime.now(timezone.utc).year + 1
    day = max(d for d in range(25, 32) if datetime(year, 3, d).weekday() == 6)
    return f"{year}-03-{day:02d}T01:30"


REVIEW_CASES = [
    Case("review form", "vote for a candidate outside the offered pair",
         _review(_vote(_outside_pair), 400, _pair), ("not the pair of offer",)),
    Case("review form", "vote on offer 999999",
         _review(_vote(lambda b, _: {**b, "offer_id": 999999}), 404, _pair), ("999999",)),
    Case("review form", "offer_id 'abc'",
         _review(_vote(lambda b, _: {**b, "offer_id": "abc"}), 400, _pair), ("offer_id", "'abc'")),
    Case("review form", "winner_id -3",
         _review(_vote(lambda b, _: {**b, "winner_id": -3}), 400, _pair), ("winner_id", "-3")),
    Case("review form", "vote body that is not JSON",
         _review(lambda env, csrf: env.review.client.post("/api/votes", content=b"{oops", headers={"X-CSRF-Token": csrf,
                 "Content-Type": "application/json"}), 400), ("body is not JSON",)),
    Case("review form", "pair for step 0",
         _review(lambda env, csrf: env.review.client.get("/api/steps/0/pair"), 404), ("step 0",)),
    Case("review form", "approve a step with K=99",
         _review(lambda env, csrf: env.review.client.post(f"/steps/{env.review.seed.step_ids[0]}/approve",
                                                          data={"csrf_token": csrf, "top_k": "99"}, follow_redirects=False), 400),
         ("top_k=99", "out of range 1..6")),
    Case("review form", "approve a step with K='all'",
         _review(lambda env, csrf: env.review.client.post(f"/steps/{env.review.seed.step_ids[0]}/approve",
                                                          data={"csrf_token": csrf, "top_k": "all"}, follow_redirects=False), 400),
         ("top_k", "'all'")),
    Case("review form", "unknown post action 'publish-now'",
         _review(_post_form("publish-now"), 404), ("publish-now",)),
]

# --- captions over Instagram's limits -------------------------------------------------------------

CAPTION_VALUES = {"name": "Mira Sol", "pillar": "travel", "theme": "tram at dawn", "guidelines": "New places."}


def _caption_template(templates: list[str], values: dict) -> Callable[[Env], Fed]:
    def feed(env: Env) -> Fed:
        copy = [str(t) for t in templates]
        error = _error_of(lambda: template_caption(templates, values, 0, what="datasets/tester/persona.yaml captions.templates"),
                          CaptionTemplateError)
        return Fed(error, [] if templates == copy else ["the templates were changed"])
    return feed


def _caption_text(caption: str, hashtags: list[str], max_hashtags: int) -> Callable[[Env], Fed]:
    def feed(env: Env) -> Fed:
        problems = validate_post_text(caption, hashtags, max_hashtags)
        return Fed("; ".join(problems), [] if problems else ["the text was accepted"])
    return feed


CAPTION_CASES = [
    Case("captions", "template filling to 2300 characters",
         _caption_template(["{guidelines}"], {**CAPTION_VALUES, "guidelines": "x" * 2300}), ("persona.yaml captions.templates", "template 0", "2300 characters", "2200")),
    Case("captions", "template with unknown {mood}", _caption_template(["{pillar}", "{mood} {pillar}"], CAPTION_VALUES),
         ("persona.yaml captions.templates", "{mood}")),
    Case("captions", "caption + hashtags of 2210 characters", _caption_text("y" * 2200, ["#sun", "#sea"], 5),
         ("2210 characters", "the limit is 2200")),
    Case("captions", "31 hashtags", _caption_text("fine", [f"#tag{i}" for i in range(31)], 30), ("31 hashtags", "the limit is 30")),
    Case("captions", "21 @mentions", _caption_text(" ".join(f"@friend{i}" for i in range(21)), [], 5), ("21 mentions", "the limit is 20")),
    Case("captions", "review edit of 2300 characters", _review(_post_form("edit", caption="z" * 2300, hashtags="one"), 400),
         ("2200",)),
    Case("captions", "review edit with 3 hashtags (limit 2)", _review(_post_form("edit", caption="fine", hashtags="one two three"), 400),
         ("the limit is 2",)),
    Case("captions", "review edit with hashtag '#bad-tag!'", _review(_post_form("edit", caption="fine", hashtags="#bad-tag!"), 400),
         ("bad-tag!",)),
]

# --- post schedule inputs -------------------------------------------------------------------------


def _cron(expression: str) -> Callable[[Env], Fed]:
    def feed(env: Env) -> Fed:
        return Fed(_error_of(lambda: parse_cron(expression), CronError), [])
    return feed


SCHEDULE_CASES = [
    Case("schedules", "move a post into the past", _review(_post_form("move", new_time="2020-01-01T12:00"), 400), ("in the past",)),
    Case("schedules", "move a post 20 minutes from another", _review(_move_near, 400), ("within 60 minutes",)),
    Case("schedules", "move to a time the DST change skips",
         _review(lambda env, csrf: _post_form("move", new_time=_dst_gap_slot())(env, csrf), 400), ("does not exist in Europe/Lisbon",)),
    Case("schedules", "move to 'next tuesday'", _review(_post_form("move", new_time="next tuesday"), 400), ("next tuesday",)),
    Case("schedules", "cron '*/0 * * * *'", _cron("*/0 * * * *"), ("*/0 * * * *",)),
    Case("schedules", "cron '0 25 * * *'", _cron("0 25 * * *"), ("0 25 * * *", "25")),
    Case("schedules", "cron '0 9 * * FUNDAY'", _cron("0 9 * * FUNDAY"), ("FUNDAY",)),
]

CASES: list[Case] = [*PHOTO_CASES, *PERSONA_CASES, *TRAINING_CASES, *SETTING_CASES, *ALERT_CASES, *WORKFLOW_CASES,
                     *GENERATION_CASES, *LORA_CASES, *REVIEW_CASES, *CAPTION_CASES, *SCHEDULE_CASES]

# --------------------------------------------------------------------------- the environment


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Iterator[Env]:
    """One PostgreSQL application database for the whole census: source_photos materialised once
    on the bad corpus, the review form seeded, a LoRA drop folder for persona `tester`."""
    tmp = tmp_path_factory.mktemp("census")
    url, drop = make_database("postgresql", tmp)
    try:
        settings = make_settings(tmp, url)
        folder = write_persona(settings.datasets_dir, "tester", photos=10)
        originals = {}
        for name, make in PHOTO_CORPUS.items():
            originals[name] = make()
            (folder / "photos" / name).write_bytes(originals[name])
        for name, target in PHOTO_LINKS.items():
            (folder / "photos" / name).symlink_to(target)
        result, resources = materialise_persona([source_photos], settings, folder)
        with session_scope(url) as session:
            rows = {r.original_name: r for r in session.scalars(select(models.SourcePhoto))}
            session.expunge_all()
        unchanged = all((folder / "photos" / n).read_bytes() == data for n, data in originals.items())

        review_tmp = tmp / "review"
        review_tmp.mkdir()
        form = make_form(url, review_tmp, posts=2)

        # A local "base model" folder whose unet config says tiny-sd (cross-attention 32): the
        # family check runs for real without building a model.
        base = tmp / "base-model"
        (base / "unet").mkdir(parents=True)
        (base / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 32}))
        lora_resources = {**resources, "diffusion": DiffusionBackend(base_model=str(base), models_dir=str(tmp / "models"))}
        incoming = PersonaStorage(home=str(settings.home)).lora_incoming_dir()
        yield Env(tmp, url, rows, originals, result.success and unchanged,
                  settings.home / "personas" / "tester" / "photos", form, lora_resources, incoming)
    finally:
        drop()


RESULTS: dict[str, Fed] = {}


def _run(case: Case, env: Env) -> Fed:
    fed = RESULTS.get(case.id) or case.feed(env)
    RESULTS[case.id] = fed
    return fed


def _check(case: Case, fed: Fed) -> list[str]:
    """What is wrong with one case's outcome: texts the error does not name, and anything lost."""
    missing = [text for text in case.must_name if text not in fed.error]
    problems = [f"the error does not name {text!r}: {fed.error!r}" for text in missing]
    return problems + fed.lost


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_naming_it_and_nothing_is_lost(case: Case, env: Env) -> None:
    fed = _run(case, env)
    assert _check(case, fed) == []


def test_census_counts_every_case(env: Env, figure) -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "two cases share an id"
    failed = {c.id: _check(c, _run(c, env)) for c in CASES}
    failed = {k: v for k, v in failed.items() if v}
    assert failed == {}
    per_area = Counter(c.area for c in CASES)
    named = sum(1 for c in CASES if all(t in RESULTS[c.id].error for t in c.must_name))
    kept = sum(1 for c in CASES if not RESULTS[c.id].lost)
    n = len(CASES)
    assert named == kept == n
    figure("bad input", "census", f"{n} cases, every error names the file/field/value; nothing lost",
           cases=n, areas=len(per_area), named=named, nothing_lost=kept,
           **{area.replace(" ", "_").replace(".", "_"): count for area, count in per_area.items()})
