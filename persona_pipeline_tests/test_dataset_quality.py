"""Dataset quality checks, checkpoint selection and the loss-curve PNG: pure functions, no models."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image, ImageFilter

from persona_pipeline.domain import dataset_quality as dq
from persona_pipeline.domain.checkpoint_selection import CheckpointScore, rank_checkpoints, select_best
from persona_pipeline.training.loss_curve import CHECKPOINT, SMOOTH, loss_curve_png


def checkerboard(size: int, square: int, low: int = 40, high: int = 215) -> Image.Image:
    y, x = np.indices((size, size))
    return Image.fromarray(np.where((x // square + y // square) % 2 == 0, low, high).astype(np.uint8)).convert("RGB")


def flat(value: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    return Image.new("RGB", size, (value, value, value))


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


# --- image statistics and pixel checks ----------------------------------------------------------

def test_sharp_checkerboard_passes_and_blurred_one_is_flagged():
    sharp = checkerboard(256, 8)
    stats = {"sharp.png": dq.image_stats(sharp),
             "soft.png": dq.image_stats(sharp.filter(ImageFilter.GaussianBlur(2))),
             "mush.png": dq.image_stats(sharp.filter(ImageFilter.GaussianBlur(6)))}
    assert stats["sharp.png"].laplacian_variance > 10 * stats["mush.png"].laplacian_variance
    findings = {f.file: f for f in dq.blur_findings(stats, min_variance=500)}
    assert set(findings) == {"soft.png", "mush.png"}
    assert findings["soft.png"].severity == "WARN" and findings["soft.png"].threshold == 500
    assert findings["mush.png"].severity == "ERROR" and findings["mush.png"].threshold == pytest.approx(50)
    assert findings["mush.png"].value == stats["mush.png"].laplacian_variance


def test_stats_are_computed_on_a_downscaled_copy_so_scale_does_not_change_sharpness():
    big, small = dq.image_stats(checkerboard(2048, 32)), dq.image_stats(checkerboard(512, 8))
    assert (big.width, big.height) == (2048, 2048)  # original size reported
    assert big.laplacian_variance == pytest.approx(small.laplacian_variance, rel=1e-6)


def test_flat_image_has_no_laplacian_response():
    assert dq.image_stats(flat(128)).laplacian_variance == 0.0
    assert dq.image_stats(flat(128, (2, 2))).laplacian_variance == 0.0  # too small for the kernel


def test_black_and_white_frames_are_exposure_errors_and_grey_passes():
    stats = {name: dq.image_stats(flat(v)) for name, v in (("black.png", 0), ("white.png", 255), ("grey.png", 128))}
    assert stats["black.png"].dark_fraction == 1.0 and stats["black.png"].mean_luma == 0.0
    assert stats["white.png"].bright_fraction == 1.0
    findings = dq.exposure_findings(stats)
    by_file = {}
    for f in findings:
        by_file.setdefault(f.file, []).append(f)
    assert set(by_file) == {"black.png", "white.png"}
    assert any(f.severity == "ERROR" and f.value == 1.0 and f.threshold == 0.5 for f in by_file["black.png"])
    assert any(f.severity == "WARN" and f.threshold == 30 for f in by_file["black.png"])  # mean luma
    assert any(f.severity == "ERROR" and "overexposed" in f.message for f in by_file["white.png"])


def test_partly_crushed_shadows_are_a_warning():
    pixels = np.full((100, 100), 140, dtype=np.uint8)
    pixels[:60] = 0  # 60 % black
    stats = {"dim.png": dq.image_stats(Image.fromarray(pixels))}
    findings = dq.exposure_findings(stats)
    assert [(f.severity, f.value) for f in findings] == [("WARN", pytest.approx(0.6))]
    assert dq.exposure_findings(stats, dark_limit=0.7) == []


def test_resolution_warns_below_training_size_and_errors_below_half():
    stats = {name: dq.image_stats(flat(128, size)) for name, size in
             (("ok.png", (256, 300)), ("small.png", (100, 120)), ("tiny.png", (200, 60)))}
    findings = {f.file: f for f in dq.resolution_findings(stats, training_resolution=128)}
    assert set(findings) == {"small.png", "tiny.png"}
    assert findings["small.png"].severity == "WARN" and findings["small.png"].value == 100
    assert findings["tiny.png"].severity == "ERROR" and findings["tiny.png"].threshold == 64
    assert "200x60" in findings["tiny.png"].message


# --- embedding checks ---------------------------------------------------------------------------

def test_identical_embedding_rows_are_reported_once_as_a_pair():
    rng = np.random.default_rng(0)
    embeddings = unit_rows(rng.normal(size=(6, 64)))
    embeddings[4] = embeddings[1]
    names = [f"{i}.jpg" for i in range(6)]
    findings = dq.near_duplicate_findings(names, embeddings, threshold=0.95)
    assert len(findings) == 1
    (f,) = findings
    assert f.severity == "WARN" and f.file == "4.jpg" and "1.jpg" in f.message
    assert f.value == pytest.approx(1.0)


def test_near_duplicates_reject_mismatched_shapes():
    with pytest.raises(ValueError):
        dq.near_duplicate_findings(["a", "b"], np.ones((3, 4)), 0.9)


def test_the_one_unlike_image_is_the_identity_outlier():
    rng = np.random.default_rng(1)
    persona = rng.normal(size=64)
    embeddings = unit_rows(persona + 0.3 * rng.normal(size=(12, 64)))
    embeddings[7] = unit_rows(rng.normal(size=(1, 64)))[0]  # someone else
    names = [f"{i:02d}.jpg" for i in range(12)]
    findings = dq.identity_outlier_findings(names, embeddings)
    assert [f.file for f in findings] == ["07.jpg"]
    assert findings[0].value < findings[0].threshold


def test_identity_outliers_need_enough_images_and_some_spread():
    rng = np.random.default_rng(2)
    few = unit_rows(rng.normal(size=(4, 16)))
    assert dq.identity_outlier_findings(list("abcd"), few) == []
    same = np.tile(unit_rows(rng.normal(size=(1, 16))), (8, 1))
    assert dq.identity_outlier_findings(list("abcdefgh"), same) == []


# --- captions and counts ------------------------------------------------------------------------

@pytest.mark.parametrize("caption, ok", [
    ("m1ra, smiling at the camera", True),
    ("m1ra woman on a beach", True),
    ("m1ra", True),
    ("  M1RA, upper case is the same token", True),
    ("m1ra2, a different token", False),
    ("m1rabella", False),
    ("a photo of m1ra", False),
    ("", False),
    ("   ", False),
])
def test_captions_must_start_with_the_trigger_word(caption, ok):
    findings = dq.trigger_findings({"x.txt": caption}, "m1ra")
    assert (findings == []) is ok
    if not ok:
        assert findings[0].severity == "ERROR" and findings[0].file == "x.txt"


def test_empty_caption_says_so():
    (finding,) = dq.trigger_findings({"a.txt": "m1ra, ok", "b.txt": ""}, "m1ra")
    assert finding.file == "b.txt" and "empty" in finding.message


def test_count_outside_range_is_an_error_naming_the_range():
    assert dq.count_findings(20, 10, 300) == []
    assert dq.count_findings(10, 10, 300) == [] and dq.count_findings(300, 10, 300) == []
    (low,) = dq.count_findings(3, 10, 300)
    assert low.severity == "ERROR" and low.file == "" and low.threshold == 10 and "10" in low.message
    (high,) = dq.count_findings(301, 10, 300)
    assert high.threshold == 300 and "300" in high.message
    with pytest.raises(ValueError):
        dq.count_findings(5, 10, 2)


# --- checkpoint selection -----------------------------------------------------------------------

def test_checkpoints_rank_by_weighted_normalised_scores():
    scores = [CheckpointScore(100, "a", identity=0.60, alignment=0.30),
              CheckpointScore(200, "b", identity=0.80, alignment=0.20),
              CheckpointScore(300, "c", identity=0.70, alignment=0.28)]
    ranked = rank_checkpoints(scores)
    # identity norm a=0, b=1, c=0.5; alignment norm a=1, b=0, c=0.8 -> combined 0.5, 0.5, 0.65
    assert [r.file for r in ranked] == ["c", "b", "a"]  # b beats a on the tie by higher identity
    assert [r.rank for r in ranked] == [1, 2, 3]
    assert ranked[0].combined == pytest.approx(0.65)
    assert select_best(scores, identity_weight=1.0).file == "b"
    assert select_best(scores, identity_weight=0.0).file == "a"


def test_constant_metric_normalises_to_half_and_ties_go_to_the_later_step():
    scores = [CheckpointScore(100, "early", 0.5, 0.9), CheckpointScore(400, "late", 0.5, 0.9)]
    ranked = rank_checkpoints(scores)
    assert [r.combined for r in ranked] == [0.5, 0.5]
    assert ranked[0].file == "late"
    assert rank_checkpoints(list(reversed(scores)))[0].file == "late"  # independent of input order


def test_checkpoint_selection_rejects_bad_input():
    with pytest.raises(ValueError):
        select_best([])
    with pytest.raises(ValueError):
        rank_checkpoints([CheckpointScore(1, "a", math.nan, 0.1)])
    with pytest.raises(ValueError):
        rank_checkpoints([CheckpointScore(1, "a", 0.1, 0.1)], identity_weight=1.5)


# --- loss curve ---------------------------------------------------------------------------------

def decode(png: bytes) -> Image.Image:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(png))
    image.load()
    return image.convert("RGB")


def has_colour(image: Image.Image, colour: tuple[int, int, int]) -> bool:
    return bool(np.all(np.asarray(image) == colour, axis=-1).any())


def test_loss_curve_is_a_png_of_the_requested_size_with_checkpoint_ticks():
    losses = [1.0 / (1 + 0.05 * i) + 0.05 * math.sin(i) for i in range(200)]
    with_ticks = decode(loss_curve_png(losses, checkpoints=[50, 100, 150], width=320, height=160))
    without = decode(loss_curve_png(losses, width=320, height=160))
    assert with_ticks.size == (320, 160)
    assert has_colour(with_ticks, CHECKPOINT) and not has_colour(without, CHECKPOINT)
    assert len(np.unique(np.asarray(without).reshape(-1, 3), axis=0)) > 3  # something was drawn


def test_loss_curve_skips_non_finite_values():
    image = decode(loss_curve_png([0.5, math.nan, 0.4, math.inf, 0.3, -math.inf]))
    assert image.size == (480, 200)
    assert has_colour(image, SMOOTH)  # the finite points are still drawn
    all_nan = decode(loss_curve_png([math.nan, math.nan]))
    assert all_nan.size == (480, 200) and not has_colour(all_nan, SMOOTH)
    assert all_nan.tobytes() != decode(loss_curve_png([])).tobytes()  # says why there is no curve


def test_empty_loss_curve_says_no_steps():
    image = decode(loss_curve_png([], width=200, height=100))
    assert image.size == (200, 100)
    pixels = np.asarray(image)
    assert (pixels < 128).any()  # the text is drawn
    with pytest.raises(ValueError):
        loss_curve_png([1.0], width=10, height=10)
