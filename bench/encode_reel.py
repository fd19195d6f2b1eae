"""Reel encoding speed: a 15 s 1080x1920 reel from 5 stills at 30 fps (pan and zoom on each still,
0.5 s crossfades, H.264 in MP4), ours against the same encode by the `ffmpeg` command line.

    python bench/encode_reel.py [--quick] [--pairs N] [--keep DIR]

Set-up: 5 stills of 1024x1536 (smooth shapes and fine grain, like generated photos), written once.

1. Reference: Debian's `ffmpeg` CLI, as a user would script it: each still scaled and cropped to
   9:16, `zoompan` (zoom 1 -> 1.12 over its 3.4 s), `xfade` (fade, 0.5 s) between them, libx264
   with the same settings as ours (preset superfast, CRF 21, maxrate 6 Mb/s, a closed 2 s GOP,
   yuv420p, +faststart). Without an `ffmpeg` on PATH the bench says so and reports ours alone.
2. Ours: `persona_pipeline.video.encode_reel` through PyAV (FFmpeg's libraries in its wheel).

Each side runs in its own child process, so its peak RSS is its own (os.wait4's ru_maxrss) and
neither warms the other's caches; the sides alternate within each pair and the medians of the
pairs are reported (the machine has 2 cores and other work may be running). Both outputs are
probed: 15 s, 30 fps, 1080x1920, H.264.

Targets: ours <= 15 s (1x real time) and peak RSS <= 500 MB. --quick: one pair.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _report import emit, record  # noqa: E402

STILLS, SECONDS, FPS, CROSSFADE, ZOOM, BITRATE = 5, 3.0, 30, 0.5, 1.12, 6_000_000
TARGET_S, TARGET_RSS_MB = 15.0, 500.0
PRESET = "superfast"  # ReelPlan's default: both sides encode with the same x264 settings


def make_stills(folder: Path) -> list[Path]:
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(27)
    paths = []
    for i in range(STILLS):
        image = Image.new("RGB", (1024, 1536), tuple(int(v) for v in rng.integers(40, 200, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(40):
            x, y, r = int(rng.integers(0, 1024)), int(rng.integers(0, 1536)), int(rng.integers(30, 260))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        image = image.filter(ImageFilter.GaussianBlur(4))
        grain = rng.integers(-10, 11, (1536, 1024, 3))
        pixels = np.clip(np.asarray(image).astype(np.int16) + grain, 0, 255).astype(np.uint8)
        path = folder / f"still-{i}.jpg"
        Image.fromarray(pixels).save(path, quality=92)
        paths.append(path)
    return paths


def ffmpeg_command(stills: list[Path], out: Path) -> list[str]:
    """The same reel by the ffmpeg CLI: zoompan per still, xfade between them, the same x264 settings."""
    segment = SECONDS + CROSSFADE * (STILLS - 1) / STILLS  # 3.4 s: 5 x 3.4 - 4 x 0.5 = 15 s
    frames = round(segment * FPS)
    width, height = 1080, 1920
    big_w, big_h = round(width * ZOOM), round(height * ZOOM)
    command = ["ffmpeg", "-v", "error", "-y"]
    for path in stills:
        command += ["-i", str(path)]
    parts = []
    for i in range(STILLS):
        grow = f"1+{ZOOM - 1}*on/{frames}" if i % 2 == 0 else f"{ZOOM}-{ZOOM - 1}*on/{frames}"
        parts.append(f"[{i}:v]scale={big_w}:{big_h}:force_original_aspect_ratio=increase,crop={big_w}:{big_h},"
                     f"zoompan=z='{grow}':d={frames}:x='iw/2-(iw/zoom/2)':y='ih/2-(ih/zoom/2)':"
                     f"s={width}x{height}:fps={FPS},setsar=1,format=yuv420p[v{i}]")
    last = "v0"
    for i in range(1, STILLS):
        offset = i * (segment - CROSSFADE)
        parts.append(f"[{last}][v{i}]xfade=transition=fade:duration={CROSSFADE}:offset={offset:.3f}[x{i}]")
        last = f"x{i}"
    gop = FPS * 2
    command += ["-filter_complex", ";".join(parts), "-map", f"[{last}]", "-c:v", "libx264", "-preset", PRESET,
                "-crf", "21", "-maxrate", str(BITRATE), "-bufsize", str(BITRATE * 2), "-g", str(gop),
                "-keyint_min", str(gop), "-sc_threshold", "0", "-pix_fmt", "yuv420p", "-r", str(FPS),
                "-movflags", "+faststart", str(out)]
    return command


OURS = """
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from persona_pipeline.video import ReelPlan, encode_reel
plan = ReelPlan(seconds_per_still={seconds}, crossfade_s={crossfade}, fps={fps}, zoom={zoom}, video_bitrate={bitrate})
start = time.perf_counter()
encode_reel([Path(p) for p in {stills!r}], Path({out!r}), plan)
print("ENCODE_S", time.perf_counter() - start)
"""


def measured(command: list[str]) -> tuple[float, float, float]:
    """Wall time, CPU time (user + system, all threads) and peak RSS (MB) of a child, read from wait4."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: become the command
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.execvp(command[0], command)
    _pid, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{command[0]} exited {os.waitstatus_to_exitcode(status)}: {' '.join(command)[:300]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one pair")
    parser.add_argument("--pairs", type=int, default=None, help="paired runs (default 3; --quick 1)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the stills and outputs in this folder")
    args = parser.parse_args()
    pairs = args.pairs or (1 if args.quick else 3)

    from persona_pipeline.video import probe

    folder = Path(tempfile.mkdtemp(prefix="encode-reel-")) if args.keep is None else args.keep
    folder.mkdir(parents=True, exist_ok=True)
    try:
        stills = make_stills(folder)
        ffmpeg = shutil.which("ffmpeg")
        if not ffmpeg:
            print("no `ffmpeg` on PATH (Debian: apt-get install ffmpeg): the reference side is not run")
        ours_out, ref_out = folder / "ours.mp4", folder / "ffmpeg.mp4"
        ours_cmd = [sys.executable, "-c", OURS.format(repo=str(REPO), seconds=SECONDS, crossfade=CROSSFADE, fps=FPS,
                                                       zoom=ZOOM, bitrate=BITRATE, stills=[str(p) for p in stills],
                                                       out=str(ours_out))]
        ours_t, ours_rss, ref_t, ref_rss, ours_cpu, ref_cpu = [], [], [], [], [], []
        for pair in range(pairs):
            sides = [("ours", ours_cmd), ("ffmpeg", ffmpeg_command(stills, ref_out))] if ffmpeg else [("ours", ours_cmd)]
            if pair % 2:
                sides.reverse()
            for side, command in sides:
                wall, cpu, rss = measured(command)
                (ours_t if side == "ours" else ref_t).append(wall)
                (ours_cpu if side == "ours" else ref_cpu).append(cpu)
                (ours_rss if side == "ours" else ref_rss).append(rss)
                print(f"pair {pair + 1} {side:6s}: {wall:6.2f} s wall, {cpu:6.2f} s CPU, peak RSS {rss:6.1f} MB, "
                      f"load average {os.getloadavg()[0]:.1f}", flush=True)
        for name, path in (("ours", ours_out), ("ffmpeg", ref_out)):
            if path.exists():
                facts = probe(path)
                print(f"{name:6s}: {facts.duration_s:.2f} s, {facts.fps:g} fps, {facts.width}x{facts.height}, "
                      f"{facts.video_codec}, {facts.bitrate / 1e6:.2f} Mb/s, {facts.size_bytes / 1e6:.1f} MB")
                assert abs(facts.duration_s - 15.0) < 0.1 and (facts.width, facts.height) == (1080, 1920), facts
        ours_s, ours_mb = statistics.median(ours_t), max(ours_rss)
        ref_s = statistics.median(ref_t) if ref_t else None
        ok_time, ok_rss = ours_s <= TARGET_S, ours_mb <= TARGET_RSS_MB
        cpus = os.cpu_count()
        print(f"\nRESULT time: ours {ours_s:.2f} s (median of {pairs}) vs ffmpeg CLI "
              + (f"{ref_s:.2f} s: ratio {ref_s / ours_s:.2f}x" if ref_s else "not run")
              + f"; target <= {TARGET_S:g} s: {'PASS' if ok_time else 'FAIL'} ({cpus} CPUs)")
        print(f"RESULT CPU: ours {statistics.median(ours_cpu):.2f} s"
              + (f" vs ffmpeg CLI {statistics.median(ref_cpu):.2f} s" if ref_cpu else "")
              + " (user + system, all threads: what a quiet machine's 2 cores would share)")
        print(f"RESULT memory: ours peak RSS {ours_mb:.0f} MB"
              + (f" vs ffmpeg CLI {max(ref_rss):.0f} MB" if ref_rss else "")
              + f"; target <= {TARGET_RSS_MB:g} MB: {'PASS' if ok_rss else 'FAIL'}")
        note = f"median of {pairs} paired runs, {cpus} CPUs" + ("" if ffmpeg else "; no ffmpeg CLI installed")
        record("15 s 1080x1920 reel from 5 stills at 30 fps: ffmpeg CLI vs encode_reel (PyAV)", reference=ref_s,
               ours=ours_s, unit="s", better="lower", target=f"<= {TARGET_S:g} s", ok=ok_time, note=note)
        record("peak RSS of the encode: ffmpeg CLI vs encode_reel", reference=max(ref_rss) if ref_rss else None,
               ours=ours_mb, unit="MB", better="lower", target=f"<= {TARGET_RSS_MB:g} MB", ok=ok_rss, note=note)
        record("CPU time of the encode (user + system): ffmpeg CLI vs encode_reel",
               reference=statistics.median(ref_cpu) if ref_cpu else None, ours=statistics.median(ours_cpu),
               unit="s", better="lower", note=note)
        emit()
        return 0 if ok_time and ok_rss else 1
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
