"""Making a planned post's media in its format (docs/posting.md#formats): the format picked from
the persona's mix, the stills gathered from the lead image's generation run, and the files written.

- feed: the lead image as an Instagram-ready JPEG (domain/media.export_post_jpeg), as before.
- carousel: the run's top candidates (the lead first, then by Bradley-Terry score, Elo), each
  cropped to one aspect around its focus point (domain/media.export_item_jpeg); with
  `formats.carousel.source: cluster`, the best available items of the lead's library cluster instead.
- story: the lead image on a 9:16 canvas inside the safe bands; with `formats.story.video`, a
  video made like a reel (at most 60 s).
- reel: the run's top stills as a 9:16 video (video.encode_reel), with the persona's audio
  file when set; when the library item is a video step's candidate, its clip (and the run's other
  clips) played in turn instead (video.encode_clips: real motion, no pan and zoom). `media_path` is its first frame as a JPEG (pages show it; `cover_url` when
  `formats.reel.cover`); the MP4 is `format_options.video_path`.

Each still is a `post_items` row linking back to its candidate (-> LoRA -> dataset). A format that
cannot be made (a carousel from a run with one usable still) falls back to the next format the mix
wants, and the post's strategy note says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from persona_pipeline.db import models
from persona_pipeline.domain import media, post_formats, post_states
from persona_pipeline.fileio import atomic_write, entry_refusal
from persona_pipeline.persona_formats import FormatSettings

USABLE = ("active", "winner")  # candidates a person has not killed, rejected or culled


@dataclass(frozen=True)
class Still:
    path: Path
    candidate_id: int | None
    library_item_id: int | None


def held_candidates(session: Session, persona_id: int) -> set[int]:
    """Candidates a live post of the persona already shows (as its lead or as one of its items)."""
    live = models.Post.status.in_(post_states.HOLDS_IMAGE)
    leads = session.scalars(select(models.Post.candidate_id).where(
        models.Post.persona_id == persona_id, live, models.Post.candidate_id.is_not(None)))
    items = session.scalars(select(models.PostItem.candidate_id).join(models.Post, models.Post.id == models.PostItem.post_id)
                            .where(models.Post.persona_id == persona_id, live, models.PostItem.candidate_id.is_not(None)))
    return set(leads) | set(items)


def run_stills(session: Session, item: models.LibraryItem, n: int, held: set[int]) -> list[Still]:
    """Up to `n` stills for a multi-image post: the library item first, then the best other usable
    candidates of the same generation run that no live post holds (by BT score, then Elo)."""
    lead = Still(Path(item.image_path), item.candidate_id, item.id)
    if item.candidate_id is None or n <= 1:
        return [lead]
    run_id = session.scalar(select(models.Candidate.run_id).where(models.Candidate.id == item.candidate_id))
    rows = session.scalars(select(models.Candidate).where(
        models.Candidate.run_id == run_id, models.Candidate.id != item.candidate_id,
        models.Candidate.status.in_(USABLE))
        .order_by(models.Candidate.bt_score.desc().nulls_last(), models.Candidate.elo.desc(), models.Candidate.id)).all()
    others = [Still(Path(c.image_path), c.id, None) for c in rows if c.id not in held and Path(c.image_path).is_file()]
    return [lead, *others[: n - 1]]


def held_items(session: Session, persona_id: int) -> set[int]:
    """Library items a live post of the persona already shows (as its lead or as one of its items)."""
    live = models.Post.status.in_(post_states.HOLDS_IMAGE)
    leads = session.scalars(select(models.Post.library_item_id).where(
        models.Post.persona_id == persona_id, live, models.Post.library_item_id.is_not(None)))
    items = session.scalars(select(models.PostItem.library_item_id).join(models.Post, models.Post.id == models.PostItem.post_id)
                            .where(models.Post.persona_id == persona_id, live, models.PostItem.library_item_id.is_not(None)))
    return set(leads) | set(items)


def cluster_stills(session: Session, item: models.LibraryItem, n: int, held: set[int], held_library: set[int]) -> list[Still]:
    """Up to `n` stills for a carousel of one content-library cluster: the library item first, then the best
    other available items of its cluster (BT score, then nearest its centre) that no live post shows; just the
    item when it has no cluster."""
    lead = Still(Path(item.image_path), item.candidate_id, item.id)
    if item.cluster_id is None or n <= 1:
        return [lead]
    rows = session.scalars(select(models.LibraryItem).where(
        models.LibraryItem.persona_id == item.persona_id, models.LibraryItem.cluster_id == item.cluster_id,
        models.LibraryItem.id != item.id, models.LibraryItem.status == "available")
        .order_by(models.LibraryItem.score.desc().nulls_last(), models.LibraryItem.cluster_distance.asc().nulls_last(),
                  models.LibraryItem.id)).all()
    others = [Still(Path(r.image_path), r.candidate_id, r.id) for r in rows
              if r.id not in held_library and (r.candidate_id is None or r.candidate_id not in held)
              and Path(r.image_path).is_file()]
    return [lead, *others[: n - 1]]


def run_clips(session: Session, item: models.LibraryItem, n: int, held: set[int]) -> list[Still]:
    """Up to `n` video clips for a reel whose library item is a video step's candidate: its clip first,
    then the best other usable clips of the same run that no live post holds; [] when the item has no clip."""
    lead = session.get(models.Candidate, item.candidate_id) if item.candidate_id is not None else None
    if lead is None or not lead.video_path or not Path(lead.video_path).is_file():
        return []
    rows = session.scalars(select(models.Candidate).where(
        models.Candidate.run_id == lead.run_id, models.Candidate.id != lead.id, models.Candidate.status.in_(USABLE),
        models.Candidate.video_path.is_not(None))
        .order_by(models.Candidate.bt_score.desc().nulls_last(), models.Candidate.elo.desc(), models.Candidate.id)).all()
    others = [Still(Path(c.video_path), c.id, None) for c in rows if c.id not in held and Path(c.video_path).is_file()]
    return [Still(Path(lead.video_path), lead.id, item.id), *others[: n - 1]]


def audio_path(folder: Path, relative: str | None) -> Path | None:
    """The persona's audio file (formats.reel.audio), refused by name if it leaves the folder or is a link."""
    if not relative:
        return None
    refusal = entry_refusal(Path(folder), Path(relative))
    if refusal:
        raise media.MediaError(f"{Path(folder) / 'persona.yaml'}: formats.reel.audio: {refusal}")
    path = Path(folder) / relative
    if not path.is_file():
        raise media.MediaError(f"{Path(folder) / 'persona.yaml'}: formats.reel.audio: {path} is not a file")
    return path


def reel_plan(settings: FormatSettings):
    from persona_pipeline.video import ReelPlan

    reel = settings.reel
    return ReelPlan(seconds_per_still=reel.seconds_per_still, crossfade_s=reel.crossfade_s, fps=reel.fps,
                    zoom=reel.zoom, video_bitrate=reel.video_bitrate, audio_fade_s=reel.audio_fade_s)


class MediaMaker:
    """Writes one persona's post files under `media_dir`."""

    def __init__(self, session: Session, persona: models.Persona, settings: FormatSettings, media_dir: Path,
                 folder: Path) -> None:
        self.session, self.persona, self.settings = session, persona, settings
        self.media_dir, self.folder = Path(media_dir), Path(folder)
        self.held = held_candidates(session, persona.id)
        self.held_library = held_items(session, persona.id)

    def stills_for(self, fmt: str, item: models.LibraryItem) -> list[Still] | None:
        """The stills a post of `fmt` would show, or None when the run has too few for it."""
        if fmt == post_formats.CAROUSEL:
            carousel = self.settings.carousel
            stills = (cluster_stills(self.session, item, carousel.items, self.held, self.held_library)
                      if carousel.source == "cluster" else run_stills(self.session, item, carousel.items, self.held))
            return stills if len(stills) >= post_formats.CAROUSEL_MIN_ITEMS else None
        if fmt == post_formats.REEL or (fmt == post_formats.STORY and self.settings.story.video):
            # A video step's clips when the item is one (real motion), else the run's stills with pan and zoom.
            stills = run_clips(self.session, item, self.settings.reel.stills, self.held)
            if stills:
                from persona_pipeline.video import clip_facts

                seconds = sum(clip_facts(s.path)["duration_s"] for s in stills)
            else:
                stills = run_stills(self.session, item, self.settings.reel.stills, self.held)
                seconds = len(stills) * self.settings.reel.seconds_per_still
            limits = post_formats.video_limits(fmt)
            return stills if limits.min_s <= seconds <= limits.max_s else None
        return [Still(Path(item.image_path), item.candidate_id, item.id)]

    def choose(self, item: models.LibraryItem, history: Sequence[str]) -> tuple[str, list[Still], str]:
        """(format, stills, note) for a post of `item`: the first format in the mix's order that
        can be made; `note` says what was passed over and why."""
        passed = []
        for fmt in post_formats.format_order(self.settings.mix, history):
            stills = self.stills_for(fmt, item)
            if stills is not None:
                note = f"format {fmt}" + (f" ({'; '.join(passed)})" if passed else "")
                return fmt, stills, note
            where = "cluster" if fmt == post_formats.CAROUSEL and self.settings.carousel.source == "cluster" else "run"
            passed.append(f"{fmt} passed over: too few usable stills in the {where} of library item {item.id}")
        # Every wanted format needs more stills than there are: a feed post always can be made.
        return post_formats.FEED, [Still(Path(item.image_path), item.candidate_id, item.id)], \
            "format feed (" + "; ".join(passed) + ")"

    def make(self, post: models.Post, fmt: str, stills: list[Still]) -> None:
        """Write `post`'s files and items; a MediaError or FormatError names the post and the file."""
        post.format = fmt
        self.held.update(s.candidate_id for s in stills if s.candidate_id is not None)
        self.held_library.update(s.library_item_id for s in stills if s.library_item_id is not None)
        stem = self.media_dir / f"post-{post.id:06d}"
        if fmt == post_formats.FEED:
            post.media_sha256 = atomic_write(stem.with_suffix(".jpg"), media.export_post_jpeg(stills[0].path))
            post.media_path = str(stem.with_suffix(".jpg"))
            post.format_options = {}
            return
        focus_y = self.settings.carousel.focus_y
        items = [models.PostItem(post_id=post.id, position=i, candidate_id=s.candidate_id,
                                 library_item_id=s.library_item_id, source_path=str(s.path),
                                 crop={"x": 0.5, "y": focus_y}) for i, s in enumerate(stills, 1)]
        self.session.add_all(items)
        if fmt == post_formats.CAROUSEL:
            post.format_options = {"aspect": self.settings.carousel.aspect}
            if self.settings.carousel.source == "cluster":
                post.format_options["cluster_id"] = self.session.get(models.LibraryItem, stills[0].library_item_id).cluster_id
            export_carousel(post, items, self.settings.carousel.aspect, self.media_dir)
        elif fmt == post_formats.STORY and not self.settings.story.video:
            post.format_options = {"video": False}
            data = media.story_jpeg(stills[0].path, post_formats.VERTICAL_SIZE, post_formats.STORY_SAFE_TOP,
                                    post_formats.STORY_SAFE_BOTTOM)
            post.media_sha256 = atomic_write(stem.with_suffix(".jpg"), data)
            post.media_path = str(stem.with_suffix(".jpg"))
        else:
            reel = self.settings.reel
            post.format_options = {"video": True, "share_to_feed": reel.share_to_feed, "audio": reel.audio,
                                   "thumb_offset_ms": reel.thumb_offset_ms}
            make_video(post, items, reel_plan(self.settings), self.media_dir,
                       audio=audio_path(self.folder, reel.audio), cover=reel.cover)


def export_carousel(post: models.Post, items: Sequence[models.PostItem], aspect: str, media_dir: Path) -> None:
    """Each item cropped to `aspect` around its focus; the items checked together (count, one aspect)."""
    size = post_formats.CAROUSEL_ASPECTS[aspect]
    checked = []
    for item in items:
        data = media.export_item_jpeg(Path(item.source_path), size, (item.crop["x"], item.crop["y"]))
        path = Path(media_dir) / f"post-{post.id:06d}-{item.position:02d}.jpg"
        item.media_sha256 = atomic_write(path, data)
        item.media_path = str(path)
        label = f"item {item.position}" + (f" (candidate {item.candidate_id})" if item.candidate_id else "")
        checked.append((label, *size))
    post_formats.check_carousel(f"post {post.id}", checked)
    post.media_path, post.media_sha256 = items[0].media_path, items[0].media_sha256  # the lead, for previews


def make_video(post: models.Post, items: Sequence[models.PostItem], plan, media_dir: Path, *,
               audio: Path | None, cover: bool) -> None:
    """The post's MP4 (and cover JPEG) from its items' stills or a video step's clips, checked against
    the API's limits."""
    from persona_pipeline import video

    sources = [Path(i.source_path) for i in items]
    clips = [path for path in sources if video.is_clip(path)]
    if clips and len(clips) != len(sources):
        raise post_formats.FormatError(f"post {post.id}: a {post.format} is made of stills or of clips, not both "
                                       f"({len(clips)} clips, {len(sources) - len(clips)} stills)")
    if clips:
        seconds = sum(video.clip_facts(path)["duration_s"] for path in clips)
        what = f"{len(clips)} clips of {seconds:g} s"
    else:
        seconds = plan.duration(len(items))
        what = f"{len(items)} stills x {plan.seconds_per_still:g} s = {seconds:g} s"
    limits = post_formats.video_limits(post.format)
    if not limits.min_s <= seconds <= limits.max_s:
        raise post_formats.FormatError(f"post {post.id}: a {post.format} of {what} is outside "
                                       f"{limits.min_s:g}..{limits.max_s:g} s")
    focus = [(item.crop["x"], item.crop["y"]) for item in items]
    target = Path(media_dir) / f"post-{post.id:06d}.mp4"
    encode = video.encode_clips if clips else video.encode_reel
    facts = encode(sources, target, plan, focus=focus, audio=audio)
    problems = post_formats.video_problems(f"post {post.id} video {target.name}", post.format, facts)
    if problems:
        raise post_formats.FormatError("; ".join(problems))
    # media_path stays an image (the first frame's view): every page that shows a post shows it;
    # the MP4 is format_options.video_path, and cover_url is sent only when `cover` is set.
    poster = Path(media_dir) / f"post-{post.id:06d}-cover.jpg"
    post.media_sha256 = atomic_write(poster, video.cover_jpeg(Path(items[0].source_path), focus=focus[0]))
    post.media_path = str(poster)
    options = dict(post.format_options or {})
    options.update(video_path=str(target), cover=cover, duration_s=round(facts.duration_s, 3), fps=facts.fps,
                   bitrate=facts.bitrate, size_bytes=facts.size_bytes)
    post.format_options = options


def remake(session: Session, post: models.Post, settings: FormatSettings, media_dir: Path, folder: Path) -> None:
    """After a reviewer reordered, replaced or re-cropped items: the post's files made again from its items."""
    items = list(session.scalars(select(models.PostItem).where(models.PostItem.post_id == post.id)
                                 .order_by(models.PostItem.position)))
    if post.format == post_formats.CAROUSEL:
        export_carousel(post, items, (post.format_options or {}).get("aspect", settings.carousel.aspect), media_dir)
    elif post.format in (post_formats.REEL, post_formats.STORY) and (post.format_options or {}).get("video"):
        make_video(post, items, reel_plan(settings), media_dir, audio=audio_path(folder, settings.reel.audio),
                   cover=settings.reel.cover)
    elif post.format == post_formats.STORY:
        path = Path(media_dir) / f"post-{post.id:06d}.jpg"
        post.media_sha256 = atomic_write(path, media.story_jpeg(Path(items[0].source_path), post_formats.VERTICAL_SIZE,
                                                                post_formats.STORY_SAFE_TOP,
                                                                post_formats.STORY_SAFE_BOTTOM))
        post.media_path = str(path)


__all__ = ["MediaMaker", "Still", "audio_path", "cluster_stills", "export_carousel", "held_candidates", "held_items",
           "make_video", "remake", "run_clips", "run_stills"]
