"""Out-of-range parameters are refused before any model loads, naming the field and the bound;
and the committed demo photos are exactly what the script draws."""

import re

import numpy as np
import pytest
from PIL import Image

from persona_pipeline.demo_photos import make_demo_photos
from persona_pipeline.resources.diffusion import DiffusionBackend, GenerationParamError, check_generation_params
from persona_pipeline.training.lora import TrainingConfigError
from persona_pipeline_tests.conftest import DEMO

GOOD = dict(steps=20, cfg=7.0, sampler="euler", scheduler="normal", width=512, height=512)


@pytest.mark.parametrize("change, message", [
    ({"width": 500}, "width = 500 must be a multiple of 8 (from 256 to 2048)"),
    ({"height": 4096}, "height = 4096 is out of range: allowed 256 to 2048"),
    ({"steps": 0}, "steps = 0 is out of range: allowed 1 to 150"),
    ({"steps": 151}, "steps = 151 is out of range: allowed 1 to 150"),
    ({"cfg": 31}, "cfg = 31 is out of range"),
    ({"sampler": "euler_a"}, "sampler = 'euler_a' is not a name ComfyUI knows (did you mean euler_ancestral?)"),
    ({"scheduler": "fancy"}, "scheduler = 'fancy' is not a name ComfyUI knows"),
    ({"sampler": "dpm_fast"}, "sampler='dpm_fast' has no diffusers equivalent"),
    ({"denoise": 0}, "denoise = 0 would return the parent unchanged"),
])
def test_generation_parameters_are_checked(change, message):
    check_generation_params(**GOOD)
    with pytest.raises(GenerationParamError, match=re.escape(message)):
        check_generation_params(**{**GOOD, **change})


@pytest.mark.parametrize("override, message", [
    ({"rank": 0}, r"training.rank=0 is out of range \[1, 256\]"),
    ({"learning_rate": 0.5}, r"training.learning_rate=0.5 is out of range"),
    ({"resolution": 100}, "training.resolution=100 must be a multiple of 8"),
])
def test_training_overrides_are_checked_before_loading(tmp_path, override, message):
    backend = DiffusionBackend(models_dir=str(tmp_path))
    assert backend.training_params({"rank": None, "steps": 7}).steps == 7  # None keeps the default
    with pytest.raises(TrainingConfigError, match=message):
        backend.training_params(override)
    assert not any(tmp_path.iterdir())  # nothing was built or loaded


def test_committed_demo_photos_are_what_the_script_draws(tmp_path):
    written = make_demo_photos(tmp_path)
    committed = sorted(p.name for p in (DEMO / "photos").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == committed
    for path in written:
        with Image.open(path) as fresh, Image.open(DEMO / "photos" / path.name) as shipped:
            # JPEG encoders may differ by a level or two between Pillow builds; the drawing may not.
            difference = np.abs(np.asarray(fresh, dtype=np.int16) - np.asarray(shipped, dtype=np.int16))
            assert difference.mean() < 1.0, path.name
    for caption in tmp_path.glob("*.txt"):
        assert caption.read_text() == (DEMO / "photos" / caption.name).read_text()
