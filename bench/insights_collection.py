"""Insight collection at scale: 20 Instagram accounts × 500 published posts each, one due read per
post, through the fake Graph API at 100 ms per call, within its usage limits.

    python bench/insights_collection.py [--quick] [--sqlite] [--accounts A] [--posts N] [--latency S]
        [--account-limit L] [--reference-posts RP]

Set-up: a fresh, migrated PostgreSQL database (`--sqlite`: a SQLite file), A personas each with its
own Instagram account and N published posts whose +1 h read is due, and the fake Graph API with
insights (persona_fakes/graph_insights.py, real HTTP, `latency_s` on every answer) in a child
process, as Meta's servers are not on the collector's CPU. Usage limits: each account may make L
calls an hour (default 1,000; the fake refuses beyond it with code 80002 and reports the usage in
X-Business-Use-Case-Usage), the app 100 × A × N. Full size: 20 × 500, 100 ms; --quick: 5 × 100.

1. Reference, the straightforward loop a user would write: one media after another, one GET
   /{media}/insights each (the same client and metrics, one account at a time). It runs on RP posts
   (default 20) and its time per post is multiplied by A × N: the output says "extrapolated".
2. Ours: `InsightsCollector.collect` as the insights job runs it: accounts in parallel
   (PERSONA_INSIGHTS_WORKERS, default 32), each account's reads paced by its usage headers, each
   account's reading written in one transaction. Target: <= 60 s at full size.

Checks (PASS/FAIL): every post read once (A × N readings of 7 metrics stored, no duplicate), no
call refused for usage (the fake's throttle count is 0) and the highest usage it reported < 100 %.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import func, select  # noqa: E402

from persona_fakes.databases import make_database  # noqa: E402
from persona_fakes.personas import write_persona  # noqa: E402
from persona_pipeline.db import models, registry  # noqa: E402
from persona_pipeline.db.session import session_scope  # noqa: E402
from persona_pipeline.domain.insight_reads import MEDIA_METRICS  # noqa: E402
from persona_pipeline.personas import load_persona  # noqa: E402
from persona_pipeline.resources.insight_sources import DueRead, GraphInsightSource  # noqa: E402
from persona_pipeline.resources.insights_collector import InsightsCollector  # noqa: E402
from persona_pipeline.resources.instagram import InstagramGraphClient  # noqa: E402

from _report import emit, record  # noqa: E402

TARGET_S = 60.0


class RemoteFake:
    """The fake Graph API with insights in a child process, asked over a pipe."""

    def __init__(self, latency: float, app_limit: int, account_limit: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, latency, app_limit, account_limit), daemon=True)
        self.process.start()
        self.url = self._conn.recv()

    def ask(self, command: str, *args):
        self._conn.send((command, args))
        answer = self._conn.recv()
        if isinstance(answer, Exception):
            raise answer
        return answer


def _serve(conn, latency: float, app_limit: int, account_limit: int) -> None:
    from persona_fakes.graph_insights import FakeInsightsGraphAPI

    with FakeInsightsGraphAPI(latency_s=latency, app_limit=app_limit, account_limit=account_limit) as fake:
        conn.send(fake.url)
        while True:
            command, args = conn.recv()
            try:
                if command == "stop":
                    conn.send(None)
                    return
                if command == "account":
                    fake.add_account(*args)
                    conn.send([fake.add_media(args[0]) for _ in range(args[2])])
                elif command == "records":
                    conn.send({"throttled": fake.throttled, "max_usage": fake.max_usage,
                               "insight_calls": len(fake.requests_to("media_insights"))})
                else:
                    conn.send(ValueError(f"unknown command {command!r}"))
            except Exception as exc:  # noqa: BLE001 - hand it to the parent
                conn.send(exc)


def seed(url: str, folder: Path, fake: RemoteFake, accounts: int, posts: int, now: datetime) -> list[tuple[str, str, list[str]]]:
    made = []
    for a in range(accounts):
        user, token, env = f"1784150000{a:07d}", f"bench-token-{a:04d}-secret", f"BENCH_INSIGHTS_TOKEN_{a}"
        os.environ[env] = token
        media = fake.ask("account", user, token, posts)
        persona = write_persona(folder, f"acct{a:02d}", photos=0, instagram={"user_id": user, "token_env": env})
        with session_scope(url) as session:
            pid = registry.sync_persona(session, load_persona(persona)).id
            at = now - timedelta(hours=2)
            session.add_all([models.Post(persona_id=pid, account=user, status="published", caption=f"p{i}",
                                         hashtags=[], scheduled_at=at - timedelta(minutes=i),
                                         published_at=at - timedelta(minutes=i), external_id=m)
                             for i, m in enumerate(media)])
        made.append((user, token, media))
    return made


class QuietLog:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, msg) -> None:
        self.lines.append(str(msg))

    warning = error = info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 accounts × 100 posts")
    parser.add_argument("--sqlite", action="store_true", help="a SQLite file instead of PostgreSQL")
    parser.add_argument("--accounts", type=int)
    parser.add_argument("--posts", type=int, help="posts per account")
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--account-limit", type=int, default=1000, help="calls per account per hour (1000)")
    parser.add_argument("--reference-posts", type=int, default=20)
    args = parser.parse_args()
    accounts = args.accounts or (5 if args.quick else 20)
    posts = args.posts or (100 if args.quick else 500)
    now = datetime.now(timezone.utc)
    with tempfile.TemporaryDirectory() as tmp:
        url, cleanup = make_database("sqlite" if args.sqlite else "postgresql", Path(tmp))
        fake = RemoteFake(args.latency, 100 * accounts * posts, args.account_limit)
        try:
            made = seed(url, Path(tmp) / "datasets", fake, accounts, posts, now)
            client = InstagramGraphClient(base_url=fake.url)
            # 1. The reference loop, on a sample, extrapolated.
            user, token, media = made[0]
            sample = [DueRead(i, m, user, now - timedelta(hours=2), 1) for i, m in enumerate(media[:args.reference_posts])]
            started = time.perf_counter()
            for read in sample:
                GraphInsightSource(client)._read_media(read, token, type("R", (), {"values": {}, "refused": {},
                                                                                  "deleted": {}, "foreign": {}, "calls": 0})(),
                                                       lambda headers: None)
            per_post = (time.perf_counter() - started) / len(sample)
            reference = per_post * accounts * posts
            # 2. Ours.
            collector = InsightsCollector(graph=client)
            started = time.perf_counter()
            cpu = time.process_time()
            report = collector.collect(url, now, QuietLog())
            ours = time.perf_counter() - started
            cpu = time.process_time() - cpu
            records = fake.ask("records")
            with session_scope(url) as session:
                rows = session.scalar(select(func.count()).select_from(models.PostInsight))
                readings = session.scalar(select(func.count(func.distinct(models.PostInsight.post_id))))
        finally:
            fake.ask("stop")
            cleanup()
    total = accounts * posts
    print(f"Insight collection: {accounts} accounts × {posts} posts, {args.latency * 1000:.0f} ms per call, "
          f"{args.account_limit} calls/account/hour, {'SQLite' if args.sqlite else 'PostgreSQL'}")
    print(f"reference (one media after another): {per_post * 1000:.0f} ms/post -> {reference:,.0f} s for {total} posts "
          f"(extrapolated from {len(sample)})")
    print(f"ours (accounts in parallel, paced by usage headers): {ours:.1f} s ({cpu:.1f} s CPU in this process), "
          f"{report['calls']} calls, {report['read']} readings")
    print(f"usage: highest reported {records['max_usage']:.0f}%, throttled calls {records['throttled']}; "
          f"stopped accounts {len(report['stopped'])}")
    ok_time = ours <= TARGET_S or args.quick
    ok_all = readings == total and rows == total * len(MEDIA_METRICS) and report["read"] == total
    ok_usage = records["throttled"] == 0 and records["max_usage"] < 100 and not report["stopped"]
    print(f"RESULT time {ours:.1f} s (target <= {TARGET_S:.0f} s at full size): {'PASS' if ok_time else 'FAIL'}")
    print(f"RESULT every post read once ({readings}/{total} posts, {rows} rows): {'PASS' if ok_all else 'FAIL'}")
    print(f"RESULT within the usage limits (throttled {records['throttled']}, max {records['max_usage']:.0f}%): "
          f"{'PASS' if ok_usage else 'FAIL'}")
    record(f"insight reads of {accounts}x{posts} posts at {args.latency * 1000:.0f} ms/call (s)", reference=reference,
           ours=ours, unit="s", better="lower", target=f"<= {TARGET_S:.0f} s" if not args.quick else "",
           ok=ok_time if not args.quick else None, note="reference extrapolated from a sample")
    record("insight reads refused for usage", reference=None, ours=records["throttled"], unit="calls", better="lower",
           target="0", ok=ok_usage)
    emit()
    return 0 if ok_time and ok_all and ok_usage else 1


if __name__ == "__main__":
    raise SystemExit(main())
