"""Check the ComfyUI servers of COMFYUI_URLS as the generation pool sees them at the start of a batch.

    python deploy/comfyui/check_servers.py        (with the code location's environment)

For each server: the health check the pool uses (`/system_stats`, then `/queue`), and whether its
`/object_info` lists COMFYUI_CHECKPOINT and every LoRA of the library that the graphs name
(each active persona's primary and chained LoRAs, as `<COMFYUI_LORA_PREFIX>/<slug>/<file>`: what
`persona-pipeline lora export-comfyui` copies). The pool skips a server that fails the health
check and sends a job only to servers that list its model files; this shows which ones those are.
Exit status 0 when every server is up and has every file, 1 otherwise, 2 when COMFYUI_URLS is empty.
"""

from __future__ import annotations

import sys

import requests
from sqlalchemy import select

from persona_pipeline.db import models, registry
from persona_pipeline.db.session import session_scope
from persona_pipeline.resources.comfyui import ComfyUIPool, combo_values, normalise_name
from persona_pipeline.resources.generation import GenerationDefaults
from persona_pipeline.settings import Settings


def library_lora_names(settings: Settings) -> list[str]:
    """The `lora_name`s the graphs use: every active persona's primary and chained LoRAs (the
    files `persona-pipeline lora export-comfyui` copies)."""
    names = GenerationDefaults(workflows_dir=str(settings.workflows_dir), comfyui_lora_prefix=settings.comfyui_lora_prefix)
    found: list[str] = []
    with session_scope(settings.database_url) as session:
        for persona in session.scalars(select(models.Persona).where(models.Persona.active.is_(True))):
            for mapping in registry.list_loras(session, persona.id):
                if mapping.is_primary or mapping.chained:
                    found.append(names.comfy_lora_name(persona.slug, mapping.lora.path))
    return sorted(set(found))


def catalogue(pool: ComfyUIPool, url: str, class_name: str, input_name: str) -> set[str]:
    answer = requests.get(f"{url}/object_info/{class_name}", timeout=pool.request_timeout_s)
    answer.raise_for_status()
    return set(combo_values(answer.json(), class_name, input_name))


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_env()
    pool = ComfyUIPool(urls=settings.comfyui_urls, max_in_flight_per_server=settings.comfyui_max_in_flight,
                       job_timeout_s=settings.comfyui_job_timeout_s)
    urls = pool.server_urls()
    if not urls:
        print("COMFYUI_URLS is empty: no ComfyUI server to check")
        return 2
    loras = library_lora_names(settings)
    checkpoint = normalise_name(settings.comfyui_checkpoint)
    print(f"{len(urls)} server(s), at most {settings.comfyui_max_in_flight} job(s) in flight on each; "
          f"checkpoint {settings.comfyui_checkpoint}; {len(loras)} LoRA(s) in the library")
    problems, ready = 0, 0
    for health in pool.health():
        if not health.ok:
            problems += 1
            print(f"DOWN     {health.url}: {health.error}")
            continue
        try:
            checkpoints = catalogue(pool, health.url, "CheckpointLoaderSimple", "ckpt_name")
            listed = catalogue(pool, health.url, "LoraLoader", "lora_name")
        except (requests.RequestException, ValueError) as exc:
            problems += 1
            print(f"DOWN     {health.url}: /object_info failed: {exc}")
            continue
        missing = ([settings.comfyui_checkpoint] if checkpoint not in checkpoints else []) + \
                  [name for name in loras if normalise_name(name) not in listed]
        vram = (f", VRAM free {health.vram_free / 2**30:.1f} of {health.vram_total / 2**30:.1f} GiB"
                if health.vram_free is not None and health.vram_total else "")
        state = "ok" if not missing else "MISSING"
        print(f"{state:<8} {health.url}: queue {health.queue_length}{vram}, "
              f"{len(loras) - len([m for m in missing if m in loras])}/{len(loras)} LoRA(s)")
        for name in missing:
            print(f"         missing {name}")
        if missing:
            problems += 1
        else:
            ready += 1
    print(f"{ready} of {len(urls)} server(s) can take every job")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
