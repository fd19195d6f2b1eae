"""Publishers. The default is the dry-run outbox: the post's JPEG and a caption JSON under
PERSONA_HOME/outbox/<persona>/. Publishing is idempotent per post id, so a rerun, or a crash
between publishing and recording it, never posts twice."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg

from persona_pipeline.fileio import atomic_write, sha256_file


@dataclass(frozen=True)
class PublishOutcome:
    external_id: str
    already_published: bool
    location: str


class OutboxPublisher(dg.ConfigurableResource):
    home: str
    name: str = "outbox"

    def outbox_dir(self, persona_slug: str) -> Path:
        return Path(self.home) / "outbox" / persona_slug

    def publish(self, *, post_id: int, persona_slug: str, account: str, media_path: Path, caption: str,
                hashtags: list[str], scheduled_at: datetime) -> PublishOutcome:
        folder = self.outbox_dir(persona_slug)
        record = folder / f"post-{post_id:06d}.json"
        if record.is_file():  # written last: its presence means this post went out already
            existing = json.loads(record.read_text())
            return PublishOutcome(existing["external_id"], True, str(record))
        media_path = Path(media_path)
        if not media_path.is_file():
            raise FileNotFoundError(f"post {post_id}: media file {media_path} is missing")
        image_path = folder / f"post-{post_id:06d}.jpg"
        image_sha = atomic_write(image_path, media_path.read_bytes())
        external_id = f"outbox-{persona_slug}-{post_id}"
        atomic_write(record, json.dumps({
            "post_id": post_id, "external_id": external_id, "persona": persona_slug, "account": account,
            "caption": caption, "hashtags": hashtags, "text": caption + ("\n\n" + " ".join(hashtags) if hashtags else ""),
            "image": image_path.name, "image_sha256": image_sha, "source_sha256": sha256_file(media_path),
            "scheduled_at": scheduled_at.isoformat(), "published_at": datetime.now(timezone.utc).isoformat(),
        }, indent=2).encode())
        return PublishOutcome(external_id, False, str(record))
