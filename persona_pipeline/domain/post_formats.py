"""The post formats and the rules each must meet before anything is sent to Instagram
(docs/posting.md#formats). Pure: sizes and numbers in, problems out.

- `feed`: one image, aspect 4:5..1.91:1 (domain/media.py exports it).
- `carousel`: 2..10 images (the content-publishing API's item limit), all of one aspect, ordered.
- `story`: one 9:16 image, or a 9:16 video made from stills.
- `reel`: one 9:16 video made from stills.

A rule broken is a `FormatError` (or a list of problems) naming the post, the item, the field and
the value, so a person can fix the one thing that is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Mapping, Sequence

FEED, CAROUSEL, STORY, REEL = "feed", "carousel", "story", "reel"
FORMATS = (FEED, CAROUSEL, STORY, REEL)
VIDEO_FORMATS = (REEL,)  # a story is a video only when its settings say so

CAROUSEL_MIN_ITEMS = 2
CAROUSEL_MAX_ITEMS = 10  # POST /{user}/media with media_type=CAROUSEL takes up to 10 children
# The aspects a carousel may be exported to (all within the feed's 4:5..1.91:1), as output sizes.
CAROUSEL_ASPECTS: dict[str, tuple[int, int]] = {"4:5": (1080, 1350), "1:1": (1080, 1080), "1.91:1": (1080, 566)}
VERTICAL_SIZE = (1080, 1920)  # stories and reels: 9:16
VERTICAL_TOLERANCE = 0.01  # Instagram takes 9:16 give or take rounding (1080x1920, 720x1280, 1081x1920)
# A story's top and bottom bands are covered by Instagram's own interface (profile bar, reply
# field): the subject is kept in the middle band. Meta's creative guidance: leave about 14 % top
# and 20 % bottom free; in a 1080x1920 frame that is 250 px and 340 px (rounded to 10 px).
STORY_SAFE_TOP, STORY_SAFE_BOTTOM = 250, 340


class FormatError(ValueError):
    """A post that breaks its format's rules; the message names post, item, field and value."""


@dataclass(frozen=True)
class VideoLimits:
    """What the API accepts for one kind of video (the content-publishing reference's tables)."""

    min_s: float
    max_s: float
    min_fps: float
    max_fps: float
    max_bitrate: int  # bits per second, video stream
    max_bytes: int
    max_width: int
    audio_max_rate: int = 48000
    audio_codecs: tuple[str, ...] = ("aac",)
    video_codecs: tuple[str, ...] = ("h264", "hevc")


REEL_LIMITS = VideoLimits(min_s=3, max_s=15 * 60, min_fps=23, max_fps=60, max_bitrate=25_000_000,
                          max_bytes=300 * 1024 * 1024, max_width=1920)
STORY_VIDEO_LIMITS = VideoLimits(min_s=3, max_s=60, min_fps=23, max_fps=60, max_bitrate=25_000_000,
                                 max_bytes=100 * 1024 * 1024, max_width=1920)


@dataclass(frozen=True)
class VideoFacts:
    """What a probe of an encoded file found (formats/video.py `probe`)."""

    duration_s: float
    fps: float
    width: int
    height: int
    bitrate: int  # video stream, bits per second
    size_bytes: int
    video_codec: str
    audio_codec: str | None = None
    audio_rate: int | None = None


def check_format(value: str, what: str) -> str:
    if value not in FORMATS:
        raise FormatError(f"{what}: format {value!r} is not one of {', '.join(FORMATS)}")
    return value


def video_limits(fmt: str) -> VideoLimits:
    return REEL_LIMITS if fmt == REEL else STORY_VIDEO_LIMITS


def is_vertical(width: int, height: int) -> bool:
    """9:16 within VERTICAL_TOLERANCE (relative)."""
    return width > 0 and height > 0 and abs(width / height - 9 / 16) <= VERTICAL_TOLERANCE * 9 / 16


def _ratio(width: int, height: int) -> str:
    return f"{width}x{height} = {width / height:.3f}" if height else f"{width}x{height}"


def carousel_problems(post: str, items: Sequence[tuple[str, int, int]]) -> list[str]:
    """What is wrong with a carousel of `items` ((label, width, height) in order); empty if nothing.
    `post` and the labels name them in the messages ("post 12", "item 3 (candidate 45)")."""
    problems = []
    n = len(items)
    if not CAROUSEL_MIN_ITEMS <= n <= CAROUSEL_MAX_ITEMS:
        problems.append(f"{post}: a carousel has {CAROUSEL_MIN_ITEMS} to {CAROUSEL_MAX_ITEMS} items; "
                        f"field items has {n}")
    if not items:
        return problems
    first_label, fw, fh = items[0]
    for label, width, height in items:
        if width <= 0 or height <= 0:
            problems.append(f"{post}: {label}: size {width}x{height} is not a picture")
            continue
        if not (width * 5 >= height * 4 and width * 100 <= height * 191):
            problems.append(f"{post}: {label}: aspect {_ratio(width, height)} is outside the feed's 4:5..1.91:1")
        if fh and width * fh != height * fw:
            problems.append(f"{post}: {label}: aspect {_ratio(width, height)} differs from {first_label}'s "
                            f"{_ratio(fw, fh)}; every carousel item must share one aspect")
    return problems


def check_carousel(post: str, items: Sequence[tuple[str, int, int]]) -> None:
    problems = carousel_problems(post, items)
    if problems:
        raise FormatError("; ".join(problems))


def check_vertical(what: str, width: int, height: int) -> None:
    """A story or reel picture must be 9:16."""
    if not is_vertical(width, height):
        raise FormatError(f"{what}: aspect {_ratio(width, height)} is not 9:16 (0.5625) as a story or reel needs")


def video_problems(what: str, fmt: str, facts: VideoFacts) -> list[str]:
    """What stops the API from taking this video as a `fmt` (reel or story); empty if nothing."""
    limits = video_limits(fmt)
    problems = []
    if not limits.min_s <= facts.duration_s <= limits.max_s:
        problems.append(f"{what}: duration {facts.duration_s:.2f} s is outside the {fmt}'s "
                        f"{limits.min_s:g}..{limits.max_s:g} s")
    if not limits.min_fps <= facts.fps <= limits.max_fps:
        problems.append(f"{what}: frame rate {facts.fps:g} fps is outside {limits.min_fps:g}..{limits.max_fps:g}")
    if facts.bitrate > limits.max_bitrate:
        problems.append(f"{what}: video bitrate {facts.bitrate} b/s is over {limits.max_bitrate} b/s")
    if facts.size_bytes > limits.max_bytes:
        problems.append(f"{what}: file size {facts.size_bytes} bytes is over the {fmt}'s {limits.max_bytes} bytes "
                        f"({limits.max_bytes // (1024 * 1024)} MiB)")
    if facts.width > limits.max_width:
        problems.append(f"{what}: width {facts.width} px is over {limits.max_width} px")
    if not is_vertical(facts.width, facts.height):
        problems.append(f"{what}: aspect {_ratio(facts.width, facts.height)} is not 9:16")
    if facts.video_codec not in limits.video_codecs:
        problems.append(f"{what}: video codec {facts.video_codec!r} is not one of {', '.join(limits.video_codecs)}")
    if facts.audio_codec is not None and facts.audio_codec not in limits.audio_codecs:
        problems.append(f"{what}: audio codec {facts.audio_codec!r} is not AAC")
    if facts.audio_rate and facts.audio_rate > limits.audio_max_rate:
        problems.append(f"{what}: audio sample rate {facts.audio_rate} Hz is over {limits.audio_max_rate} Hz")
    return problems


def crop_box(width: int, height: int, target: tuple[int, int],
             focus: tuple[float, float] = (0.5, 0.5)) -> tuple[int, int, int, int]:
    """The largest box of `target`'s aspect inside a width x height picture, placed so that the
    focus point (fractions of width and height) is as near its centre as the edges allow:
    (left, top, right, bottom). A reviewer's crop is this focus point."""
    fx, fy = focus
    if not (0 <= fx <= 1 and 0 <= fy <= 1):
        raise FormatError(f"crop focus {focus} must be two fractions in 0..1")
    tw, th = target
    if width * th >= height * tw:  # wider than the target: full height, cut the sides
        box_w, box_h = max(1, height * tw // th), height
    else:
        box_w, box_h = width, max(1, width * th // tw)
    left = min(max(0, round(fx * width - box_w / 2)), width - box_w)
    top = min(max(0, round(fy * height - box_h / 2)), height - box_h)
    return left, top, left + box_w, top + box_h


def check_mix(mix: Mapping[str, int], what: str) -> dict[str, int]:
    """A format mix: known formats, weights 0..100, not all 0."""
    for name, weight in mix.items():
        check_format(name, what)
        if not 0 <= int(weight) <= 100:
            raise FormatError(f"{what}: format {name} weight must be 0-100, got {weight}")
    if sum(mix.values()) <= 0:
        raise FormatError(f"{what}: format weights sum to 0")
    return dict(mix)


def format_order(mix: Mapping[str, int], history: Sequence[str]) -> list[str]:
    """The formats to try for the next post, best first, as pillar weights are honoured
    (domain/strategy.py): the format furthest below its target share (weight / total) over
    `history` (the formats of the recent and already planned posts) comes first; ties go to the
    larger weight, then to FORMATS order. Weight-0 formats are never offered."""
    total = sum(mix.values())
    counts = {name: sum(1 for f in history if f == name) for name in mix}
    n = len(history)

    def deficit(name: str) -> Fraction:
        actual = Fraction(counts[name], n) if n else Fraction(0)
        return Fraction(mix[name], total) - actual

    live = [name for name in FORMATS if mix.get(name, 0) > 0]
    return sorted(live, key=lambda name: (-deficit(name), -mix[name], FORMATS.index(name)))
