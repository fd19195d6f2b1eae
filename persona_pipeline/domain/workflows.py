"""ComfyUI workflow templates: loading, typed placeholder filling, graph and parameter validation,
and LoRA injection (the API format is restated in docs/rules.md, "ComfyUI protocol").

A template is an API-format graph `{node_id: {"class_type": str, "inputs": {...}}}` whose literal
inputs may hold `{{name}}` placeholders from a fixed vocabulary. A link is `[node_id, output_index]`.
Everything here is checked before anything reaches a server, so a broken template or a bad
parameter fails once, with a message naming the file, node, field or value, and is never resubmitted.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from persona_pipeline.domain.generation_params import (BATCH_RANGE, CFG_RANGE, COMFY_SAMPLERS, COMFY_SCHEDULERS, FLUX_GUIDANCE_RANGE,
                                                       CONTROL_STRENGTH_DEFAULT, CONTROL_STRENGTH_RANGE, DENOISE_RANGE,
                                                       MAX_LORAS, SEED_MAX, STEPS_RANGE, ParamError, WorkflowError,
                                                       check_choice, check_int, check_lora_weight, check_number,
                                                       check_params, check_side, is_number)


class TemplateError(WorkflowError):
    """Not JSON, not an API-format object, unknown or missing placeholder, or a value of the wrong type."""


class GraphError(WorkflowError):
    """Dangling link, bad output index, no SaveImage, a cycle, or a LoRA injection that cannot be done."""


# Output types per class, in output-index order; used to check a link's output index.
NODE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "CheckpointLoaderSimple": ("MODEL", "CLIP", "VAE"),
    "UNETLoader": ("MODEL",),  # a diffusion model alone (FLUX.1), its text encoders and VAE loaded apart
    "DualCLIPLoader": ("CLIP",),
    "FluxGuidance": ("CONDITIONING",),
    "LoraLoader": ("MODEL", "CLIP"),
    "LoraLoaderModelOnly": ("MODEL",),
    "CLIPTextEncode": ("CONDITIONING",),
    "EmptyLatentImage": ("LATENT",),
    "KSampler": ("LATENT",),
    "KSamplerAdvanced": ("LATENT",),
    "VAEDecode": ("IMAGE",),
    "VAEEncode": ("LATENT",),
    "VAELoader": ("VAE",),
    "CLIPSetLastLayer": ("CLIP",),
    "SaveImage": (),
    "PreviewImage": (),
    "LoadImage": ("IMAGE", "MASK"),
    "ImageScale": ("IMAGE",),
    "ImageScaleBy": ("IMAGE",),
    "LatentUpscale": ("LATENT",),
    "LatentUpscaleBy": ("LATENT",),
    "ControlNetLoader": ("CONTROL_NET",),
    "ControlNetApply": ("CONDITIONING",),
    "ControlNetApplyAdvanced": ("CONDITIONING", "CONDITIONING"),
    # Image-edit models (FLUX.1 Kontext, Qwen-Image-Edit)
    "FluxKontextImageScale": ("IMAGE",),
    "ReferenceLatent": ("CONDITIONING",),
    "ConditioningZeroOut": ("CONDITIONING",),
    "CLIPLoader": ("CLIP",),
    "ModelSamplingAuraFlow": ("MODEL",),
    "TextEncodeQwenImageEdit": ("CONDITIONING",),
    "ImageScaleToTotalPixels": ("IMAGE",),
    "EmptySD3LatentImage": ("LATENT",),
    # Image-to-video (Wan 2.x): a clip's frames are an IMAGE batch, made a VIDEO and saved as MP4
    "CLIPVisionLoader": ("CLIP_VISION",), "CLIPVisionEncode": ("CLIP_VISION_OUTPUT",), "ModelSamplingSD3": ("MODEL",),
    "WanImageToVideo": ("CONDITIONING", "CONDITIONING", "LATENT"), "CreateVideo": ("VIDEO",), "SaveVideo": (),
}
# The nodes whose files are a job's output: an image, or a video step's clip.
SAVE_NODES = ("SaveImage", "SaveVideo")

PLACEHOLDER_TYPES: dict[str, type] = {
    "prompt": str, "negative_prompt": str, "checkpoint": str, "filename_prefix": str,
    "seed": int, "steps": int, "cfg": float, "sampler": str, "scheduler": str,
    "width": int, "height": int, "batch_size": int, "denoise": float,
    "parent_image": str, "pose_image": str, "controlnet": str, "control_strength": float,
    "input_image": str,  # the image an edit step changes (or a video step animates)
    "frames": int, "fps": int,  # a video step's clip length and frame rate
}

# Any `{{...}}` is a placeholder attempt; its content must then be a known name exactly, so a
# typo like `{{ prompt }}` or `{{promt}}` is refused instead of being sent to ComfyUI verbatim.
_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}")
_WHOLE_PLACEHOLDER = re.compile(r"\{\{([A-Za-z_][A-Za-z0-9_]*)\}\}")


@dataclass(frozen=True)
class WorkflowTemplate:
    name: str  # file stem, e.g. "txt2img_lora"
    source: str  # file path or "<inline>", for messages
    graph: dict  # parsed API-format graph, placeholders still in it; never mutated
    placeholders: frozenset[str]
    sha256: str  # of the file bytes (of the UTF-8 text for inline templates)


@dataclass(frozen=True)
class LoraRef:
    name: str  # the file name as the ComfyUI server lists it, e.g. "persona-pipeline/mira/v3.safetensors"
    strength_model: float = 1.0
    strength_clip: float = 1.0


# ---------------------------------------------------------------- loading


def load_template(path: Path) -> WorkflowTemplate:
    """Read, parse and validate one template file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TemplateError(f"workflow template {path}: cannot be read ({exc.strerror or exc})") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TemplateError(f"workflow template {path}: not UTF-8 text (byte {exc.start})") from exc
    template = parse_template(text, path.stem, str(path))
    # The hash is of the bytes on disk, so provenance matches `sha256sum` of the file.
    return WorkflowTemplate(template.name, template.source, template.graph, template.placeholders,
                            hashlib.sha256(raw).hexdigest())


def parse_template(text: str, name: str, source: str = "<inline>") -> WorkflowTemplate:
    """Parse and validate a template from its JSON text."""
    try:
        data = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise TemplateError(
            f"workflow template {source} is not valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    except _DuplicateKey as exc:
        # json silently keeps the last of two equal keys, which would drop a node without a word.
        raise TemplateError(f"workflow template {source}: key {exc.key!r} appears twice in one object") from exc
    if not isinstance(data, dict):
        raise TemplateError(f"workflow template {source}: the top level must be a JSON object of nodes, "
                            f"not {_json_kind(data)}")
    if _looks_like_ui_format(data):
        raise TemplateError(f"workflow template {source} is in ComfyUI's UI format (it has 'nodes'/'links'); "
                            "export it with 'Save (API format)' instead")
    if not data:
        raise TemplateError(f"workflow template {source} has no nodes")
    _check_shape(data, source, TemplateError)
    unknown = [(node_id, field, found) for node_id, field, found in _placeholder_uses(data)
               if found not in PLACEHOLDER_TYPES]
    if unknown:
        node_id, field, found = unknown[0]
        raise TemplateError(
            f"workflow template {source}: unknown placeholder {{{{{found}}}}} in node {node_id} "
            f"({data[node_id]['class_type']}) input {field!r}; known placeholders: {', '.join(sorted(PLACEHOLDER_TYPES))}"
        )
    validate_graph(data, source)
    return WorkflowTemplate(name=name, source=source, graph=data,
                            placeholders=frozenset(template_placeholders(data)),
                            sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())


def load_templates(folder: Path) -> dict[str, WorkflowTemplate]:
    """Every `*.json` in `folder`, keyed by file stem. The first bad file raises, naming itself."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TemplateError(f"workflow template folder {folder} does not exist or is not a folder")
    return {path.stem: load_template(path) for path in sorted(folder.glob("*.json"))}


def template_placeholders(graph: dict) -> set[str]:
    """Names of every `{{name}}` used in the graph's inputs (known or not)."""
    return {found for _, _, found in _placeholder_uses(graph)}


# ---------------------------------------------------------------- filling


def fill_template(template: WorkflowTemplate, values: Mapping[str, object]) -> dict:
    """A new graph with every placeholder replaced by its typed value.

    An input that is exactly `{{x}}` takes the value itself (an int stays an int); `{{x}}` inside a
    longer string is interpolated as text. Keys of `values` that the template does not use are ignored.
    """
    used = template_placeholders(template.graph)
    unknown = sorted(used - PLACEHOLDER_TYPES.keys())
    if unknown:
        raise TemplateError(f"workflow template {template.name} ({template.source}) uses unknown "
                            f"placeholder(s) {', '.join(unknown)}")
    missing = sorted(name for name in used if values.get(name) is None)
    if missing:
        raise TemplateError(f"workflow template {template.name} ({template.source}) needs a value for "
                            f"placeholder(s) {', '.join(missing)}")
    typed = {name: _typed_value(name, values[name], template) for name in sorted(used)}
    graph = copy.deepcopy(template.graph)
    for node in graph.values():
        node["inputs"] = {field: _fill_value(value, typed) for field, value in node["inputs"].items()}
    return graph


def _typed_value(name: str, value: object, template: WorkflowTemplate) -> object:
    expected = PLACEHOLDER_TYPES[name]
    # bool is a subclass of int in Python, but True is never a seed or a cfg.
    ok = (isinstance(value, str) if expected is str
          else isinstance(value, int) and not isinstance(value, bool) if expected is int
          else isinstance(value, (int, float)) and not isinstance(value, bool))
    if not ok:
        raise TemplateError(f"workflow template {template.name} ({template.source}): placeholder {name} "
                            f"expects {expected.__name__}, got {type(value).__name__} {value!r}")
    return float(value) if expected is float else value


def _fill_value(value: Any, typed: Mapping[str, object]) -> Any:
    if isinstance(value, str):
        whole = _WHOLE_PLACEHOLDER.fullmatch(value)
        if whole:
            return typed[whole.group(1)]
        return _PLACEHOLDER.sub(lambda m: str(typed[m.group(1)]), value)
    if isinstance(value, list):
        return [_fill_value(item, typed) for item in value]
    if isinstance(value, dict):
        return {key: _fill_value(item, typed) for key, item in value.items()}
    return value


# ---------------------------------------------------------------- graph validation


def validate_graph(graph: dict, source: str = "<graph>") -> None:
    """Every link points at an existing node and output, there is a SaveImage, and there is no cycle.

    Classes outside NODE_OUTPUTS (custom nodes) are allowed; for them only `index >= 0` is checked.
    """
    if not isinstance(graph, dict) or not graph:
        raise GraphError(f"{source}: a workflow graph must be a non-empty object of nodes")
    _check_shape(graph, source, GraphError)
    for node_id, field, link in _links(graph, source):
        target, index = link
        if target not in graph:
            raise GraphError(f"{source}: node {node_id} ({graph[node_id]['class_type']}) input {field!r} "
                             f"links to node {target!r}, which does not exist")
        target_class = graph[target]["class_type"]
        outputs = NODE_OUTPUTS.get(target_class)
        if index < 0 or (outputs is not None and index >= len(outputs)):
            allowed = (f"it has {len(outputs)} output(s) {list(outputs)}" if outputs is not None
                       else "output indexes start at 0")
            raise GraphError(f"{source}: node {node_id} ({graph[node_id]['class_type']}) input {field!r} "
                             f"links to output {index} of node {target} ({target_class}); {allowed}")
    if not save_image_nodes(graph):
        raise GraphError(f"{source}: the graph has no SaveImage (or SaveVideo) node, so it would produce no image")
    _check_acyclic(graph, source)


def _links(graph: dict, source: str) -> Iterator[tuple[str, str, tuple[str, int]]]:
    # ComfyUI treats every list-valued input as a link, so every list must be a well-formed one.
    for node_id, node in graph.items():
        for field, value in node["inputs"].items():
            if not isinstance(value, list):
                continue
            if (len(value) != 2 or not isinstance(value[0], str)
                    or not isinstance(value[1], int) or isinstance(value[1], bool)):
                raise GraphError(f"{source}: node {node_id} ({node['class_type']}) input {field!r} = {value!r} "
                                 "is not a link [node_id (string), output_index (int)]")
            yield node_id, field, (value[0], value[1])


def _check_acyclic(graph: dict, source: str) -> None:
    # Iterative three-colour DFS so a long chain cannot hit the recursion limit.
    deps = {node_id: [link[0] for _, field, link in _links({node_id: node}, source)]
            for node_id, node in graph.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for root in graph:
        if state.get(root):
            continue
        path = [root]
        stack = [iter(deps[root])]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise GraphError(f"{source}: the graph has a cycle through node {nxt} "
                                 f"({graph[nxt]['class_type']}): {' -> '.join(cycle)}")
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(deps[nxt]))


def save_image_nodes(graph: dict) -> list[str]:
    """Ids of the nodes that save the job's output (SAVE_NODES: SaveImage, SaveVideo), in numeric order."""
    return sorted((node_id for class_type in SAVE_NODES for node_id in _ids_of_class(graph, class_type)), key=_id_order)


def load_image_nodes(graph: dict) -> list[str]:
    """Ids of the LoadImage nodes (their files must be uploaded to the server first)."""
    return _ids_of_class(graph, "LoadImage")


def _ids_of_class(graph: dict, class_type: str) -> list[str]:
    return sorted((node_id for node_id, node in graph.items()
                   if isinstance(node, dict) and node.get("class_type") == class_type), key=_id_order)


def _is_numeric_id(node_id: str) -> bool:
    # isascii() too: "²".isdigit() is True but int("²") fails.
    return node_id.isascii() and node_id.isdigit()


def _id_order(node_id: str) -> tuple[int, int, str]:
    return (0, int(node_id), node_id) if _is_numeric_id(node_id) else (1, 0, node_id)


# ---------------------------------------------------------------- parameter validation


def validate_params(graph: dict, *, min_side: int = 256, source: str = "<graph>") -> None:
    """Range-check the parameters of the nodes we know, after filling.

    Linked inputs (e.g. a seed from a primitive node) cannot be checked here and are skipped.
    """
    _check_shape(graph, source, GraphError)
    for node_id, field, found in _placeholder_uses(graph):
        raise TemplateError(f"{source}: node {node_id} ({graph[node_id]['class_type']}) input {field!r} "
                            f"still holds placeholder {{{{{found}}}}}; fill the template first")
    for node_id, node in graph.items():
        class_type = node.get("class_type")
        inputs = node.get("inputs", {})

        def check(field: str, checker, *args) -> None:
            if field in inputs and not isinstance(inputs[field], list):
                checker(inputs[field], f"{source}: node {node_id} ({class_type}) input {field!r}", *args)

        if class_type in ("EmptyLatentImage", "EmptySD3LatentImage"):
            check("width", check_side, min_side)
            check("height", check_side, min_side)
            check("batch_size", check_int, *BATCH_RANGE)
        elif class_type in ("KSampler", "KSamplerAdvanced"):
            check("seed", check_int, 0, SEED_MAX)
            check("noise_seed", check_int, 0, SEED_MAX)
            check("steps", check_int, *STEPS_RANGE)
            check("cfg", check_number, *CFG_RANGE)
            check("denoise", check_number, *DENOISE_RANGE)
            check("sampler_name", check_choice, COMFY_SAMPLERS)
            check("scheduler", check_choice, COMFY_SCHEDULERS)
            check("start_at_step", check_int, 0, 10_000)
            check("end_at_step", check_int, 0, 10_000)
        elif class_type in ("ControlNetApply", "ControlNetApplyAdvanced"):
            check("strength", check_number, *CONTROL_STRENGTH_RANGE)
            check("start_percent", check_number, 0.0, 1.0)
            check("end_percent", check_number, 0.0, 1.0)
            start, end = inputs.get("start_percent"), inputs.get("end_percent")
            if is_number(start) and is_number(end) and start > end:
                raise ParamError(f"{source}: node {node_id} ({class_type}) start_percent {start} is after "
                                 f"end_percent {end}; start must be <= end")
        elif class_type in ("LoraLoader", "LoraLoaderModelOnly"):
            check("strength_model", check_lora_weight)
            check("strength_clip", check_lora_weight)
        elif class_type == "WanImageToVideo":
            check("width", check_side, min_side)
            check("height", check_side, min_side)
            check("length", check_int, 5, 161)
            check("batch_size", check_int, *BATCH_RANGE)
        elif class_type == "FluxGuidance":
            check("guidance", check_number, *FLUX_GUIDANCE_RANGE)


# ---------------------------------------------------------------- LoRA injection


def inject_loras(graph: dict, loras: Sequence[LoraRef], source: str = "<graph>") -> dict:
    """A new graph with one LoraLoader per LoRA chained after the only CheckpointLoaderSimple, and
    every former consumer of the checkpoint's MODEL and CLIP rewired to the last LoRA. VAE links stay.
    A graph that loads its diffusion model alone (one UNETLoader, no checkpoint: FLUX.1) gets
    LoraLoaderModelOnly nodes on the MODEL instead; its text encoders are left as they are."""
    result = copy.deepcopy(graph)
    if not loras:
        return result
    if len(loras) > MAX_LORAS:
        raise GraphError(f"{source}: {len(loras)} LoRAs given; at most {MAX_LORAS} can be chained")
    for lora in loras:
        if not isinstance(lora.name, str) or not lora.name.strip():
            raise GraphError(f"{source}: a LoRA has no file name ({lora!r})")
        for field in ("strength_model", "strength_clip"):
            check_lora_weight(getattr(lora, field), f"{source}: LoRA {lora.name} {field}")
    _check_shape(result, source, GraphError)
    checkpoints = _ids_of_class(result, "CheckpointLoaderSimple")
    unets = _ids_of_class(result, "UNETLoader")
    model_only = not checkpoints and len(unets) == 1
    if len(checkpoints) != 1 and not model_only:
        found = f"{len(checkpoints)} (nodes {', '.join(checkpoints)})" if checkpoints else "none"
        raise GraphError(f"{source}: LoRA injection needs exactly one CheckpointLoaderSimple node, found {found}"
                         + (f" and {len(unets)} UNETLoader nodes" if unets else "")
                         + " (a diffusion model loaded alone, as FLUX.1 is, needs exactly one UNETLoader and no checkpoint)")
    checkpoint = unets[0] if model_only else checkpoints[0]
    rewired = (0,) if model_only else (0, 1)  # MODEL (and CLIP from a checkpoint)

    next_id = max((int(node_id) for node_id in result if _is_numeric_id(node_id)), default=0) + 1
    new_ids = [str(next_id + offset) for offset in range(len(loras))]
    # Rewire the existing consumers first, while the graph holds only the old nodes.
    for node in result.values():
        for field, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] == checkpoint and value[1] in rewired:
                node["inputs"][field] = [new_ids[-1], value[1]]
    previous = checkpoint
    for node_id, lora in zip(new_ids, loras):
        if model_only:
            result[node_id] = {"class_type": "LoraLoaderModelOnly", "inputs": {
                "model": [previous, 0], "lora_name": lora.name, "strength_model": float(lora.strength_model)}}
            previous = node_id
            continue
        result[node_id] = {
            "class_type": "LoraLoader",
            "inputs": {
                "model": [previous, 0],
                "clip": [previous, 1],
                "lora_name": lora.name,
                "strength_model": float(lora.strength_model),
                "strength_clip": float(lora.strength_clip),
            },
        }
        previous = node_id
    validate_graph(result, source)
    return result


# ---------------------------------------------------------------- helpers


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _json_kind(value: object) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _looks_like_ui_format(data: dict) -> bool:
    # The UI export has top-level "nodes" and "links" arrays; an API node is always an object.
    return any(key in data and isinstance(data[key], list) for key in ("nodes", "links"))


def _check_shape(graph: dict, source: str, error: type[WorkflowError]) -> None:
    for node_id, node in graph.items():
        if not isinstance(node_id, str):
            raise error(f"{source}: node id {node_id!r} must be a string (API format keys are strings)")
        if not isinstance(node, dict):
            raise error(f"{source}: node {node_id!r} must be an object with class_type and inputs, "
                        f"not {_json_kind(node)}")
        if not isinstance(node.get("class_type"), str) or not node["class_type"]:
            raise error(f"{source}: node {node_id!r} has no class_type string")
        if not isinstance(node.get("inputs"), dict):
            raise error(f"{source}: node {node_id!r} ({node['class_type']}) has no inputs object")


def _placeholder_uses(graph: dict) -> Iterator[tuple[str, str, str]]:
    """(node id, input name, placeholder name) for every `{{...}}` in the inputs, nested values included."""
    for node_id, node in graph.items():
        if not isinstance(node, dict) or not isinstance(node.get("inputs"), dict):
            continue
        for field, value in node["inputs"].items():
            for text in _strings(value):
                for match in _PLACEHOLDER.finditer(text):
                    yield node_id, field, match.group(1)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)


__all__ = [
    "COMFY_SAMPLERS", "COMFY_SCHEDULERS", "CONTROL_STRENGTH_DEFAULT", "CONTROL_STRENGTH_RANGE", "GraphError",
    "LoraRef", "MAX_LORAS", "NODE_OUTPUTS", "PLACEHOLDER_TYPES", "ParamError", "SAVE_NODES", "TemplateError", "WorkflowError",
    "WorkflowTemplate", "check_params", "fill_template", "inject_loras", "load_image_nodes", "load_template",
    "load_templates", "parse_template", "save_image_nodes", "template_placeholders", "validate_graph",
    "validate_params",
]
