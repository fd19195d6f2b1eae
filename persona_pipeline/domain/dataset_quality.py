"""Quality checks for a LoRA training set: pure functions over pixel statistics, CLIP embeddings,
captions and counts. Each check returns a list of `Finding`s naming the file, the measured value
and the threshold, so an asset check can report exactly which photos are the problem.

Default thresholds, chosen for real photos of a person (phone or camera, 0.3-24 MP):

* Sharpness (`DEFAULT_MIN_LAPLACIAN_VARIANCE` = 100): variance of the 3x3 Laplacian of the
  grayscale image, *after* downscaling so the long side is at most 512 px. Downscaling makes the
  number comparable across resolutions (a 24 MP photo and its 1 MP copy score alike) and keeps
  the check fast. In-focus portraits at that size score several hundred to a few thousand;
  motion-blurred or missed-focus shots fall below ~100. Strong background bokeh can pull an
  in-focus portrait down, hence WARN; below a tenth of the limit (no detail at all) is an ERROR.
* Exposure: more than half the pixels crushed to <= 5 or blown to >= 250, or a mean luma outside
  [30, 225], is a WARN; 95 % or more clipped (a nearly blank frame) is an ERROR.
* Resolution: a short side below the training resolution is a WARN (the trainer upsamples); below
  half of it is an ERROR (upsampled 2x or more, the LoRA learns the blur).
* Near duplicates (`DEFAULT_DUPLICATE_COSINE` = 0.95): CLIP image-embedding cosine above 0.95 is
  the same shot or a burst neighbour; duplicates over-weight one pose and lighting.
* Identity outliers: cosine of each image to the centroid of all the others, robust z-score
  (median/MAD) below -3 is a WARN. Needs a real CLIP/face model: on randomly initialised CLIP
  weights (the tests' and the quickstart's tiny model) the embeddings carry no identity and the
  findings are noise.
* Count (`DEFAULT_MIN_IMAGES`..`DEFAULT_MAX_IMAGES` = 10..300): fewer than 10 images rarely gives
  a usable identity LoRA; more than 300 for one person usually means an unfiltered dump.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import numpy as np
from PIL import Image

Severity = Literal["WARN", "ERROR"]

STATS_MAX_SIDE = 512
DARK_LEVEL, BRIGHT_LEVEL = 5, 250
DEFAULT_MIN_LAPLACIAN_VARIANCE = 100.0
BLUR_ERROR_FRACTION = 0.1
ERROR_CLIPPED_FRACTION = 0.95
DEFAULT_DUPLICATE_COSINE = 0.95
DEFAULT_MIN_IMAGES, DEFAULT_MAX_IMAGES = 10, 300
# 0.6745 = the standard normal's 75th percentile: MAD / 0.6745 estimates the standard deviation.
_MAD_TO_SIGMA = 0.6745


@dataclass(frozen=True)
class Finding:
    check: str
    severity: Severity
    file: str
    value: float | None
    threshold: float | None
    message: str


@dataclass(frozen=True)
class ImageStats:
    """Width and height of the original image; the pixel statistics come from its grayscale copy
    downscaled to a long side of at most `STATS_MAX_SIDE` (see the module docstring)."""

    width: int
    height: int
    laplacian_variance: float
    mean_luma: float
    dark_fraction: float
    bright_fraction: float

    @property
    def short_side(self) -> int:
        return min(self.width, self.height)


def image_stats(image: Image.Image) -> ImageStats:
    """Sharpness and exposure statistics of one image (any PIL mode)."""
    width, height = image.size
    gray = image.convert("L")
    scale = STATS_MAX_SIDE / max(width, height)
    if scale < 1:
        # BOX = area average: a plain, deterministic downscale that adds no ringing of its own.
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        gray = gray.resize(size, Image.Resampling.BOX)
    pixels = np.asarray(gray, dtype=np.float64)
    return ImageStats(
        width=width,
        height=height,
        laplacian_variance=_laplacian_variance(pixels),
        mean_luma=float(pixels.mean()),
        dark_fraction=float(np.mean(pixels <= DARK_LEVEL)),
        bright_fraction=float(np.mean(pixels >= BRIGHT_LEVEL)),
    )


def _laplacian_variance(pixels: np.ndarray) -> float:
    """Variance of the [[0,1,0],[1,-4,1],[0,1,0]] response over the interior ("valid") pixels."""
    if pixels.shape[0] < 3 or pixels.shape[1] < 3:
        return 0.0
    centre = pixels[1:-1, 1:-1]
    response = pixels[:-2, 1:-1] + pixels[2:, 1:-1] + pixels[1:-1, :-2] + pixels[1:-1, 2:] - 4.0 * centre
    return float(response.var())


def blur_findings(stats: Mapping[str, ImageStats], min_variance: float = DEFAULT_MIN_LAPLACIAN_VARIANCE) -> list[Finding]:
    """WARN below `min_variance`; ERROR below a tenth of it (no usable detail)."""
    findings = []
    error_variance = min_variance * BLUR_ERROR_FRACTION
    for name, s in stats.items():
        if s.laplacian_variance < error_variance:
            findings.append(Finding("blur", "ERROR", name, s.laplacian_variance, error_variance,
                                    f"{name}: no detail (Laplacian variance {s.laplacian_variance:.1f} "
                                    f"< {error_variance:g})"))
        elif s.laplacian_variance < min_variance:
            findings.append(Finding("blur", "WARN", name, s.laplacian_variance, min_variance,
                                    f"{name}: blurry (Laplacian variance {s.laplacian_variance:.1f} < {min_variance:g})"))
    return findings


def exposure_findings(
    stats: Mapping[str, ImageStats],
    dark_limit: float = 0.5,
    bright_limit: float = 0.5,
    mean_range: tuple[float, float] = (30, 225),
) -> list[Finding]:
    """One finding per problem per file: crushed shadows, blown highlights, mean luma out of range."""
    findings = []
    low, high = mean_range
    for name, s in stats.items():
        for fraction, limit, what in ((s.dark_fraction, dark_limit, f"pixels <= {DARK_LEVEL} (underexposed)"),
                                      (s.bright_fraction, bright_limit, f"pixels >= {BRIGHT_LEVEL} (overexposed)")):
            if fraction > limit:
                severity: Severity = "ERROR" if fraction >= ERROR_CLIPPED_FRACTION else "WARN"
                findings.append(Finding("exposure", severity, name, fraction, limit,
                                        f"{name}: {fraction:.0%} of {what}, limit {limit:.0%}"))
        if not low <= s.mean_luma <= high:
            bound = low if s.mean_luma < low else high
            findings.append(Finding("exposure", "WARN", name, s.mean_luma, bound,
                                    f"{name}: mean luma {s.mean_luma:.1f} outside [{low:g}, {high:g}]"))
    return findings


def resolution_findings(stats: Mapping[str, ImageStats], training_resolution: int) -> list[Finding]:
    """Short side below the training resolution: WARN; below half of it: ERROR."""
    findings = []
    half = training_resolution / 2
    for name, s in stats.items():
        size = f"{s.width}x{s.height}"
        if s.short_side < half:
            findings.append(Finding("resolution", "ERROR", name, float(s.short_side), half,
                                    f"{name}: {size}, short side {s.short_side} < half the training "
                                    f"resolution ({half:g})"))
        elif s.short_side < training_resolution:
            findings.append(Finding("resolution", "WARN", name, float(s.short_side), float(training_resolution),
                                    f"{name}: {size}, short side {s.short_side} < training resolution "
                                    f"{training_resolution}"))
    return findings


def _check_embeddings(names: Sequence[str], embeddings: np.ndarray) -> np.ndarray:
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(names):
        raise ValueError(f"embeddings must be ({len(names)}, dim), got shape {embeddings.shape}")
    return embeddings


def near_duplicate_findings(
    names: Sequence[str], embeddings: np.ndarray, threshold: float = DEFAULT_DUPLICATE_COSINE,
) -> list[Finding]:
    """One WARN per pair whose cosine (rows are L2-normalised) is above `threshold`; the finding's
    file is the later name of the pair, so dropping the named files keeps one of each group."""
    embeddings = _check_embeddings(names, embeddings)
    similarity = embeddings @ embeddings.T
    findings = []
    for i, j in zip(*np.triu_indices(len(names), k=1)):
        cosine = float(similarity[i, j])
        if cosine > threshold:
            findings.append(Finding("near_duplicate", "WARN", names[j], cosine, threshold,
                                    f"{names[i]} and {names[j]} are near duplicates (cosine {cosine:.3f} > {threshold:g})"))
    return findings


def identity_outlier_findings(
    names: Sequence[str], embeddings: np.ndarray, z_threshold: float = 3.0, min_images: int = 5,
) -> list[Finding]:
    """WARN for images unlike the rest of the set.

    Each image's cosine to the normalised centroid of all the *other* images (leave-one-out, so an
    outlier does not pull the centroid towards itself), then a robust z-score against the median
    and MAD of those cosines; z < -z_threshold is an outlier. Fewer than `min_images` images: no
    findings (the statistics mean nothing). On random CLIP weights this is noise.
    """
    embeddings = _check_embeddings(names, embeddings)
    n = len(names)
    if n < max(min_images, 3):
        return []
    others = embeddings.sum(axis=0, keepdims=True) - embeddings
    others /= np.maximum(np.linalg.norm(others, axis=1, keepdims=True), 1e-12)
    cosines = np.einsum("ij,ij->i", embeddings, others)
    median = float(np.median(cosines))
    deviations = np.abs(cosines - median)
    mad = float(np.median(deviations))
    if mad > 0:
        sigma = mad / _MAD_TO_SIGMA
    else:
        # More than half the cosines are identical: fall back to the mean absolute deviation
        # (x 1.2533 estimates sigma for a normal), else nothing can be called an outlier.
        sigma = float(deviations.mean()) * math.sqrt(math.pi / 2)
        if sigma == 0:
            return []
    cutoff = median - z_threshold * sigma
    findings = []
    for name, cosine in zip(names, cosines):
        z = (cosine - median) / sigma
        if z < -z_threshold:
            findings.append(Finding("identity_outlier", "WARN", name, float(cosine), cutoff,
                                    f"{name}: unlike the rest of the set (cosine to the others' centroid "
                                    f"{cosine:.3f}, median {median:.3f}, robust z {z:.1f} < -{z_threshold:g})"))
    return findings


def faceless_findings(names: Sequence[str], found: Sequence[bool], method: str) -> list[Finding]:
    """WARN for each photo a configured face model found no face in: it cannot teach the face."""
    return [Finding("identity_outlier", "WARN", name, None, None, f"{name}: no face found by the face model {method}")
            for name, ok in zip(names, found) if not ok]


def trigger_findings(captions: Mapping[str, str], trigger_word: str) -> list[Finding]:
    """ERROR for each caption that does not start with the trigger word as a whole word.

    Leading whitespace is ignored (the trainer strips captions) and so is case (the CLIP tokenizer
    lowercases), so "M1RA, smiling" passes; "m1ra2 smiling" and "a photo of m1ra" do not.
    """
    trigger = trigger_word.strip()
    if not trigger:
        raise ValueError("trigger_word is empty")
    pattern = re.compile(re.escape(trigger) + r"(?!\w)", re.IGNORECASE)
    findings = []
    for name, caption in captions.items():
        text = caption.strip()
        if not text:
            findings.append(Finding("trigger_word", "ERROR", name, None, None, f"{name}: caption is empty"))
        elif not pattern.match(text):
            findings.append(Finding("trigger_word", "ERROR", name, None, None,
                                    f"{name}: caption does not start with the trigger word {trigger!r}: {text[:60]!r}"))
    return findings


def count_findings(n: int, minimum: int = DEFAULT_MIN_IMAGES, maximum: int = DEFAULT_MAX_IMAGES) -> list[Finding]:
    """ERROR when the number of training images is outside [minimum, maximum]."""
    if minimum > maximum:
        raise ValueError(f"minimum {minimum} > maximum {maximum}")
    if minimum <= n <= maximum:
        return []
    bound = minimum if n < minimum else maximum
    return [Finding("image_count", "ERROR", "", float(n), float(bound),
                    f"{n} training images, expected between {minimum} and {maximum}")]
