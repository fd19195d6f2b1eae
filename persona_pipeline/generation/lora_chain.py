"""The LoRAs a persona's generations chain: its primary, then the ones marked `chained` in the
library, with the library's weights; at most five, each file checked against its sha256."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from persona_pipeline.db import registry
from persona_pipeline.domain.generation_params import MAX_LORAS
from persona_pipeline.domain.generation_request import LoraInUse
from persona_pipeline.fileio import sha256_file


class LoraChainError(ValueError):
    pass


def loras_in_use(session: Session, persona_id: int, slug: str, generation) -> list[LoraInUse]:
    mappings = registry.list_loras(session, persona_id)
    primary = [m for m in mappings if m.is_primary]
    if not primary:
        raise LoraChainError(f"{slug}: no primary LoRA in the library; materialise lora_model or "
                             f"`persona-pipeline lora set {slug} ID --primary`")
    chain = primary + [m for m in mappings if m.chained and not m.is_primary]
    if len(chain) > MAX_LORAS:
        raise LoraChainError(f"{slug}: {len(chain)} LoRAs are chained; at most {MAX_LORAS} "
                             f"(ids {', '.join(str(m.lora_id) for m in chain)})")
    out = []
    for mapping in chain:
        lora = mapping.lora
        path = Path(lora.path)
        if not path.is_file():
            raise LoraChainError(f"{slug}: LoRA {lora.id} ({lora.name}) file is missing: {path}")
        actual = sha256_file(path)
        if actual != lora.sha256:
            raise LoraChainError(f"{slug}: LoRA {lora.id} file {path} has changed since it was registered "
                                 f"(sha256 {actual[:12]}…, library {lora.sha256[:12]}…)")
        out.append(LoraInUse(lora_id=lora.id, path=str(path), sha256=lora.sha256, weight=mapping.weight,
                             comfy_name=generation.comfy_lora_name(slug, str(path)), family=lora.family))
    return out
