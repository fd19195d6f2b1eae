"""Aspect-ratio buckets: train on each photo at about the preset's pixel count but near its own shape,
instead of a centre square that cuts off a full-body shot's head and feet (kohya's bucketing, the
simple way: fixed sizes, each photo to the nearest in aspect ratio, a batch from one bucket).
No torch here."""

from __future__ import annotations

import math


def bucket_step(resolution: int) -> int:
    """The side granularity: 64 px as kohya buckets; 16 (FLUX's smallest: 8x VAE, 2x2 packing) below 256 px."""
    return 64 if resolution >= 256 else 16


def bucket_sizes(resolution: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of `bucket_step`, of at most resolution² pixels (the largest
    height for each width) and an aspect ratio within 1:max_ratio .. max_ratio:1, square included."""
    step, area = bucket_step(resolution), resolution * resolution
    sizes = {(resolution, resolution)}
    for width in range(step, int(resolution * max_ratio) + 1, step):
        height = area // width // step * step
        if height >= step and 1 / max_ratio <= width / height <= max_ratio:
            sizes.add((width, height))
    return sorted(sizes)


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket closest to the photo's aspect ratio (on a log scale, so 1:2 and 2:1 are equally far
    from square); the larger one on a tie."""
    ratio = math.log(width / height)
    return min(sizes, key=lambda size: (abs(math.log(size[0] / size[1]) - ratio), -size[0] * size[1]))
