"""The loaded diffusers pipeline of one (model, device), cached for the process: the img2img and
ControlNet variants built from its modules, loaded ControlNets, and the LoRA adapter cache. Every
use holds the runtime's lock (active adapters and scheduler are per call)."""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from persona_pipeline.fileio import sha256_file

# LoRA adapters kept loaded on the cached pipeline (least recently used ones beyond this are dropped).
MAX_CACHED_ADAPTERS = 16


class GenerationInputError(ValueError):
    """A LoRA, parent or pose file that is missing, unreadable or does not load."""


_sha_lock = threading.Lock()
_sha_cache: dict[tuple[str, int, int], str] = {}


def cached_sha256(path: str) -> str:
    """sha256 of a file, remembered per (path, size, mtime): a LoRA is hashed once, a changed file again."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    with _sha_lock:
        if key not in _sha_cache:
            _sha_cache[key] = sha256_file(Path(path))
        return _sha_cache[key]


class PipelineRuntime:
    """The loaded base pipeline of one (model, device) and what hangs off it: the img2img and
    ControlNet pipelines built from its components (`from_pipe`, no weights copied), loaded
    ControlNets and LoRA adapters. Its state (active adapters, scheduler) is per call, so every
    use holds `lock`."""

    def __init__(self, pipe, device: str, model_path: str = ""):
        self.pipe = pipe
        self.model_path = model_path  # the local folder or hub id it was loaded from
        self.device = device
        self.lock = threading.RLock()
        self.scheduler_config = pipe.scheduler.config
        # FLUX.1 (a flow-matching transformer) or a Stable Diffusion UNet: decides samplers and arguments.
        self.flow_matching = is_flow_matching(pipe.scheduler.config)
        self.dtype = (pipe.unet if hasattr(pipe, "unet") else pipe.transformer).dtype
        self._variants: dict[tuple[bool, int | None], object] = {}
        self._controlnets: dict[str, object] = {}
        self._adapters: OrderedDict[str, str] = OrderedDict()  # sha256 → adapter name, least recently used first
        self._active: tuple | None = None  # the last activate() arguments; None: unknown (an adapter came or went)
        self._embeddings: dict[str, dict] = {}  # adapter name → the trigger embeddings its file bundles

    def controlnet(self, path: str):
        if path not in self._controlnets:
            from diffusers import ControlNetModel

            try:
                model = ControlNetModel.from_pretrained(path, torch_dtype=self.dtype)
            except Exception as exc:  # hub and file errors come in many classes
                raise GenerationInputError(f"ControlNet {path!r} could not be loaded: {exc}") from exc
            self._controlnets[path] = model.to(self.device)
        return self._controlnets[path]

    def variant(self, *, img2img: bool, controlnet):
        """The pipeline for a mode, sharing the base pipeline's modules."""
        if not img2img and controlnet is None:
            return self.pipe
        key = (img2img, id(controlnet) if controlnet is not None else None)
        if key not in self._variants:
            from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

            factory = AutoPipelineForImage2Image if img2img else AutoPipelineForText2Image
            extra = {"controlnet": controlnet} if controlnet is not None else {}
            # torch_dtype: from_pipe otherwise casts the shared modules to fp32.
            variant = factory.from_pipe(self.pipe, torch_dtype=self.dtype, **extra)
            variant.set_progress_bar_config(disable=True)
            self._variants[key] = variant
        return self._variants[key]

    def load_adapters(self, paths: Sequence[str], base_model: str) -> None:
        """Load each LoRA file once as a named adapter (named by its sha256, so a changed file is a
        new adapter); drop the least recently used beyond MAX_CACHED_ADAPTERS. A LoRA made for another
        model family is refused first, naming both (diffusers would load none of its keys, silently)."""
        from persona_pipeline.training.lora_files import LoraFileError, base_model_family, refuse_other_family
        from persona_pipeline.training.families.stable_diffusion import load_lora_file

        wanted = {cached_sha256(path) for path in paths}
        family = base_model_family(self.model_path)
        for path in paths:
            if cached_sha256(path) not in self._adapters:
                try:
                    refuse_other_family(Path(path), family, base_model=base_model)
                except LoraFileError as exc:
                    raise GenerationInputError(f"LoRA file {path}: {exc}") from None
        for path in paths:
            sha = cached_sha256(path)
            if sha in self._adapters:
                self._adapters.move_to_end(sha)
                continue
            name = _adapter_name(sha)
            self._active = None  # a load, even a failed one, may change which adapters are active
            try:
                with quiet_adapters():
                    self._embeddings[name] = load_lora_file(self.pipe, path, name)
            except Exception as exc:  # diffusers/peft raise many classes for a LoRA that does not fit
                raise GenerationInputError(f"LoRA file {path} could not be loaded onto base model {base_model!r}: {exc}") from exc
            self._adapters[sha] = name
        for sha in [sha for sha in self._adapters if sha not in wanted][:max(0, len(self._adapters) - MAX_CACHED_ADAPTERS)]:
            with quiet_adapters():
                self.pipe.delete_adapters(name := self._adapters.pop(sha))
            self._embeddings.pop(name, None)
            self._active = None

    @staticmethod
    def adapter_weights(loras: tuple[tuple[str, float], ...]) -> tuple[list[str], list[float]]:
        """Adapter names and weights in order; the same file twice (by content) adds its weights,
        which is exact: a LoRA's delta is linear in its weight."""
        merged: dict[str, float] = {}
        for path, weight in loras:
            name = _adapter_name(cached_sha256(path))
            merged[name] = merged.get(name, 0.0) + weight
        return list(merged), list(merged.values())

    def activate(self, names: list[str], weights: list[float]) -> None:
        """Make exactly `names` active with `weights`, in that order (the order LoRA deltas are summed).
        Skipped when nothing changed since the last call: it walks every module (~20 ms on the tiny model)."""
        state = (tuple(names), tuple(weights))
        if state == self._active:
            return
        from persona_pipeline.training.families.stable_diffusion import use_trigger_embeddings

        # The trigger embeddings the active LoRAs bundle (pivotal tuning); the first LoRA naming a trigger wins.
        wanted: dict = {}
        for name in names:
            for trigger, rows in self._embeddings.get(name, {}).items():
                wanted.setdefault(trigger, rows)
        use_trigger_embeddings(self.pipe, wanted)
        if names:
            self.pipe.enable_lora()
            self.pipe.set_adapters(names, adapter_weights=weights)
        elif any(self.pipe.get_list_adapters().values()):
            self.pipe.disable_lora()
        self._active = state

    def load_checkpoint_adapter(self, path, name: str) -> None:
        """Load one LoRA file as adapter `name` outside the sha-keyed cache (checkpoint rendering), with the
        trigger embedding it bundles; `activate` makes it active, `delete_checkpoint_adapter` removes it."""
        from persona_pipeline.training.families.stable_diffusion import load_lora_file

        self._active = None
        with quiet_adapters():
            self._embeddings[name] = load_lora_file(self.pipe, path, name)

    def delete_checkpoint_adapter(self, name: str) -> None:
        self._active = None
        with quiet_adapters():
            self.pipe.delete_adapters(name)
        self._embeddings.pop(name, None)

    def forget_activation(self) -> None:
        """Adapters were loaded or deleted behind `activate`'s back: set them again next time."""
        self._active = None


@contextmanager
def torch_threads(count: int | None):
    """Run with `count` torch threads, then restore: CPU kernels split their sums by thread count,
    so a different count can move a pixel by a level (measured: 1 image of 4 at 2 threads vs 1)."""
    import torch

    previous = torch.get_num_threads()
    if not count or count == previous:
        yield
        return
    torch.set_num_threads(int(count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def quiet_adapters():
    """peft warns whenever a second adapter is added or an active one deleted; with several LoRAs
    on one cached pipeline both are routine (activate() sets the active set before every call)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
        yield


def _adapter_name(sha: str) -> str:
    # Distinctive: diffusers matches adapter names as substrings of parameter names in its warnings.
    return f"lora_{sha[:20]}"


_runtime_lock = threading.Lock()


def shared_runtime(base_model: str, device: str) -> PipelineRuntime:
    with _runtime_lock:  # two threads asking at once get one pipeline, loaded once
        return _load_runtime(base_model, device)


@lru_cache(maxsize=1)
def _load_runtime(base_model: str, device: str) -> PipelineRuntime:
    from diffusers import DiffusionPipeline

    if device.startswith("cuda"):
        import torch

        # Exact reproduction on CUDA needs cuDNN to pick the same (deterministic) kernels every run.
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    # DiffusionPipeline picks the pipeline class (SD1.5, SDXL, FLUX.1, an edit model) from model_index.json;
    # only Stable Diffusion's has a safety checker to leave out.
    stable_diffusion = str(DiffusionPipeline.load_config(base_model).get("_class_name", "")).startswith("StableDiffusion")
    unet_only = {"safety_checker": None, "requires_safety_checker": False} if stable_diffusion else {}
    pipe = DiffusionPipeline.from_pretrained(base_model, **unet_only)
    pipe.set_progress_bar_config(disable=True)
    return PipelineRuntime(pipe.to(device), device, base_model)


def is_flow_matching(scheduler_config) -> bool:
    """A rectified-flow model (FLUX.1) by its scheduler: its samplers and guidance differ from SD's."""
    return str(dict(scheduler_config).get("_class_name", "")).startswith("FlowMatch")
