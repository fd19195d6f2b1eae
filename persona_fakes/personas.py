"""Persona folders for tests and benchmarks, cut from the demo persona in datasets/demo."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml

DEMO = Path(__file__).resolve().parents[1] / "datasets" / "demo"


def write_persona(datasets: Path, slug: str = "tester", photos: int = 12, **overrides) -> Path:
    """A persona folder with the first `photos` demo photos (and their sidecars) and a small config."""
    folder = datasets / slug
    (folder / "photos").mkdir(parents=True, exist_ok=True)
    for path in sorted((DEMO / "photos").glob("*.jpg"))[:photos]:
        shutil.copy(path, folder / "photos" / path.name)
        sidecar = path.with_suffix(".txt")
        if sidecar.exists():  # the demo's sidecars start with the demo's trigger word and class word
            (folder / "photos" / sidecar.name).write_text(re.sub(r"^m1ra(?: woman)?, ", "", sidecar.read_text()))
    config = {
        "name": "Test Persona", "trigger_word": "t3st", "class_word": "woman", "timezone": "Europe/Lisbon",
        "posting_windows": ["00:00-24:00"], "min_minutes_between_posts": 60,
        "pillars": [{"name": "city", "weight": 60, "priority": 1, "guidelines": "City days."},
                    {"name": "beach", "weight": 40, "priority": 2, "guidelines": "Beach days."}],
        "hashtags": {"targets": ["one", "two", "three"], "max_per_post": 2},
        # two checkpoints, one validation render each: selection runs for real, at a test's cost
        "training": {"min_photos": 10, "steps": 4, "checkpoint_every": 2,
                     "validation_prompts": ["photo of {trigger} {class_word}"], "validation_seeds": [7]},
        "generation": {"prompts_per_plan": 2},
    }
    config.update(overrides)
    (folder / "persona.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder
