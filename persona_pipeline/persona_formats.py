"""persona.yaml `formats:`: which formats the persona posts and how each is made
(docs/posting.md#formats). Validated with the domain's own rules (domain/post_formats.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from persona_pipeline.domain import post_formats


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CarouselSettings(_Strict):
    items: int = Field(default=5, ge=post_formats.CAROUSEL_MIN_ITEMS, le=post_formats.CAROUSEL_MAX_ITEMS)
    aspect: str = "4:5"  # every item is cropped to this one aspect
    focus_y: float = Field(default=0.4, ge=0, le=1)  # the default crop's focus: faces sit above the middle
    # Where the items come from: `run`, the lead's generation run's top candidates; `cluster`, the best
    # available items of the lead's content-library cluster (one look or scene across runs and photos).
    source: Literal["run", "cluster"] = "run"

    @field_validator("aspect")
    @classmethod
    def _known_aspect(cls, value: str) -> str:
        if value not in post_formats.CAROUSEL_ASPECTS:
            raise ValueError(f"aspect {value!r} is not one of {', '.join(post_formats.CAROUSEL_ASPECTS)}")
        return value


class ReelSettings(_Strict):
    stills: int = Field(default=5, ge=1, le=post_formats.CAROUSEL_MAX_ITEMS)
    seconds_per_still: float = Field(default=3.0, gt=0, le=60)
    crossfade_s: float = Field(default=0.5, ge=0, le=5)
    fps: int = Field(default=30, ge=23, le=60)
    zoom: float = Field(default=1.12, ge=1.0, le=2.0)  # Ken Burns: the end (or start) scale of each still
    # A file in the persona's folder (relative, never leaving it): trimmed to the video, faded in and out.
    audio: str | None = None
    audio_fade_s: float = Field(default=1.0, ge=0, le=10)
    share_to_feed: bool = True
    cover: bool = True  # the first still's 9:16 frame as cover_url; false: thumb_offset_ms picks a frame
    thumb_offset_ms: int | None = Field(default=None, ge=0)
    video_bitrate: int = Field(default=6_000_000, ge=500_000, le=post_formats.REEL_LIMITS.max_bitrate)


class StorySettings(_Strict):
    video: bool = False  # true: a video story made from stills like a reel (at most 60 s)


class FormatSettings(_Strict):
    # Weights like pillar weights: the format furthest below its share goes next; today's default is feed only.
    mix: dict[str, int] = {"feed": 100}
    carousel: CarouselSettings = CarouselSettings()
    reel: ReelSettings = ReelSettings()
    story: StorySettings = StorySettings()

    @field_validator("mix")
    @classmethod
    def _mix(cls, mix: dict[str, int]) -> dict[str, int]:
        try:
            return post_formats.check_mix(mix, "formats.mix")
        except post_formats.FormatError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _story_length(self) -> "FormatSettings":
        if self.story.video and self.mix.get("story"):
            seconds = self.reel.stills * self.reel.seconds_per_still
            if seconds > post_formats.STORY_VIDEO_LIMITS.max_s:
                raise ValueError(f"a video story of {self.reel.stills} stills x {self.reel.seconds_per_still} s "
                                 f"= {seconds:g} s is over {post_formats.STORY_VIDEO_LIMITS.max_s:g} s")
        return self
