"""The containers of carousels, stories and reels (docs/posting.md#formats); instagram_containers.py
commits the top container's id, waits for it and publishes it as it does a feed image's.

Carousel, crash-safe: for each item in order, an item container (`is_carousel_item=true`) whose id
is COMMITTED on its post_items row before the next call; then the CAROUSEL container with the
children. A rerun asks each committed item container first: FINISHED (or IN_PROGRESS, waited for)
is reused, EXPIRED or ERROR is replaced (and recorded); an item without one gets one. So a kill
between any two calls never doubles an item container. A child that ends in ERROR fails the post
(retryable) naming the item and the API's reason; only that item is made again next time.

Reel and video story: the MP4 is probed and checked against the API's limits before anything is
sent (domain/post_formats.video_problems), staged at a public URL, and sent as `video_url` with
share_to_feed and cover_url (or thumb_offset); or, with no public URL (INSTAGRAM_VIDEO_UPLOAD), its
container made with upload_type=resumable, committed, and the bytes uploaded (instagram_upload.py).
Image story: its 9:16 JPEG as `image_url`.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from persona_pipeline.db.publishing import DueItem, DuePost
from persona_pipeline.domain import media, post_formats
from persona_pipeline.resources.instagram import GraphError
from persona_pipeline.resources.public_media import MediaProblem, StagedMedia
from persona_pipeline.resources.publish_batch import crash_point

if TYPE_CHECKING:
    from persona_pipeline.resources.instagram_containers import Containers, Ready


def is_video(post: DuePost) -> bool:
    return post.format in (post_formats.REEL, post_formats.STORY) and bool((post.format_options or {}).get("video"))


class FormatContainers:
    """Creates the top container of a non-feed post: (container id, post values, attempt detail),
    or a finished `Ready` when the post failed (recorded already)."""

    def __init__(self, containers: Containers) -> None:
        self.containers = containers
        self.account = containers.account
        self.batch = containers.batch
        self.claims = containers.claims

    def create(self, post: DuePost, seen: list) -> tuple[str, dict, str] | Ready:
        if post.format == post_formats.CAROUSEL:
            return self._carousel(post, seen)
        if post.format in (post_formats.REEL, post_formats.STORY):
            return self._single(post, seen)
        return self._fail(post, f"post {post.id}: unknown format {post.format!r}", seen)

    # --- shared ---------------------------------------------------------------------------------

    def _fail(self, post: DuePost, reason: str, seen: list, retryable: bool = False, step: str = "container",
              **details) -> Ready:
        from persona_pipeline.resources.instagram_containers import Ready

        self.batch.failed(post, reason, retryable=retryable, step=step, attempts=list(seen), **details)
        return Ready(post, done=True)

    def _stage(self, post: DuePost, stem: str, path: str | None, seen: list) -> StagedMedia | Ready:
        publisher = self.account.publisher
        if not path:
            return self._fail(post, f"post {post.id}: {stem} has no media file", seen)
        try:
            staged = publisher.stage_file(post.slug, stem, Path(path))
        except MediaProblem as exc:
            return self._fail(post, f"post {post.id}: {exc}", seen)
        problem = publisher.check_media_url(staged.url)
        if problem:
            seen.append(self.claims.attempt(post.id, "container", "media_unreachable", detail=problem))
            return self._fail(post, f"{problem}; no container was created (is the web server behind "
                                    "MEDIA_PUBLIC_BASE_URL up?)", seen, retryable=True)
        return staged

    def _create(self, post: DuePost, fields: dict[str, str], seen: list, step: str) -> str | Ready:
        self.claims.renew(post)  # staging may have taken a while: never make a container for a post lost meanwhile
        try:
            return self.account.graph.create_media(self.account.user_id, self.account.token, fields)
        except GraphError as exc:
            return self.containers._error(post, exc, None, step, seen)

    # --- carousel -------------------------------------------------------------------------------

    def _carousel(self, post: DuePost, seen: list) -> tuple[str, dict, str] | Ready:
        from persona_pipeline.resources.instagram_containers import Ready, caption_digest

        items = self.claims.items(post.id)
        sizes = [(i.label, *media.image_size(i.media_path)) for i in items]
        problems = post_formats.carousel_problems(f"post {post.id}", sizes)
        if problems:
            return self._fail(post, "; ".join(problems), seen)
        children = []
        for item in items:
            child = self._item(post, item, seen)
            if isinstance(child, Ready):
                return child
            children.append(child)
        fields = {"media_type": "CAROUSEL", "children": ",".join(children), "caption": post.text}
        cid = self._create(post, fields, seen, "container")
        if isinstance(cid, Ready):
            return cid
        return cid, {}, f"text_sha256={caption_digest(post.text)} children={','.join(children)}"

    def _item(self, post: DuePost, item: DueItem, seen: list) -> str | Ready:
        """The FINISHED item container of `item`: the committed one if the API says it is usable, else a new one."""
        from persona_pipeline.resources.instagram_containers import Ready

        graph, token, claims = self.account.graph, self.account.token, self.claims
        if item.container_id:
            cid = item.container_id
            try:
                status = graph.container_status(cid, token)
                if status == "IN_PROGRESS":
                    status = graph.wait_for_container(cid, token)
            except GraphError as exc:
                return self.containers._error(post, exc, None, "item", seen)
            seen.append(claims.attempt(post.id, "item", status.lower(), container_id=cid,
                                       detail=f"{item.label}: the committed item container asked"))
            if status == "FINISHED":
                return cid
            seen.append(claims.attempt(post.id, "item", "replaced", container_id=cid,
                                       detail=f"{item.label}: item container {cid} is {status}; a new one replaces it"))
        staged = self._stage(post, f"{post.id}-{item.position:02d}", item.media_path, seen)
        if isinstance(staged, Ready):
            return staged
        cid = self._create(post, {"image_url": staged.url, "is_carousel_item": "true"}, seen, "item")
        if isinstance(cid, Ready):
            return cid
        # Committed before the next call: a rerun asks this container instead of making another.
        claims.write_item(post, item.position, dict(container_id=cid, container_created_at=datetime.now(timezone.utc)),
                          [*seen, claims.attempt(post.id, "item", "created", container_id=cid,
                                                 detail=f"{item.label} media={staged.url}")])
        seen.clear()
        crash_point("after_item_container")
        crash_point(f"after_item_container_{item.position}")
        try:
            status = graph.wait_for_container(cid, token)
            if status == "FINISHED":
                return cid
            reason = graph.container_error(cid, token) if status == "ERROR" else ""
        except GraphError as exc:
            return self.containers._error(post, exc, None, "item", seen)
        claims.write_item(post, item.position, dict(container_id=None, container_created_at=None), [])
        return self._fail(post, f"post {post.id}: carousel {item.label}: item container {cid} ended {status}"
                                + (f": {reason}" if reason else "") + "; it is made again on the next attempt",
                          seen, retryable=True, step="item", container_id=cid)

    # --- reel and story -------------------------------------------------------------------------

    def _single(self, post: DuePost, seen: list) -> tuple[str, dict, str] | Ready:
        from persona_pipeline.resources.instagram_containers import Ready, caption_digest

        options = post.format_options or {}
        media_type = "REELS" if post.format == post_formats.REEL else "STORIES"
        if is_video(post):
            video_path = options.get("video_path")
            problems = self._video_problems(post, video_path)
            if problems:
                return self._fail(post, "; ".join(problems) + "; nothing was uploaded", seen)
            if self.account.publisher.uploads_videos():
                return self._resumable(post, media_type, video_path, seen)
            staged = self._stage(post, str(post.id), video_path, seen)
            if isinstance(staged, Ready):
                return staged
            fields = {"media_type": media_type, "video_url": staged.url}
            if post.format == post_formats.REEL:
                fields.update(caption=post.text, share_to_feed="true" if options.get("share_to_feed", True) else "false")
                if options.get("cover"):
                    cover = self._stage(post, f"{post.id}-cover", post.media_path, seen)
                    if isinstance(cover, Ready):
                        return cover
                    fields["cover_url"] = cover.url
                elif options.get("thumb_offset_ms") is not None:
                    fields["thumb_offset"] = str(int(options["thumb_offset_ms"]))
        else:
            width, height = media.image_size(post.media_path)
            if not post_formats.is_vertical(width, height):
                return self._fail(post, f"post {post.id}: story image {post.media_path}: aspect {width}x{height} "
                                        "is not 9:16", seen)
            staged = self._stage(post, str(post.id), post.media_path, seen)
            if isinstance(staged, Ready):
                return staged
            fields = {"media_type": media_type, "image_url": staged.url}
        cid = self._create(post, fields, seen, "container")
        if isinstance(cid, Ready):
            return cid
        detail = f"text_sha256={caption_digest(post.text)} media={staged.url} media_type={media_type}"
        return cid, dict(media_url=staged.url, media_sha256=staged.sha256), detail

    def _resumable(self, post: DuePost, media_type: str, video_path: str, seen: list) -> tuple[str, dict, str] | Ready:
        """A video container for the resumable upload: the format's fields with upload_type=resumable and no
        video_url. Its bytes go after its id is committed (`upload`). With no public URL for a cover, a reel's
        cover is its frame at thumb_offset (the first frame, unless formats.reel.thumb_offset_ms says)."""
        from persona_pipeline.fileio import sha256_file
        from persona_pipeline.resources.instagram_containers import Ready, caption_digest

        options = post.format_options or {}
        fields = {"media_type": media_type}
        if post.format == post_formats.REEL:
            fields.update(caption=post.text, share_to_feed="true" if options.get("share_to_feed", True) else "false")
            if options.get("cover") and self.account.publisher.media_public_base_url:
                cover = self._stage(post, f"{post.id}-cover", post.media_path, seen)
                if isinstance(cover, Ready):
                    return cover
                fields["cover_url"] = cover.url
            else:
                fields["thumb_offset"] = str(int(options.get("thumb_offset_ms") or 0))
        self.claims.renew(post)
        try:
            cid, uri = self.account.graph.create_resumable(self.account.user_id, self.account.token, fields)
        except GraphError as exc:
            return self.containers._error(post, exc, None, "container", seen)
        sha = sha256_file(Path(video_path))
        detail = f"text_sha256={caption_digest(post.text)} upload=resumable media_type={media_type} video_sha256={sha}"
        return cid, dict(media_url=uri, media_sha256=sha), detail

    def upload(self, post: DuePost, cid: str) -> list | Ready:
        """Send a resumable container's video (resuming where Instagram says it stopped): the attempt rows to
        write with the next step, or a finished Ready when the upload failed (recorded; the container stays
        committed, so the next run resumes it)."""
        from persona_pipeline.resources.instagram_upload import upload_video

        account, path = self.account, Path((post.format_options or {})["video_path"])
        try:
            resumed = upload_video(account.graph, cid, post.media_url, account.token, path, log=self.batch.warn)
        except GraphError as exc:
            return self.containers._error(post, exc, cid, "upload", [])
        return [self.claims.attempt(post.id, "upload", "uploaded", container_id=cid,
                                    detail=f"{path.stat().st_size} bytes, {resumed} interruption(s) resumed")]

    def _video_problems(self, post: DuePost, video_path: str | None) -> list[str]:
        from persona_pipeline import video

        if not video_path:
            return [f"post {post.id}: the {post.format} has no video file"]
        try:
            facts = video.probe(Path(video_path))
        except media.MediaError as exc:
            return [f"post {post.id}: {exc}"]
        return post_formats.video_problems(f"post {post.id} video {Path(video_path).name}", post.format, facts)
