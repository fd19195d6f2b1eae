"""audience_insights: what the audience did with the persona's posts (docs/insights.md#analysis):
engagement rate (interactions / reach) and reach per follower per post and by pillar, cluster,
theme, format, hour, weekday, caption length and hashtag set, each with a 95 % bootstrap interval
and n (domain/insight_stats.py); PNG plots (engagement by pillar, hour × weekday heatmap, reach
over time) shown like the other previews; and, when persona.yaml switches learning on, the shares
the learning strategy would plan with now. Numbers from the outbox's simulated audience are
labelled "simulated" in every title and in the metadata.
"""

from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import dagster as dg
from sqlalchemy import select

from persona_pipeline.assets.common import file_image_metadata, persona_for, table
from persona_pipeline.db import insights as store
from persona_pipeline.db import models
from persona_pipeline.domain import insight_stats as stats
from persona_pipeline.fileio import atomic_write
from persona_pipeline.insight_plots import engagement_bars_png, heatmap_png, lines_png
from persona_pipeline.partitions import persona_partitions
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.links import UiLinks
from persona_pipeline.resources.storage import PersonaStorage

TOP_POSTS = 10


def stat_rows(groups: list[stats.GroupStat]) -> list[dict]:
    return [{"group": g.key, "posts": g.n, "engagement": stats.pct(g.engagement_rate, 2),
             "engagement_95": f"{stats.pct(g.engagement_low, 2)} .. {stats.pct(g.engagement_high, 2)}",
             "reach_per_follower": "-" if g.reach_per_follower is None else f"{g.reach_per_follower:.3f}",
             "reach_per_follower_95": "-" if g.reach_low is None else f"{g.reach_low:.3f} .. {g.reach_high:.3f}"}
            for g in groups]


@dg.asset(partitions_def=persona_partitions, deps=["scheduled_posts"], group_name="posting", kinds={"sqlalchemy"})
def audience_insights(context: dg.AssetExecutionContext, database: AppDatabase, storage: PersonaStorage,
                      links: UiLinks) -> dg.MaterializeResult:
    """Engagement and reach of the persona's published posts by pillar, hour, weekday and more, with intervals and
    plots, and the learning strategy's current shares. Started by the library job after scheduled_posts, and by hand."""
    slug = context.partition_key
    now = datetime.now(timezone.utc)
    with database.session() as session:
        persona, config = persona_for(session, slug)
        zone = ZoneInfo(config.timezone)
        posts = store.performance(session, persona.id, zone)
        learned = store.learned_targets(session, persona.id, config, now)
        accounts = {p.account for p in session.scalars(select(models.Post).where(models.Post.persona_id == persona.id))}
        followers = list(session.scalars(select(models.AccountInsight).where(
            models.AccountInsight.account.in_(accounts), models.AccountInsight.metric == "followers")
            .order_by(models.AccountInsight.day)))
    simulated = any(p.simulated for p in posts)
    label = " (simulated)" if simulated else ""
    groups = stats.all_group_stats(posts)
    metadata: dict = {"posts_analysed": len(posts), "simulated": simulated,
                      "source": "simulated audience (outbox dry run)" if simulated else "Instagram Graph API insights"}
    for dimension, rows in groups.items():
        metadata[f"by_{dimension}"] = table(stat_rows(rows))
    top = sorted(posts, key=lambda p: (-(p.engagement_rate or 0), p.post_id))[:TOP_POSTS]
    metadata["top_posts"] = table([{"post": p.post_id, "pillar": p.pillar, "published": f"{p.local_at:%Y-%m-%d %H:%M}",
                                    "reach": p.reach, "interactions": p.interactions,
                                    "engagement": stats.pct(p.engagement_rate, 2),
                                    "reach_per_follower": "-" if p.reach_per_follower is None
                                    else f"{p.reach_per_follower:.3f}"} for p in top])
    if learned is None:
        metadata["learning"] = dg.MetadataValue.md("off (persona.yaml `strategy.learning.enabled: false`): posts are "
                                                   "planned with the configured weights")
    else:
        metadata["learning"] = dg.MetadataValue.md(learned.summary)
        metadata["learned_shares"] = table([{"pillar": d.name, "configured": f"{float(d.configured):.0%}",
                                             "target": f"{float(d.target):.1%}",
                                             "bounds": f"{float(d.low):.0%} .. {float(d.high):.0%}", "note": d.note}
                                            for d in learned.pillars.values()])
    folder = storage.root / "previews" / slug
    rates, _counts = stats.hour_weekday_grid(posts)
    plots = {
        "engagement_by_pillar": engagement_bars_png(groups["pillar"], f"Engagement by pillar, 95% interval{label}"),
        "hour_weekday_heatmap": heatmap_png(rates, _counts, f"Engagement by local hour and weekday{label}"),
        "reach_over_time": lines_png({"reach per post": [float(p.reach) for p in sorted(posts, key=lambda p: p.local_at)],
                                      **({"followers": [f.value for f in followers]} if followers else {})},
                                     f"Reach per post, followers by day{label}", "post / day"),
    }
    for key, png in plots.items():
        path = folder / f"{key}.png"
        atomic_write(path, png)
        metadata.update(file_image_metadata(key, path, f"{key.replace('_', ' ')}{label}", storage, links))
    storage.push_written()
    context.log.info(f"{slug}: {len(posts)} post(s) with insights{label}; "
                     f"{learned.summary if learned else 'learning off'}")
    return dg.MaterializeResult(metadata=metadata)
