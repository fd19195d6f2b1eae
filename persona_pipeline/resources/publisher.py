"""Publishers: the one `publisher` resource the publish op takes.

Every publisher implements one method, `publish_account(batch, posts)`: publish one account's due
posts (in slot order), claiming each through `batch` and recording each outcome there (published,
failed, given back). The op groups the due posts by `account_key` and runs the accounts in
parallel threads; it knows nothing of any one publisher.

- `OutboxPublisher` (the default, a dry run): the post's JPEG and a caption JSON under
  PERSONA_HOME/outbox/<persona>/. Idempotent per post id, so a rerun, or a crash between publishing
  and recording it, never posts twice.
- `InstagramPublisher`: the Instagram Graph API (docs/rules.md, "Graph API") through
  `InstagramGraphClient`. It holds the settings and the media steps (the public JPEG and its URL
  check); the Graph flow (token, quota, containers, publish, crash recovery, permalinks) is in
  instagram_account.py, instagram_pipeline.py and instagram_containers.py.
"""

from __future__ import annotations

import json
import os
from abc import abstractmethod
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg

from persona_pipeline.db.publishing import DueItem, DuePost, LostClaim
from persona_pipeline.domain import media, post_formats
from persona_pipeline.fileio import atomic_write, sha256_file
from persona_pipeline.resources import instagram_account
from persona_pipeline.resources.instagram import InstagramGraphClient
from persona_pipeline.resources.public_media import MediaProblem, StagedMedia, stage_file, stage_jpeg, url_problem
from persona_pipeline.resources.publish_batch import PublishBatch

__all__ = ["InstagramPublisher", "MediaProblem", "OutboxPublisher", "PublishOutcome", "Publisher", "StagedMedia"]


@dataclass(frozen=True)
class PublishOutcome:
    external_id: str
    already_published: bool
    location: str


class Publisher(dg.ConfigurableResource):
    """What every publisher shares. A failed post waits `retry_wait_s` × 2^(retries − 1) (capped at
    6 h) before its next attempt; after `max_retries` failures it is abandoned."""

    name: str = "publisher"
    workers: int = 32  # PERSONA_PUBLISH_WORKERS: accounts published in parallel (in all processes)
    processes: int = 1  # PERSONA_PUBLISH_PROCESSES: processes the accounts are dealt to (publish_processes.py)
    max_retries: int = 3  # PERSONA_PUBLISH_MAX_RETRIES
    retry_wait_s: float = 300.0

    def account_key(self, post: DuePost) -> str:
        """The account `post` goes out on: posts of one key are published in slot order, one after another."""
        return post.account

    @abstractmethod
    def publish_account(self, batch: PublishBatch, posts: list[DuePost]) -> None:
        """Publish `posts` (one account's, in slot order): claim them through `batch`, then record
        each outcome there. A post whose claim is lost meanwhile is left alone."""


class OutboxPublisher(Publisher):
    home: str
    name: str = "outbox"
    # Outbox failures are local (a missing file): the schedule's own interval spaces the retries.
    retry_wait_s: float = 0.0

    def outbox_dir(self, persona_slug: str) -> Path:
        return Path(self.home) / "outbox" / persona_slug

    def publish_account(self, batch: PublishBatch, posts: list[DuePost]) -> None:
        claimed = batch.claim(posts)
        renewed = batch.clock()
        for index, post in enumerate(claimed):
            try:
                renewed = batch.claims.renew_waiting([p.id for p in claimed[index + 1:]], renewed)
                batch.claims.renew(post)
                try:
                    outcome = self.publish(post_id=post.id, persona_slug=post.slug, account=post.account,
                                           media_path=Path(post.media_path or ""), caption=post.caption,
                                           hashtags=list(post.hashtags), scheduled_at=post.scheduled_at,
                                           fmt=post.format, options=post.format_options or {},
                                           items=batch.claims.items(post.id) if post.format != "feed" else [])
                except Exception as exc:  # noqa: BLE001 - recorded on the post, never lost
                    batch.failed(post, f"{type(exc).__name__}: {exc}", retryable=True, step="outbox")
                    continue
                batch.published(post, external_id=outcome.external_id, permalink=None,
                                already=outcome.already_published, step="outbox", detail=outcome.location)
            except LostClaim as exc:
                batch.warn(str(exc))

    def publish(self, *, post_id: int, persona_slug: str, account: str, media_path: Path, caption: str,
                hashtags: list[str], scheduled_at: datetime, fmt: str = "feed", options: dict | None = None,
                items: list[DueItem] = ()) -> PublishOutcome:
        """Write the post's files (by format) then its JSON record, last: the record's presence
        means the post went out. feed and image story: post-N.jpg; carousel: post-N-01.jpg.. in
        order; reel and video story: post-N.mp4 and post-N-cover.jpg."""
        folder = self.outbox_dir(persona_slug)
        record = folder / f"post-{post_id:06d}.json"
        if record.is_file():  # written last: its presence means this post went out already
            existing = json.loads(record.read_text())
            return PublishOutcome(existing["external_id"], True, str(record))
        options = dict(options or {})
        stem = f"post-{post_id:06d}"
        files: list[tuple[str, Path]] = []  # (name in the outbox, source)
        if fmt == "carousel":
            problems = post_formats.carousel_problems(
                f"post {post_id}", [(i.label, *media.image_size(i.media_path)) for i in items])
            if problems:
                raise ValueError("; ".join(problems))
            files = [(f"{stem}-{i.position:02d}.jpg", Path(i.media_path or "")) for i in items]
        elif fmt in ("reel", "story") and options.get("video"):
            files = [(f"{stem}.mp4", Path(options.get("video_path") or "")), (f"{stem}-cover.jpg", Path(media_path))]
        else:
            files = [(f"{stem}.jpg", Path(media_path))]
        for _name, source in files:
            if not source.is_file():
                raise FileNotFoundError(f"post {post_id}: {fmt} media file {source} is missing")
        written = []
        for name, source in files:
            sha = atomic_write(folder / name, source.read_bytes())
            written.append({"file": name, "sha256": sha, "source_sha256": sha256_file(source)})
        external_id = f"outbox-{persona_slug}-{post_id}"
        entry = {
            "post_id": post_id, "external_id": external_id, "persona": persona_slug, "account": account,
            "format": fmt, "caption": caption, "hashtags": hashtags,
            "text": caption + ("\n\n" + " ".join(hashtags) if hashtags else ""),
            "image": written[0]["file"] if fmt == "feed" or not options.get("video") else written[1]["file"],
            "image_sha256": written[0]["sha256"] if fmt == "feed" or not options.get("video") else written[1]["sha256"],
            "source_sha256": written[0]["source_sha256"], "files": written,
            "scheduled_at": scheduled_at.isoformat(), "published_at": datetime.now(timezone.utc).isoformat(),
        }
        if items:
            entry["items"] = [{"position": i.position, "candidate_id": i.candidate_id, "still": i.source_path}
                              for i in items]
        if fmt == "reel":
            entry.update(share_to_feed=bool(options.get("share_to_feed", True)), cover=bool(options.get("cover")),
                         thumb_offset_ms=options.get("thumb_offset_ms"), duration_s=options.get("duration_s"))
        atomic_write(record, json.dumps(entry, indent=2).encode())
        return PublishOutcome(external_id, False, str(record))


class InstagramPublisher(Publisher):
    """Publishes through the Graph API. Each persona's token is read at publish time from the
    environment variable its persona.yaml names (`instagram.token_env`), never stored."""

    graph: InstagramGraphClient
    media_public_base_url: str  # MEDIA_PUBLIC_BASE_URL: where media_public_dir is served
    media_public_dir: str  # MEDIA_PUBLIC_DIR
    token_warn_days: int = 7  # INSTAGRAM_TOKEN_WARN_DAYS
    name: str = "instagram"
    # Containers prepared ahead of the publish calls, per account (0: strictly one post at a time).
    prepare_ahead: int = 4
    media_check_timeout_s: float = 5.0
    video_upload: str = "auto"  # INSTAGRAM_VIDEO_UPLOAD: auto | url | resumable

    def uploads_videos(self) -> bool:
        """True when a video goes by the resumable upload (instagram_upload.py), not by a public URL."""
        return self.video_upload == "resumable" or (self.video_upload == "auto" and not self.media_public_base_url)

    def account_key(self, post: DuePost) -> str:
        """The persona's Instagram user id; a persona without one is a group of its own (its posts fail)."""
        instagram = (post.settings or {}).get("instagram") or {}
        return str(instagram.get("user_id")) if instagram.get("user_id") else f"no-instagram:{post.slug}"

    def publish_account(self, batch: PublishBatch, posts: list[DuePost]) -> None:
        instagram_account.publish_account(self, batch, posts)

    def token(self, token_env: str) -> str | None:
        value = os.environ.get(token_env, "").strip()
        return value or None

    def stage_media(self, persona_slug: str, post_id: int, source: Path) -> StagedMedia:
        """The post's JPEG under MEDIA_PUBLIC_DIR, exported when it breaks Instagram's rules (public_media.stage_jpeg)."""
        return stage_jpeg(self.media_public_dir, self.media_public_base_url, persona_slug, post_id, source)

    def stage_file(self, persona_slug: str, stem: str, source: Path) -> StagedMedia:
        """A format's file as it is under MEDIA_PUBLIC_DIR (public_media.stage_file): an item, a story, a video, a cover."""
        return stage_file(self.media_public_dir, self.media_public_base_url, persona_slug, stem, source)

    def check_media_url(self, url: str) -> str | None:
        """None when Instagram can fetch `url`, else the problem (public_media.url_problem)."""
        if not self.media_public_base_url:
            return "MEDIA_PUBLIC_BASE_URL is not set: Instagram needs a public URL to fetch the image from"
        return url_problem(url, self.media_check_timeout_s)
