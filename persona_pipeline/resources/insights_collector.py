"""The `insights` resource: reads every due insight, account by account in parallel threads, from
the Graph API for Instagram accounts and from the seeded simulated audience for the outbox, and
writes each account's reading in one transaction (db/insights.py). Tokens are read from the
environment variable each persona.yaml names at run time, never stored, logged or put in metadata.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime
from zoneinfo import ZoneInfo

import dagster as dg
from sqlalchemy import select

from persona_pipeline.db import insights as store
from persona_pipeline.db import models
from persona_pipeline.db.session import session_scope
from persona_pipeline.domain.audience import AudienceParams, SimulatedAudience, followers_on, parse_rates
from persona_pipeline.resources.insight_sources import AccountReading, GraphInsightSource, SimulatedInsightSource
from persona_pipeline.resources.instagram import InstagramGraphClient


class InsightsCollector(dg.ConfigurableResource):
    """Insight collection settings (docs/settings.md: PERSONA_INSIGHTS_*, PERSONA_AUDIENCE_*)."""

    graph: InstagramGraphClient
    workers: int = 32  # PERSONA_INSIGHTS_WORKERS: accounts read in parallel
    account_in_flight: int = 4  # one account's reads at once (usage limits count calls, not concurrency)
    max_pause_s: float = 30.0  # longest slow-down between two calls as usage nears its limit
    audience_seed: int = 0  # PERSONA_AUDIENCE_SEED
    audience_pillar_rates: str = ""  # PERSONA_AUDIENCE_PILLAR_RATES: name=rate,...
    audience_peak_hour: float = 19.0  # PERSONA_AUDIENCE_PEAK_HOUR
    audience_hour_amplitude: float = 0.2  # PERSONA_AUDIENCE_HOUR_AMPLITUDE
    audience_format_rates: str = "image=1.0,carousel=1.1,reel=1.25"  # PERSONA_AUDIENCE_FORMAT_RATES

    def audience(self, slug: str, pillars: list[str], start: date) -> SimulatedAudience:
        """The persona's simulated audience: the settings' rates on `start` (its first post's day;
        they drift from there), its own seed (seed and slug)."""
        seed = int.from_bytes(hashlib.sha256(f"{self.audience_seed}:{slug}".encode()).digest()[:4], "little")
        params = AudienceParams(
            seed=seed, pillar_rates=parse_rates(self.audience_pillar_rates, "PERSONA_AUDIENCE_PILLAR_RATES"),
            peak_hour=self.audience_peak_hour, hour_amplitude=self.audience_hour_amplitude,
            format_rates=parse_rates(self.audience_format_rates, "PERSONA_AUDIENCE_FORMAT_RATES"))
        return SimulatedAudience(params, pillars, start)

    def collect(self, database_url: str, now: datetime, log) -> dict:
        """Read every due insight; a report of counts, per-account problems and usage."""
        groups = store.due_groups(database_url, now)
        report = {"accounts": len(groups), "read": 0, "frozen": 0, "deleted": 0, "refused_metrics": 0, "foreign": 0,
                  "calls": 0, "max_usage_percent": 0.0, "stopped": {}, "simulated_accounts": 0}
        if not groups:
            return report
        graph = GraphInsightSource(self.graph, self.max_pause_s, self.account_in_flight)

        def one(group: store.AccountGroup) -> tuple[store.AccountGroup, AccountReading]:
            if group.simulated:
                return group, self._simulated(database_url, group, now)
            token = os.environ.get(group.token_env or "", "").strip() or None
            return group, graph.read(group.account, token, group.reads, now.date())

        with ThreadPoolExecutor(max_workers=max(1, min(self.workers, len(groups))),
                                thread_name_prefix="insights-account") as pool:
            for group, reading in pool.map(one, groups):
                counts = store.record(database_url, group, reading, now)
                for key, value in counts.items():
                    report[key] += value
                report["calls"] += reading.calls
                report["max_usage_percent"] = max(report["max_usage_percent"], round(reading.max_usage, 1))
                report["simulated_accounts"] += int(reading.simulated)
                if reading.stopped:
                    report["stopped"][group.account] = reading.stopped
                    log.warning(f"insights of {group.account}: stopped early: {reading.stopped}")
        return report

    def _simulated(self, database_url: str, group: store.AccountGroup, now: datetime) -> AccountReading:
        zone = ZoneInfo(group.tz)
        with session_scope(database_url) as session:
            persona = session.scalar(select(models.Persona).where(models.Persona.slug == group.slug))
            pillars = [p["name"] for p in (persona.settings or {}).get("pillars", [])] if persona else []
            by_day = store.interactions_by_day(session, group.account, zone)
        since = min([*by_day, *(r.published_at.astimezone(zone).date() for r in group.reads)],
                    default=now.astimezone(zone).date())
        audience = self.audience(group.slug, pillars, since)
        reads = [dataclasses.replace(r, followers=r.followers or followers_on(
            audience, r.published_at.astimezone(zone).date(), by_day, since)) for r in group.reads]
        group.reads = reads
        reading = SimulatedInsightSource({group.account: audience}).read(group.account, None, reads, now.date())
        today = now.astimezone(zone).date()
        reading.account_day = {"followers": round(followers_on(audience, today, by_day, since)),
                               "reach": float(sum(v.get("reach", 0) for r, v in
                                                  ((r, reading.values.get(r.post_id, {})) for r in reads)
                                                  if r.published_at.astimezone(zone).date() == today))}
        return reading
