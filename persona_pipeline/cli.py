"""`persona-pipeline`: demo, db upgrade, personas check, schedules, demo-photos, trace, lora
list/set/promote/rollback/history, review, settings, world data/train-classifier."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from persona_pipeline import lora_commands
from persona_pipeline.world import commands as world_commands


class CliError(Exception):
    """An ordinary failure with a known fix: `main` prints it as one `error:` line and exits 2."""


def _settings():
    from persona_pipeline.settings import Settings

    try:
        return Settings.from_env()
    except ValueError as exc:  # a bad environment variable: the message names it and its value
        raise CliError(str(exc)) from None


def _database_url(settings) -> str:
    """The application database's URL, once it answers and is at the latest revision; else the
    one-line reason with the command that fixes it."""
    from sqlalchemy.exc import SQLAlchemyError

    from persona_pipeline.db.session import current_revision, head_revision

    url = settings.database_url
    try:
        revision = current_revision(url)
    except SQLAlchemyError as exc:
        raise CliError(f"cannot open the application database {_redact(url)}: {_first_line(exc)}") from None
    if revision is None:
        raise CliError(f"the application database {_redact(url)} has no tables yet: run `persona-pipeline db upgrade`")
    head = head_revision()
    if revision != head:
        raise CliError(f"the application database {_redact(url)} is at revision {revision}, not the latest {head}: "
                       "run `persona-pipeline db upgrade`")
    return url


def _first_line(exc: BaseException) -> str:
    """An exception's message without the SQL, parameters and background links SQLAlchemy appends."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def cmd_db_upgrade(_args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from persona_pipeline.db.session import current_revision, upgrade

    settings = _settings()
    try:
        upgrade(settings.database_url)
    except SQLAlchemyError as exc:
        raise CliError(f"cannot upgrade the application database {_redact(settings.database_url)}: {_first_line(exc)}") from None
    print(f"application database at revision {current_revision(settings.database_url)}: {_redact(settings.database_url)}")
    return 0


def cmd_personas_check(_args: argparse.Namespace) -> int:
    from persona_pipeline.personas import discover_personas

    settings = _settings()
    personas, errors = discover_personas(settings.datasets_dir)
    for persona in personas:
        print(f"ok      {persona.slug}: {persona.config.name}, {len(persona.photo_files())} photo files, "
              f"{len(persona.config.pillars)} pillars")
    for slug, error in errors.items():
        print(f"INVALID {slug}: {error}")
    if not personas and not errors:
        print(f"no persona folders under {settings.datasets_dir}")
    return 1 if errors else 0


def cmd_schedules(args: argparse.Namespace) -> int:
    """Each persona's schedules (persona.yaml `schedules:`) with the next fire times in its timezone."""
    from datetime import datetime, timezone

    from persona_pipeline.automation.persona_schedules import SCHEDULE_KINDS, describe_schedules
    from persona_pipeline.personas import discover_personas

    settings = _settings()
    try:
        now = datetime.fromisoformat(args.now) if args.now else datetime.now(timezone.utc)
    except ValueError:
        raise CliError(f"--now {args.now!r} is not an ISO date-time (e.g. 2026-03-08T05:00:00+00:00)") from None
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    personas, errors = discover_personas(settings.datasets_dir)
    if args.persona:
        personas = [p for p in personas if p.slug == args.persona]
        errors = {slug: error for slug, error in errors.items() if slug == args.persona}
        if not personas and not errors:
            raise CliError(f"no persona folder {args.persona!r} under {settings.datasets_dir}")
    rows = describe_schedules(personas, now, count=args.count)
    for persona in personas:
        print(f"{persona.slug} ({persona.config.timezone})")
        for row in (r for r in rows if r["slug"] == persona.slug):
            job = SCHEDULE_KINDS[row["kind"]].name
            if row["cron"] is None:
                print(f"  {row['kind']:<11} off{'':<16} ({job})")
                continue
            upcoming = ", ".join(t.strftime("%Y-%m-%d %H:%M %Z") for t in row["next"])
            print(f"  {row['kind']:<11} {row['cron']:<18} {upcoming}  ({job})")
    for slug, error in errors.items():
        print(f"INVALID {slug}: {error}")
    if not personas and not errors:
        print(f"no persona folders under {settings.datasets_dir}")
    return 1 if errors else 0


def cmd_demo_photos(args: argparse.Namespace) -> int:
    from persona_pipeline.demo_photos import make_demo_photos

    written = make_demo_photos(Path(args.out))
    print(f"wrote {len(written)} photos to {args.out}")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from persona_pipeline.db.session import session_scope
    from persona_pipeline.trace import trace_post

    with session_scope(_database_url(_settings())) as session:
        print(json.dumps(trace_post(session, args.post_id), indent=2))
    return 0


def _write_demo_sheet(session, persona_id: int, path: Path) -> None:
    """The README's contact sheet: every candidate the demo drew, oldest first, each under its prompt."""
    from sqlalchemy import select

    from persona_pipeline.db import models
    from persona_pipeline.previews import contact_sheet_png

    rows = list(session.execute(select(models.Candidate.image_path, models.GenerationRun.prompt).join(
        models.GenerationRun, models.Candidate.run_id == models.GenerationRun.id).where(
        models.GenerationRun.persona_id == persona_id).order_by(models.Candidate.id)))
    png = contact_sheet_png([Path(p) for p, _ in rows], labels=[prompt for _, prompt in rows], thumb=128, columns=6)
    if png is None:
        raise CliError("the demo drew no candidates, so there is no contact sheet to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    print(f"  sheet       {path}  ({len(rows)} candidates)")


def cmd_demo(args: argparse.Namespace) -> int:
    """Materialise the whole chain for one persona on the embedded defaults, then publish."""
    started = time.perf_counter()
    os.environ.setdefault("PERSONA_AUTO_REVIEW", "1")  # no reviewer in the demo: open_clip scores vote
    settings = _settings()
    dagster_home = settings.dagster_home or settings.home / "dagster"
    dagster_home.mkdir(parents=True, exist_ok=True)
    if not (dagster_home / "dagster.yaml").exists():
        (dagster_home / "dagster.yaml").write_text("# embedded SQLite storage (quickstart)\ntelemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(dagster_home)

    import dagster as dg
    import diffusers
    import transformers
    from sqlalchemy import select

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    from persona_pipeline.automation.persona_sensor import persona_sensor
    from persona_pipeline.db import models
    from persona_pipeline.db.session import session_scope, upgrade
    from persona_pipeline.definitions import build_definitions, build_resources
    from persona_pipeline.trace import trace_post

    upgrade(settings.database_url)
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.get()
    resources = build_resources(settings)
    with dg.build_sensor_context(instance=instance, resources=resources) as context:
        result = persona_sensor(context)
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    if args.persona not in instance.get_dynamic_partitions("personas"):
        raise CliError(f"persona {args.persona!r} was not found under {settings.datasets_dir}; "
                       "see `persona-pipeline personas check`")
    print(f"[{time.perf_counter() - started:5.1f}s] persona {args.persona!r} registered; materialising the chain")
    quiet = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    chain = defs.resolve_job_def("persona_chain").execute_in_process(partition_key=args.persona, instance=instance,
                                                                      run_config=quiet)
    print(f"[{time.perf_counter() - started:5.1f}s] chain run {chain.run_id}: {'success' if chain.success else 'FAILED'}")
    publish = defs.resolve_job_def("publish_job").execute_in_process(instance=instance, run_config=quiet)
    print(f"[{time.perf_counter() - started:5.1f}s] publish run {publish.run_id}: {publish.output_for_node('publish_due_posts')}")
    report = defs.resolve_job_def("weekly_reporting").execute_in_process(partition_key=args.persona, instance=instance,
                                                                          run_config=quiet)
    report_path = (report.asset_materializations_for_node("weekly_report")[0].metadata["path"].value
                   if report.success else "FAILED")
    print(f"[{time.perf_counter() - started:5.1f}s] weekly report run {report.run_id}: {report_path}")

    with session_scope(settings.database_url) as session:
        persona = session.scalar(select(models.Persona).where(models.Persona.slug == args.persona))
        lora = session.scalar(select(models.LoraModel).join(models.PersonaLora).where(
            models.PersonaLora.persona_id == persona.id, models.PersonaLora.is_primary.is_(True)))
        runs = list(session.scalars(select(models.GenerationRun).where(models.GenerationRun.persona_id == persona.id)
                                    .order_by(models.GenerationRun.id.desc()).limit(3)))
        published = list(session.scalars(select(models.Post).where(models.Post.persona_id == persona.id,
                                                                   models.Post.status == "published").order_by(models.Post.id)))
        upcoming = list(session.scalars(select(models.Post).where(models.Post.persona_id == persona.id,
                                                                  models.Post.status == "scheduled")))
        print("\nWhere things are")
        print(f"  LoRA        {lora.path}  (library id {lora.id})")
        for run in reversed(runs):
            winner = session.get(models.Candidate, run.winner_candidate_id) if run.winner_candidate_id else None
            print(f"  candidates  {Path(session.scalars(select(models.Candidate.image_path).where(models.Candidate.run_id == run.id)).first()).parent}"
                  f"  (run {run.id}; winner #{winner.id if winner else '-'}, Elo {winner.elo if winner else '-'})")
        print(f"  rankings    Elo on every candidate (table `candidates`, {_redact(settings.database_url)}); "
              f"the ranking table is on the `rankings` asset in the UI")
        print(f"  outbox      {settings.home / 'outbox' / args.persona}  ({len(published)} published, {len(upcoming)} scheduled later)")
        print(f"  report      {report_path}  (asset `weekly_report`)")
        print(f"  schedules   `persona-pipeline schedules --persona {args.persona}`: when planning, generation, "
              "posting and the report run on their own")
        if args.contact_sheet:
            _write_demo_sheet(session, persona.id, Path(args.contact_sheet))
        if published:
            print(f"\nProvenance of post {published[0].id} (`persona-pipeline trace {published[0].id}`):")
            print(json.dumps(trace_post(session, published[0].id), indent=2))
    print(f"\nOpen it in the Dagster UI:\n  DAGSTER_HOME={dagster_home} PERSONA_HOME={settings.home} "
          f".venv/bin/dagster dev -w workspace.yaml   # then http://127.0.0.1:3000, asset group views")
    print(f"\ndemo finished in {time.perf_counter() - started:.1f}s")
    return 0 if chain.success and publish.success and report.success and published else 1


def cmd_lora_list(args: argparse.Namespace) -> int:
    from persona_pipeline.db import promotion, registry
    from persona_pipeline.db.session import session_scope

    with session_scope(_database_url(_settings())) as session:
        persona = registry.get_persona(session, args.slug)  # UnknownPersona is a LookupError: one line
        mappings = registry.list_loras(session, persona.id)
        if not mappings:
            print(f"persona {args.slug!r} has no LoRA yet (train one, or drop a .safetensors into "
                  f"PERSONA_HOME/loras/incoming/{args.slug}/)")
        for mapping in mappings:
            lora = mapping.lora
            role = "primary" if mapping.is_primary else "chained" if mapping.chained else ""
            print(f"{lora.id:>5}  v{lora.version or '-':<3} {role:<7}  "
                  f"weight {mapping.weight:.2f}  {lora.origin:<8} {lora.family or '-':<9} {lora.key_format or '-':<9} "
                  f"{lora.name}  {lora.path}")
            last = promotion.decisions(session, persona.id, lora.id)[-1:]
            if last and not mapping.is_primary:
                print(f"{'':>12}{last[0].kind} by {last[0].reviewer}: {last[0].payload.get('reason')}")
    return 0


def cmd_lora_set(args: argparse.Namespace) -> int:
    import getpass

    from persona_pipeline.db import promotion, registry
    from persona_pipeline.db.session import session_scope

    if args.weight is None and args.primary is None and args.chain is None:
        raise CliError("nothing to change: give --weight W, --primary/--no-primary or --chain/--no-chain")
    with session_scope(_database_url(_settings())) as session:
        persona = registry.get_persona(session, args.slug)
        try:
            if args.primary:  # a change of primary is an event with who and why, as `lora promote` makes it
                current = registry.primary_lora(session, persona.id)
                if current is None or current.lora_id != args.lora_id:
                    promotion.promote(session, persona.id, args.lora_id, getpass.getuser(), "lora set --primary")
            elif args.primary is False:  # taking the primary away is an event too
                current = registry.primary_lora(session, persona.id)
                if current is not None and current.lora_id == args.lora_id:
                    promotion.demote(session, persona.id, args.lora_id, getpass.getuser(), "lora set --no-primary")
            mapping = registry.set_lora_mapping(session, persona.id, args.lora_id, weight=args.weight, primary=args.primary,
                                                chained=args.chain)
        except ValueError as exc:  # a weight out of range, too many chained LoRAs, a LoRA not in the library
            raise CliError(str(exc)) from None
        print(f"{args.slug}: LoRA {args.lora_id} weight {mapping.weight:.2f}{', primary' if mapping.is_primary else ''}"
              f"{', chained' if mapping.chained else ''}")
    return 0


def cmd_lora_export_comfyui(args: argparse.Namespace) -> int:
    """Copy every persona's primary and chained LoRAs into a ComfyUI models/loras folder under the
    names the generated graphs use (`<COMFYUI_LORA_PREFIX>/<slug>/<file>`)."""
    from sqlalchemy import select

    from persona_pipeline.db import models, registry
    from persona_pipeline.db.session import session_scope
    from persona_pipeline.fileio import atomic_copy, sha256_file
    from persona_pipeline.resources.generation import GenerationDefaults

    settings = _settings()
    names = GenerationDefaults(workflows_dir=str(settings.workflows_dir), comfyui_lora_prefix=settings.comfyui_lora_prefix)
    dest = Path(args.loras_dir)
    if not dest.is_dir():
        raise CliError(f"{dest} is not a folder (give the ComfyUI server's models/loras folder)")
    copied = 0
    with session_scope(_database_url(settings)) as session:
        for persona in session.scalars(select(models.Persona).where(models.Persona.active.is_(True))):
            for mapping in registry.list_loras(session, persona.id):
                if not (mapping.is_primary or mapping.chained):
                    continue
                source = Path(mapping.lora.path)
                target = dest / names.comfy_lora_name(persona.slug, str(source))
                if target.is_file() and sha256_file(target) == mapping.lora.sha256:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                atomic_copy(source, target)
                copied += 1
                print(f"{persona.slug}: {source} -> {target}")
    print(f"{copied} file(s) copied")
    return 0


def review_secret(settings) -> str:
    """REVIEW_SECRET_KEY, or a random key made once and kept (0600) in PERSONA_HOME, so sessions
    survive a restart of the form."""
    import secrets

    if settings.review_secret_key:
        return settings.review_secret_key
    path = settings.home / "review_secret.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


def review_mirror(settings):
    """With an s3:// PERSONA_HOME, the mirror that fetches images the local cache lacks; else None."""
    if not settings.artifact_store:
        return None
    from persona_pipeline.objectstore import ArtifactMirror

    return ArtifactMirror.for_settings(settings.artifact_store, settings.home, settings.s3_endpoint_url)


def cmd_review(args: argparse.Namespace) -> int:
    """Serve the review form (Starlette under uvicorn) on the application database."""
    import uvicorn

    from persona_pipeline.review.app import ReviewConfig, create_app

    settings = _settings()
    try:
        tokens = settings.reviewer_tokens()
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if not tokens:
        raise CliError("REVIEW_TOKENS is empty, so nobody could log in; set it to `name:token,...` "
                       "(`persona-pipeline review-token NAME` prints one)")
    config = ReviewConfig(database_url=_database_url(settings), home=settings.home, tokens=tokens,
                          secret_key=review_secret(settings), max_body_bytes=settings.review_max_body_bytes,
                          exploration=settings.review_exploration, https_only=settings.review_https_only,
                          mirror=review_mirror(settings))
    try:
        app = create_app(config)
    except ValueError as exc:  # a weak secret key or token: refused before anything listens
        raise CliError(str(exc)) from None
    host, port = args.host or settings.review_host, args.port or settings.review_port
    print(f"review form for {', '.join(sorted(set(tokens.values())))} on http://{host}:{port}/ ({_redact(settings.database_url)})")
    uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=True)
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    """Every setting: variable, type, default, secret, meaning (the plain table adds what is set now,
    never a secret's value); `--markdown` prints docs/settings.md."""
    from persona_pipeline.settings import settings_markdown, settings_table

    print(settings_markdown() if args.markdown else settings_table(), end="")
    return 0


def cmd_review_token(args: argparse.Namespace) -> int:
    import secrets

    token = secrets.token_urlsafe(24)
    print(f"{args.name}:{token}")
    print("add it to REVIEW_TOKENS (comma-separated) and give the token to the reviewer", file=sys.stderr)
    return 0


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="persona-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the whole chain for the demo persona on the embedded defaults")
    demo.add_argument("--persona", default="demo")
    demo.add_argument("--contact-sheet", metavar="PNG", default=None,
                      help="also write a contact sheet of every candidate drawn (the README's is docs/images/demo-contact-sheet.png)")
    demo.set_defaults(func=cmd_demo)
    db = sub.add_parser("db", help="application database")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("upgrade", help="apply the Alembic migrations").set_defaults(func=cmd_db_upgrade)
    personas = sub.add_parser("personas", help="persona folders")
    personas_sub = personas.add_subparsers(dest="personas_command", required=True)
    personas_sub.add_parser("check", help="validate every persona.yaml").set_defaults(func=cmd_personas_check)
    schedules = sub.add_parser("schedules", help="each persona's schedules and their next fire times, in its timezone")
    schedules.add_argument("--persona", metavar="SLUG", help="only this persona")
    schedules.add_argument("--count", type=world_commands.positive_int, default=3, help="fire times to show per schedule (default 3)")
    schedules.add_argument("--now", metavar="ISO", help="show the fire times after this instant (default: now; naive = UTC)")
    schedules.set_defaults(func=cmd_schedules)
    photos = sub.add_parser("demo-photos", help="draw the demo persona's source photos again")
    photos.add_argument("--out", default="datasets/demo/photos")
    photos.set_defaults(func=cmd_demo_photos)
    trace = sub.add_parser("trace", help="print a post's provenance: candidate, manifest, LoRA, dataset")
    trace.add_argument("post_id", type=int)
    trace.set_defaults(func=cmd_trace)
    lora = sub.add_parser("lora", help="a persona's LoRA library: versions, weight, primary")
    lora_sub = lora.add_subparsers(dest="lora_command", required=True)
    lora_list = lora_sub.add_parser("list", help="list the persona's LoRAs")
    lora_list.add_argument("slug")
    lora_list.set_defaults(func=cmd_lora_list)
    lora_set = lora_sub.add_parser("set", help="change a LoRA's weight (0..2) or primary flag for the persona")
    lora_set.add_argument("slug")
    lora_set.add_argument("lora_id", type=int)
    lora_set.add_argument("--weight", type=float)
    lora_set.add_argument("--primary", action=argparse.BooleanOptionalAction, default=None)
    lora_set.add_argument("--chain", action=argparse.BooleanOptionalAction, default=None,
                          help="chain this LoRA after the primary in every generation (at most 5 in all)")
    lora_set.set_defaults(func=cmd_lora_set)
    lora_commands.register(lora_sub)
    export = lora_sub.add_parser("export-comfyui", help="copy the LoRAs in use into a ComfyUI models/loras folder")
    export.add_argument("loras_dir")
    export.set_defaults(func=cmd_lora_export_comfyui)
    review_form = sub.add_parser("review", help="serve the reviewer form (votes, approvals, winners, posts)")
    review_form.add_argument("--host", help="default REVIEW_HOST (127.0.0.1)")
    review_form.add_argument("--port", type=int, help="default REVIEW_PORT (8090)")
    review_form.set_defaults(func=cmd_review)
    settings_cmd = sub.add_parser("settings", help="every environment setting: type, default, secret, meaning")
    settings_cmd.add_argument("--markdown", action="store_true", help="print docs/settings.md (generated from the declarations)")
    settings_cmd.set_defaults(func=cmd_settings)
    review_token = sub.add_parser("review-token", help="print a new reviewer login `NAME:TOKEN` for REVIEW_TOKENS")
    review_token.add_argument("name")
    review_token.set_defaults(func=cmd_review_token)
    world_commands.register(sub)
    args = parser.parse_args(argv)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    """Ordinary failures (bad settings, an unknown id or persona, a database that is down or not
    upgraded, a file that cannot be read or written) end in one `error:` line and exit 2; only a
    bug prints a traceback."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from persona_pipeline.trace import TraceError

    try:
        return args.func(args)
    except (CliError, TraceError, LookupError) as exc:
        message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    except (OperationalError, ProgrammingError) as exc:  # e.g. the database went away mid-command
        message = f"the application database failed: {_first_line(exc)} (is it up and at the latest revision? " \
                  "`persona-pipeline db upgrade`)"
    except OSError as exc:
        message = f"{exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}"
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
