"""Generation defaults that are not a service: the template folder, the default backend, and
how the persona's checkpoint and LoRAs are named on the ComfyUI servers."""

from __future__ import annotations

from pathlib import Path

import dagster as dg


class GenerationDefaults(dg.ConfigurableResource):
    """PERSONA_GENERATION_BACKEND, PERSONA_WORKFLOWS_DIR, COMFYUI_CHECKPOINT, COMFYUI_LORA_PREFIX."""

    backend: str = "diffusers"
    workflows_dir: str
    comfyui_checkpoint: str = "v1-5-pruned-emaonly.safetensors"
    comfyui_lora_prefix: str = "persona-pipeline"

    def templates_dir(self) -> Path:
        return Path(self.workflows_dir)

    def comfy_lora_name(self, slug: str, lora_path: str) -> str:
        """The `lora_name` a server lists for a library file once `persona-pipeline lora
        export-comfyui` has copied it into the server's models/loras folder."""
        return f"{self.comfyui_lora_prefix}/{slug}/{Path(lora_path).name}"
