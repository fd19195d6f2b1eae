"""Does a retrain made from accepted dataset candidates measurably move identity on the world
models? (Not a benchmark: bench/run_all skips files starting with "_".) Three LoRA versions of one
persona through the real chain (source_photos, accepted candidates, training_dataset, lora_model
with its evaluation and promotion gate): 6 demo photos; + 3 more of her photos accepted as
candidates; + N images of another world character (black long hair, blue jacket, no scarf)
accepted too. Prints each version's gate outcome and the identity/alignment table. Used to decide
how persona_pipeline_tests/test_dataset_promotion.py can meet both outcomes of the gate
(docs/dataset.md#the-promotion-gate-on-a-retrain-from-candidates).

    PYTHONPATH=. .venv/bin/python bench/_candidate_regression_probe.py STEPS LEARNING_RATE SEED N_OTHER
"""

import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from sqlalchemy import select

from persona_fakes.databases import make_database
from persona_pipeline.assets.lora_model import lora_model
from persona_pipeline.assets.source_photos import source_photos
from persona_pipeline.assets.training_dataset import training_dataset
from persona_pipeline.db import dataset_candidates, models
from persona_pipeline.db.session import session_scope
from persona_pipeline.fileio import sha256_file
from persona_pipeline.world.attributes import Character
from persona_pipeline.world.quality import write_persona_dataset
from persona_pipeline_tests.conftest import DEMO, make_settings, materialise_persona, write_persona


def main(steps: int, lr: float, seed: int, n_other: int) -> None:
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="candidate-probe-"))
    url, cleanup = make_database("sqlite", tmp)
    settings = make_settings(tmp, url, promote_alignment_tolerance=2.0)
    folder = write_persona(settings.datasets_dir, photos=6, flywheel={"max_generated_share": 0.85},
                           training={"min_photos": 2, "captioner": "template", "steps": steps, "checkpoint_every": steps,
                                     "learning_rate": lr, "seed": seed,
                                     "validation_prompts": ["photo of {trigger} {class_word}"], "validation_seeds": [7]},
                           evaluation={"prompts": ["photo of {trigger} {class_word}, portrait",
                                                   "photo of {trigger} {class_word} in a park"], "seeds": [1, 2]})
    persona_dir = settings.home / "personas" / folder.name

    def version(label: str, assets) -> None:
        start = time.time()
        result, _ = materialise_persona(assets, settings, folder)
        meta = result.asset_materializations_for_node("lora_model")[0].metadata
        rows = [(r.data["version"], r.data["identity_mean"], r.data["alignment"]) for r in meta["evaluation"].value.records]
        print(f"{label}: {meta['promotion'].value} ({meta['promotion_reason'].value}); {rows}; {time.time() - start:.0f} s",
              flush=True)

    def accept(kind: str, paths) -> None:
        with session_scope(url) as session:
            persona_id = session.scalar(select(models.Persona.id))
            for i, source in enumerate(paths):
                relative = f"dataset_candidates/winner/{kind}-{i}{source.suffix}"
                (persona_dir / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(source, persona_dir / relative)
                row = dataset_candidates.add_candidate(session, persona_id, origin="winner", image_path=relative,
                                                       sha256=sha256_file(persona_dir / relative), caption="t3st woman",
                                                       identity_score=0.9, identity_method="clip")
                session.flush()
                dataset_candidates.decide(session, row.id, "accept", "probe")

    try:
        version("6 photos", [source_photos, training_dataset, lora_model])
        accept("her", sorted((DEMO / "photos").glob("*.jpg"))[6:9])
        version("+ 3 of her photos", [training_dataset, lora_model])
        other = write_persona_dataset(tmp / "other", Character(hair_colour="black", hair_style="long", jacket_colour="blue",
                                                                scarf_colour="none"), count=n_other)
        accept("other", sorted(other.rglob("*.png")))
        version(f"+ {n_other} of another character", [training_dataset, lora_model])
    finally:
        cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
