"""The format rules (domain/post_formats.py) and persona.yaml `formats:`: pure, no database."""

from __future__ import annotations

from collections import Counter

import pytest

from persona_pipeline.domain import post_formats as pf
from persona_pipeline.personas import PersonaFileError, load_persona
from persona_pipeline_tests.conftest import write_persona


def items(n, size=(1080, 1350)):
    return [(f"item {i}", *size) for i in range(1, n + 1)]


def test_a_carousel_has_two_to_ten_items_of_one_aspect():
    assert pf.CAROUSEL_MAX_ITEMS == 10
    assert pf.carousel_problems("post 7", items(2)) == []
    assert pf.carousel_problems("post 7", items(10)) == []
    (one,) = pf.carousel_problems("post 7", items(1))
    assert "post 7" in one and "items has 1" in one and "2 to 10" in one
    (eleven,) = pf.carousel_problems("post 7", items(11))
    assert "items has 11" in eleven
    mixed = items(3)
    mixed[2] = ("item 3 (candidate 44)", 1080, 1080)
    (problem,) = pf.carousel_problems("post 7", mixed)
    assert "post 7: item 3 (candidate 44): aspect 1080x1080 = 1.000 differs from item 1's 1080x1350 = 0.800" in problem
    with pytest.raises(pf.FormatError, match="outside the feed's 4:5..1.91:1"):
        pf.check_carousel("post 8", [("item 1", 1080, 1920), ("item 2", 1080, 1920)])


def test_stories_and_reels_are_nine_by_sixteen():
    assert pf.is_vertical(1080, 1920) and pf.is_vertical(720, 1280) and pf.is_vertical(1081, 1920)
    assert not pf.is_vertical(1080, 1350)
    with pytest.raises(pf.FormatError, match=r"post 3 story: aspect 1080x1350 = 0.800 is not 9:16"):
        pf.check_vertical("post 3 story", 1080, 1350)


def facts(**overrides):
    values = dict(duration_s=15.0, fps=30.0, width=1080, height=1920, bitrate=6_000_000, size_bytes=12_000_000,
                  video_codec="h264", audio_codec="aac", audio_rate=48000)
    values.update(overrides)
    return pf.VideoFacts(**values)


def test_video_limits_name_the_field_and_value():
    assert pf.video_problems("post 1", "reel", facts()) == []
    assert pf.REEL_LIMITS.min_s == 3 and pf.REEL_LIMITS.max_s == 900 and pf.STORY_VIDEO_LIMITS.max_s == 60
    (short,) = pf.video_problems("post 1 video x.mp4", "reel", facts(duration_s=2.5))
    assert short == "post 1 video x.mp4: duration 2.50 s is outside the reel's 3..900 s"
    assert "duration 901.00 s" in pf.video_problems("p", "reel", facts(duration_s=901))[0]
    assert "outside the story's 3..60 s" in pf.video_problems("p", "story", facts(duration_s=61))[0]
    big = pf.video_problems("p", "reel", facts(size_bytes=301 * 1024 * 1024))
    assert big and "file size 315621376 bytes is over the reel's" in big[0]
    assert "frame rate 20 fps" in pf.video_problems("p", "reel", facts(fps=20))[0]
    assert "bitrate 30000000" in pf.video_problems("p", "reel", facts(bitrate=30_000_000))[0]
    assert "audio codec 'mp3'" in pf.video_problems("p", "reel", facts(audio_codec="mp3"))[0]
    assert "not 9:16" in pf.video_problems("p", "reel", facts(width=1080, height=1080))[0]


def test_crop_box_keeps_the_focus_inside_and_the_target_aspect():
    assert pf.crop_box(1000, 1000, (4, 5)) == (100, 0, 900, 1000)
    assert pf.crop_box(1000, 1000, (4, 5), (0.0, 0.5)) == (0, 0, 800, 1000)  # pushed to the edge, not past it
    assert pf.crop_box(1000, 2000, (1, 1), (0.5, 0.25)) == (0, 0, 1000, 1000)
    left, top, right, bottom = pf.crop_box(1920, 1080, (9, 16), (0.7, 0.5))
    assert (right - left) * 16 == pytest.approx((bottom - top) * 9, abs=16) and left > 0
    with pytest.raises(pf.FormatError, match="fractions"):
        pf.crop_box(100, 100, (1, 1), (1.5, 0.5))


def test_format_mix_is_honoured_like_pillar_weights():
    mix = {"feed": 50, "carousel": 30, "reel": 20}
    history: list[str] = []
    for _ in range(100):
        history.append(pf.format_order(mix, history)[0])
    assert Counter(history) == {"feed": 50, "carousel": 30, "reel": 20}
    # after a run of feed posts the others come first, the furthest below its share leading
    assert pf.format_order(mix, ["feed"] * 4) == ["carousel", "reel", "feed"]
    assert "story" not in pf.format_order({"feed": 1, "story": 0}, [])
    with pytest.raises(pf.FormatError, match="format 'gif' is not one of"):
        pf.check_mix({"gif": 10}, "formats.mix")
    with pytest.raises(pf.FormatError, match="sum to 0"):
        pf.check_mix({"feed": 0}, "formats.mix")


def test_persona_yaml_formats_are_validated_with_the_file_and_field_named(tmp_path):
    folder = write_persona(tmp_path, "fmt", photos=0, formats={"mix": {"feed": 50, "carousel": 30, "reel": 20},
                                                               "carousel": {"items": 4, "aspect": "1:1"}})
    config = load_persona(folder).config.formats
    assert config.mix == {"feed": 50, "carousel": 30, "reel": 20} and config.carousel.items == 4
    assert load_persona(write_persona(tmp_path, "plain", photos=0)).config.formats.mix == {"feed": 100}
    for bad, message in (({"mix": {"tiktok": 5}}, "formats.mix"), ({"carousel": {"items": 11}}, "formats.carousel.items"),
                         ({"carousel": {"aspect": "9:16"}}, "formats.carousel.aspect"),
                         ({"reel": {"fps": 20}}, "formats.reel.fps")):
        with pytest.raises(PersonaFileError, match=message):
            load_persona(write_persona(tmp_path, "bad", photos=0, formats=bad))
