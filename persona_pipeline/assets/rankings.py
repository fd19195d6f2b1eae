"""rankings: per run step, a Bradley–Terry fit of its votes with bootstrap 95% intervals (the
ranking that decides top-K and winners) written to the candidates, beside Elo replayed exactly as the
older voting tool computed it (docs/rules.md#elo; kept for compatibility and display). With auto-review on, the best candidate of
each undecided run's final step is picked. Only the steps whose votes, candidates or status changed
since their last fit are refit (db/rankings.py); the results are those of a full refit."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from persona_pipeline.assets.common import persona_for, sheet_metadata, table
from persona_pipeline.db import rankings as refresh
from persona_pipeline.domain.ui_pages import steps_to_review
from persona_pipeline.partitions import persona_partitions
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.links import UiLinks
from persona_pipeline.resources.review_policy import AutoReviewer
from persona_pipeline.resources.storage import PersonaStorage


class RankingsConfig(dg.Config):
    step_ids: list[int] = Field(default_factory=list, description=(
        "Steps to refit whatever their signature says (the review_events sensor names the steps that got votes)."))
    full_refit: bool = Field(default=False, description=(
        "Refit every step of the persona, and correct Elo changed outside a vote (no signature sees that)."))


@dg.asset(partitions_def=persona_partitions, deps=["candidates"], group_name="review", kinds={"sqlalchemy", "scipy"})
def rankings(context: dg.AssetExecutionContext, config: RankingsConfig, database: AppDatabase,
             auto_review: AutoReviewer, storage: PersonaStorage, links: UiLinks) -> dg.MaterializeResult:
    """Bradley–Terry rankings (and Elo) of the steps whose votes changed since their last fit; picks winners under
    auto-review. Started by the review_events sensor after votes (job rankings_refresh, for the voted steps), and
    after candidates in the generation_runs, advance_runs, generation and persona_chain jobs."""
    slug = context.partition_key
    with database.session() as session:
        persona, _ = persona_for(session, slug)
        done = refresh.refresh_rankings(session, persona.id, auto_review.pick_winner, step_ids=config.step_ids,
                                        full=config.full_refit)
        winners = [(Path(w.image_path), f"#{w.id} run {w.run_id}") for w in done.winners]
    if done.elo_corrections:
        context.log.warning(f"{slug}: {done.elo_corrections} stored Elo scores differed from the replay of the votes "
                            "and were corrected")
    context.log.info(f"{slug}: {len(done.refit_step_ids)} step(s) refit, {done.unchanged_steps} unchanged")
    return dg.MaterializeResult(metadata={
        "runs": len({r["run"] for r in done.rows}),
        "ranked_candidates": len(done.rows),
        "steps_refit": len(done.refit_step_ids),
        "steps_unchanged": done.unchanged_steps,
        "elo_corrections": done.elo_corrections,
        "top_k_with_few_votes": done.low_votes,
        "winners_picked_now": len(done.winners),
        "last_vote_id": done.last_vote_id,
        "ranking": table(done.rows),
        "to_review": dg.MetadataValue.md(steps_to_review(done.open_steps, links.links)),
        **sheet_metadata("winners", winners, storage, links, slug),
    })
