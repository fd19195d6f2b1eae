"""Where the attribute classifier's weights live and how they are rebuilt: constants without torch,
so the CLI can offer its defaults without importing it."""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE, MANIFEST_FILE = "classifier.safetensors", "classifier.json"
REBUILD_COMMAND = "persona-pipeline world train-classifier"
INPUT_SIZE = 64
TRAINING_DEFAULTS = dict(seed=0, steps=2500, batch_size=64, train_count=24000, heldout_count=2000, learning_rate=3e-3)
