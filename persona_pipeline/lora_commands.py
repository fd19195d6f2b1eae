"""`persona-pipeline lora promote|rollback|history`: the operator's side of LoRA promotion. Each
change of primary is a `promote_lora`/`rollback_lora` event with who and why (db/promotion.py),
the same as the review form's buttons and the lora_model asset's automatic decisions."""

from __future__ import annotations

import argparse
import getpass


def register(lora_sub) -> None:
    promote = lora_sub.add_parser("promote", help="make a LoRA version the persona's primary (an event with who and why)")
    promote.add_argument("slug")
    promote.add_argument("lora_id", type=int)
    _who_and_why(promote)
    promote.set_defaults(func=cmd_promote)
    rollback = lora_sub.add_parser("rollback", help="make the primary before the current one primary again")
    rollback.add_argument("slug")
    rollback.add_argument("--to", type=int, metavar="LORA_ID", help="this LoRA instead of the one the current replaced")
    _who_and_why(rollback)
    rollback.set_defaults(func=cmd_rollback)
    history = lora_sub.add_parser("history", help="each version's evaluation scores and every promotion decision")
    history.add_argument("slug")
    history.set_defaults(func=cmd_history)


def _who_and_why(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", required=True, help="why (recorded with the event)")
    parser.add_argument("--by", help="who (default: the login name)")


def cmd_promote(args: argparse.Namespace) -> int:
    return _change(args, lambda session, persona_id, who: _promotion().promote(
        session, persona_id, args.lora_id, who, args.reason))


def cmd_rollback(args: argparse.Namespace) -> int:
    return _change(args, lambda session, persona_id, who: _promotion().rollback(
        session, persona_id, who, args.reason, to=args.to))


def _change(args: argparse.Namespace, action) -> int:
    from persona_pipeline import cli
    from persona_pipeline.db import registry
    from persona_pipeline.db.session import session_scope

    who = (args.by or getpass.getuser() or "").strip()
    with session_scope(cli._database_url(cli._settings())) as session:
        persona = registry.get_persona(session, args.slug)
        try:
            event = action(session, persona.id, who)
        except (ValueError, LookupError) as exc:  # PromotionError, ReviewError, a chain over the limit
            raise cli.CliError(f"{args.slug}: {exc}") from None
        previous = event.payload.get("previous_primary")
        print(f"{args.slug}: LoRA {event.subject_id} is the primary ({event.kind} by {event.reviewer}: "
              f"{event.payload['reason']}); it replaced {('LoRA ' + str(previous)) if previous else 'no primary'}")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from persona_pipeline import cli
    from persona_pipeline.db import models, registry
    from persona_pipeline.db.session import session_scope

    promotion = _promotion()
    with session_scope(cli._database_url(cli._settings())) as session:
        persona = registry.get_persona(session, args.slug)
        print("evaluations (identity mean ± spread, alignment, diversity, renders without a face):")
        for row, version in session.execute(select(models.LoraEvaluation, models.LoraModel.version).join(
                models.LoraModel, models.LoraModel.id == models.LoraEvaluation.lora_id).where(
                models.LoraEvaluation.persona_id == persona.id).order_by(models.LoraEvaluation.id)):
            print(f"  LoRA {row.lora_id:>4} v{version or '-':<3} set {row.eval_key[:8]}  identity {row.identity_mean:.4f} "
                  f"± {row.identity_std:.4f}  alignment {row.alignment:.4f}  diversity {row.diversity:.4f}  "
                  f"no face {row.no_face}  ({row.identity_method})")
        print("decisions:")
        for event in promotion.decisions(session, persona.id):
            print(f"  {event.created_at:%Y-%m-%d %H:%M} {event.kind:<13} LoRA {event.subject_id:>4} by {event.reviewer}: "
                  f"{event.payload.get('reason')}")
    return 0


def _promotion():
    from persona_pipeline.db import promotion

    return promotion
