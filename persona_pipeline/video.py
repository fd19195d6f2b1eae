"""Reels and video stories made from stills: a slow pan and zoom on each still (Ken Burns),
crossfades between them, an optional audio track (trimmed to the video, faded in and out), encoded
as H.264 + AAC in MP4 at 1080x1920 through PyAV (whose wheel bundles FFmpeg's libraries).

Frames are streamed: one frame is drawn, handed to the encoder and dropped; at most two stills are
held at a time (the two sides of a crossfade), so memory does not grow with the video's length.
The file is written to a temporary name and renamed, with the moov atom at the front and no edit
list (what Instagram asks of an MP4). `probe` reads back what the API checks (duration, frame
rate, bitrate, size, codecs): domain/post_formats.video_problems judges it before any upload.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence

from PIL import Image

from persona_pipeline.domain import media
from persona_pipeline.domain.post_formats import VERTICAL_SIZE, VideoFacts, crop_box

AUDIO_RATE = 48000
AUDIO_BITRATE = 128_000


@dataclass(frozen=True)
class ReelPlan:
    """How a video is made from its stills (persona.yaml formats.reel)."""

    seconds_per_still: float = 3.0
    crossfade_s: float = 0.5
    fps: int = 30
    zoom: float = 1.12
    video_bitrate: int = 6_000_000
    audio_fade_s: float = 1.0
    size: tuple[int, int] = VERTICAL_SIZE
    # x264's superfast: half veryfast's CPU on these slow pans (bench/encode_reel.py), the bitrate
    # capped by maxrate all the same; stills in slow motion need none of the slower presets' tools.
    preset: str = "superfast"

    def duration(self, stills: int) -> float:
        return stills * self.seconds_per_still

    def frames(self, stills: int) -> int:
        return round(self.duration(stills) * self.fps)


class _Still:
    """One still, cropped to the frame's aspect around its focus and scaled to `zoom` x the frame:
    the largest view a frame takes of it, kept as YUV 4:2:0 planes. A frame is a box of these,
    scaled to the frame size by FFmpeg's swscale: no colour conversion per frame (a third of the
    CPU of cropping RGB and converting each frame). The box moves by whole luma pixels (even
    offsets, for the chroma planes): under half an output pixel of wobble."""

    def __init__(self, path: Path, plan: ReelPlan, index: int, focus: tuple[float, float]) -> None:
        import av

        width, height = plan.size
        picture = media.open_rgb(path)
        box = crop_box(picture.width, picture.height, plan.size, focus)
        bw, bh = _even(math.ceil(width * plan.zoom), 2), _even(math.ceil(height * plan.zoom), 4)
        base = picture.resize((bw, bh), Image.Resampling.LANCZOS, box=box)
        planes = av.VideoFrame.from_image(base).reformat(format="yuv420p").to_ndarray()
        self.y = planes[:bh]
        self.u = planes[bh:bh + bh // 4].reshape(bh // 2, bw // 2)
        self.v = planes[bh + bh // 4:].reshape(bh // 2, bw // 2)
        self.zoom_in = index % 2 == 0  # alternate: in, out, in...
        self.pan = 1 if index % 2 == 0 else -1  # and drift left, right...
        self.size = plan.size
        self.zoom = plan.zoom

    def frame(self, progress: float):
        """The view at `progress` (0..1) through this still's time on screen, as a yuv420p VideoFrame."""
        import av
        import numpy as np

        p = min(1.0, max(0.0, progress))
        p = p * p * (3 - 2 * p)  # ease in and out: no jerk where a still starts or ends
        scale = 1 + (self.zoom - 1) * (p if self.zoom_in else 1 - p)
        bh, bw = self.y.shape
        view_w, view_h = min(bw, _even(round(bw / scale), 2)), min(bh, _even(round(bh / scale), 4))
        slack = (bw - view_w) / 2
        cx = bw / 2 + self.pan * slack * (p - 0.5)
        left = min(max(0, _even(round(cx - view_w / 2), 2)), bw - view_w)
        top = min(max(0, _even(round((bh - view_h) / 2), 2)), bh - view_h)
        out = np.empty((view_h * 3 // 2, view_w), np.uint8)
        out[:view_h] = self.y[top:top + view_h, left:left + view_w]
        quarter = view_h // 4
        chroma = (slice(top // 2, (top + view_h) // 2), slice(left // 2, (left + view_w) // 2))
        out[view_h:view_h + quarter] = self.u[chroma].reshape(quarter, view_w)
        out[view_h + quarter:] = self.v[chroma].reshape(quarter, view_w)
        width, height = self.size
        return av.VideoFrame.from_ndarray(out, format="yuv420p").reformat(
            width=width, height=height, interpolation="BILINEAR")


def _even(value: int, step: int) -> int:
    """`value` rounded down to a multiple of `step` (YUV 4:2:0 planes want even sizes and offsets)."""
    return value - value % step


def _blend(a, b, alpha: float):
    """A crossfade frame: (1 - alpha) a + alpha b, on the YUV planes."""
    import av
    import numpy as np

    weight = int(round(alpha * 256))
    mixed = (a.to_ndarray().astype(np.uint16) * (256 - weight) + b.to_ndarray().astype(np.uint16) * weight) >> 8
    return av.VideoFrame.from_ndarray(mixed.astype(np.uint8), format="yuv420p")


def _frames(stills: Sequence[Path], plan: ReelPlan, focus: Sequence[tuple[float, float]]):
    """Each frame of the video in order (yuv420p VideoFrames), drawn on demand (two stills held at most)."""
    n, d, c = len(stills), plan.seconds_per_still, min(plan.crossfade_s, plan.seconds_per_still)
    cache: dict[int, _Still] = {}

    def still(i: int) -> _Still:
        if i not in cache:
            for old in [k for k in cache if k < i - 1]:
                del cache[old]
            cache[i] = _Still(Path(stills[i]), plan, i, focus[i])
        return cache[i]

    def view(i: int, t: float):
        start = i * d - c / 2
        return still(i).frame((t - start) / (d + c))

    for k in range(plan.frames(n)):
        t = (k + 0.5) / plan.fps
        i = min(n - 1, int(t // d))
        into, left = t - i * d, (i + 1) * d - t
        if c > 0 and i > 0 and into < c / 2:
            yield _blend(view(i - 1, t), view(i, t), 0.5 + into / c)
        elif c > 0 and i < n - 1 and left < c / 2:
            yield _blend(view(i, t), view(i + 1, t), 0.5 - left / c)
        else:
            yield view(i, t)


def _audio_chunks(path: Path, seconds: float, fade_s: float):
    """The audio of `path` as 48 kHz stereo float planes, trimmed to `seconds`, faded in and out;
    a file that is not audio is a MediaError naming it."""
    import av
    import numpy as np

    try:
        source = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise media.MediaError(f"{path}: not an audio file FFmpeg can read ({exc})") from None
    with source:
        if not source.streams.audio:
            raise media.MediaError(f"{path}: has no audio stream (streams: "
                                   f"{', '.join(s.type for s in source.streams) or 'none'})")
        stream = source.streams.audio[0]
        length = seconds
        if source.duration:
            length = min(seconds, source.duration / 1_000_000)
        total = int(length * AUDIO_RATE)
        fade = min(int(fade_s * AUDIO_RATE), total // 2)
        resampler = av.AudioResampler(format="fltp", layout="stereo", rate=AUDIO_RATE)
        done = 0
        try:
            for frame in source.decode(stream):
                for out in resampler.resample(frame):
                    planes = out.to_ndarray()
                    take = min(planes.shape[1], total - done)
                    if take <= 0:
                        return
                    planes = planes[:, :take].astype(np.float32, copy=True)
                    index = np.arange(done, done + take, dtype=np.float32)
                    if fade:
                        gain = np.minimum(1.0, np.minimum(index / fade, (total - index) / fade))
                        planes *= np.clip(gain, 0.0, 1.0)
                    yield planes, done
                    done += take
        except av.error.FFmpegError as exc:
            raise media.MediaError(f"{path}: the audio cannot be decoded ({exc})") from None
        if done == 0:
            raise media.MediaError(f"{path}: holds no audio samples")


def encode_reel(stills: Sequence[Path], target: Path, plan: ReelPlan = ReelPlan(), *,
                focus: Sequence[tuple[float, float]] | None = None, audio: Path | None = None) -> VideoFacts:
    """Write the video of `stills` to `target` (MP4, H.264 + AAC when `audio`) and return its probe."""
    if not stills:
        raise media.MediaError(f"{target}: a video needs at least one still")
    focus = list(focus or [(0.5, 0.5)] * len(stills))
    return _write_mp4(_frames(stills, plan, focus), Path(target), plan, plan.duration(len(stills)), audio)


def encode_clips(clips: Sequence[Path], target: Path, plan: ReelPlan = ReelPlan(), *,
                 focus: Sequence[tuple[float, float]] | None = None, audio: Path | None = None) -> VideoFacts:
    """A reel of video clips (a video step's output) played one after the other, each frame cropped to
    9:16 around its clip's focus and scaled to the reel's size, at the reel's frame rate (a clip's frames
    are held or skipped to keep its own timing), with the persona's audio as for stills."""
    if not clips:
        raise media.MediaError(f"{target}: a video needs at least one clip")
    focus = list(focus or [(0.5, 0.5)] * len(clips))
    duration = sum(clip_facts(Path(clip))["duration_s"] for clip in clips)
    return _write_mp4(_clip_frames(clips, plan, focus), Path(target), plan, duration, audio)


def _clip_frames(clips: Sequence[Path], plan: ReelPlan, focus: Sequence[tuple[float, float]]):
    """The reel's frames from the clips, one decoded frame held at a time."""
    import av

    width, height = plan.size
    for clip, point in zip(clips, focus):
        with av.open(str(clip)) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or plan.fps)
            shown, box = 0, None
            for index, frame in enumerate(container.decode(stream)):
                picture = frame.to_image()
                box = box or crop_box(picture.width, picture.height, plan.size, point)
                view = None
                # output frames whose time falls within this clip frame's time on screen
                while (shown + 0.5) / plan.fps < (index + 1) / rate:
                    if view is None:
                        view = av.VideoFrame.from_image(picture.resize((width, height), Image.Resampling.BICUBIC,
                                                                        box=box)).reformat(format="yuv420p")
                    yield view
                    shown += 1


def _write_mp4(frames, target: Path, plan: ReelPlan, duration: float, audio: Path | None) -> VideoFacts:
    """Encode `frames` (yuv420p VideoFrames at plan.fps) and the audio to `target` through a temporary name."""
    import av

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    width, height = plan.size
    try:
        with av.open(str(partial), mode="w", format="mp4",
                     options={"movflags": "+faststart", "use_editlist": "0"}) as container:
            video = container.add_stream("libx264", rate=plan.fps)
            video.width, video.height, video.pix_fmt = width, height, "yuv420p"
            gop = plan.fps * 2  # a closed GOP every 2 s (Instagram asks for 2-5 s)
            video.codec_context.gop_size = gop
            video.codec_context.options = {
                "preset": plan.preset, "crf": "21", "maxrate": str(plan.video_bitrate),
                "bufsize": str(plan.video_bitrate * 2),
                "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:open-gop=0"}
            sound = None
            if audio is not None:
                sound = container.add_stream("aac", rate=AUDIO_RATE)
                sound.codec_context.layout = "stereo"
                sound.codec_context.bit_rate = AUDIO_BITRATE
            time_base = Fraction(1, plan.fps)
            for k, frame in enumerate(frames):
                frame.pts, frame.time_base = k, time_base
                container.mux(video.encode(frame))
            container.mux(video.encode(None))
            if sound is not None:
                for planes, offset in _audio_chunks(Path(audio), duration, plan.audio_fade_s):
                    chunk = av.AudioFrame.from_ndarray(planes, format="fltp", layout="stereo")
                    chunk.sample_rate, chunk.pts, chunk.time_base = AUDIO_RATE, offset, Fraction(1, AUDIO_RATE)
                    container.mux(sound.encode(chunk))
                container.mux(sound.encode(None))
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)
    return probe(target)


def write_clip(frames: Sequence[Image.Image], target: Path, fps: int) -> dict:
    """A video step's clip: its frames as an H.264 MP4 at their own size and rate (through a temporary
    name), and its facts (`clip_facts`)."""
    import av

    target = Path(target)
    partial = target.with_name(f".{target.name}.partial")
    width, height = frames[0].size
    try:
        with av.open(str(partial), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = _even(width, 2), _even(height, 2), "yuv420p"
            stream.codec_context.options = {"preset": "superfast", "crf": "16"}
            for k, picture in enumerate(frames):
                frame = av.VideoFrame.from_image(picture.convert("RGB")).reformat(
                    width=stream.width, height=stream.height, format="yuv420p")
                frame.pts, frame.time_base = k, Fraction(1, fps)
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)
    return clip_facts(target)


def clip_facts(path: Path) -> dict:
    """frames, fps, duration_s, width, height of a clip; a MediaError naming the file if it is no video."""
    facts = probe(path)
    return {"frames": round(facts.duration_s * facts.fps), "fps": facts.fps, "duration_s": round(facts.duration_s, 3),
            "width": facts.width, "height": facts.height}


def clip_poster_png(path: Path) -> bytes:
    """A clip's first frame as a PNG (a video candidate's image); a MediaError naming the file if it has none."""
    import io

    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise media.MediaError(f"{path}: has no video stream")
            frame = next(container.decode(container.streams.video[0]), None)
    except (av.error.FFmpegError, OSError) as exc:
        raise media.MediaError(f"{path}: not a video FFmpeg can read ({exc})") from None
    if frame is None:
        raise media.MediaError(f"{path}: holds no frame")
    buffer = io.BytesIO()
    frame.to_image().save(buffer, format="PNG")
    return buffer.getvalue()


def cover_jpeg(still: Path, size: tuple[int, int] = VERTICAL_SIZE, focus: tuple[float, float] = (0.5, 0.5)) -> bytes:
    """A reel's cover: the still (or a clip's first frame) cropped to the video's 9:16 around its focus
    (the first frame's view)."""
    if is_clip(still):
        import io

        with Image.open(io.BytesIO(clip_poster_png(still))) as picture:
            return media.picture_jpeg(picture.convert("RGB"), size, focus, source=str(still))
    return media.export_item_jpeg(still, size, focus)


CLIP_SUFFIXES = (".mp4", ".webm", ".mov")


def is_clip(path: Path) -> bool:
    """A post item's source that is a video step's clip, not a still."""
    return Path(path).suffix.lower() in CLIP_SUFFIXES


def probe(path: Path) -> VideoFacts:
    """What the API checks of an MP4, read from the file (packets only, nothing decoded)."""
    import av

    path = Path(path)
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise media.MediaError(f"{path}: not a video FFmpeg can read ({exc})") from None
    with container:
        if not container.streams.video:
            raise media.MediaError(f"{path}: has no video stream")
        stream = container.streams.video[0]
        audio = container.streams.audio[0] if container.streams.audio else None
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        codec, width, height = stream.codec_context.name, stream.codec_context.width, stream.codec_context.height
        audio_codec = audio.codec_context.name if audio else None
        audio_rate = audio.codec_context.sample_rate if audio else None
        video_bytes, frames = 0, 0
        for packet in container.demux(stream):
            if packet.size:
                video_bytes += packet.size
                frames += 1
        duration = frames / fps if fps else (container.duration or 0) / 1_000_000
    return VideoFacts(duration_s=duration, fps=fps, width=width, height=height,
                      bitrate=int(video_bytes * 8 / duration) if duration else 0, size_bytes=path.stat().st_size,
                      video_codec=codec, audio_codec=audio_codec, audio_rate=audio_rate)
