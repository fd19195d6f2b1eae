"""Which model files a graph names, and which of them a server lists in `/object_info`."""

from __future__ import annotations

# Graph inputs that name a model file, and the /object_info class whose combo list has the names.
MODEL_INPUTS: dict[str, tuple[str, str]] = {
    "CheckpointLoaderSimple": ("ckpt_name", "CheckpointLoaderSimple"),
    "LoraLoader": ("lora_name", "LoraLoader"),
    "LoraLoaderModelOnly": ("lora_name", "LoraLoader"),
    "ControlNetLoader": ("control_net_name", "ControlNetLoader"),
    # A diffusion model loaded alone (FLUX.1, FLUX.1 Kontext, Qwen-Image-Edit): an edit step's model file
    # is on some servers only.
    "UNETLoader": ("unet_name", "UNETLoader"),
}

# (node id, class_type, input name, file name, /object_info class) of one model file a graph names.
ModelNeed = tuple[str, str, str, str, str]
# (/object_info class, input name) -> {normalised name: the name as the server spells it}
Catalogue = dict[tuple[str, str], dict[str, str]]


def normalise_name(name: str) -> str:
    """One spelling for a model file name: Windows servers list "persona\\x.safetensors" where a
    Linux one lists "persona/x.safetensors"."""
    return name.replace("\\", "/")


def required_models(graph: dict) -> list[ModelNeed]:
    """(node id, class_type, input name, file name, /object_info class) of every model file the
    graph names as a literal value."""
    found = []
    for node_id, node in graph.items():
        class_type = node.get("class_type") if isinstance(node, dict) else None
        if class_type in MODEL_INPUTS:
            input_name, catalogue = MODEL_INPUTS[class_type]
            value = (node.get("inputs") or {}).get(input_name)
            if isinstance(value, str):
                found.append((str(node_id), class_type, input_name, value, catalogue))
    return found


def catalogue_inputs(class_name: str) -> set[str]:
    """The model-naming inputs whose names the /object_info class `class_name` lists."""
    return {input_name for input_name, catalogue in MODEL_INPUTS.values() if catalogue == class_name}


def combo_values(object_info: dict, class_name: str, input_name: str) -> dict[str, str]:
    """The names a combo input accepts, normalised -> as the server spells them, in either of
    ComfyUI's two shapes: `[[names...], {...}]` and the newer `["COMBO", {"options": [names...]}]`."""
    definition = object_info.get(class_name) or {}
    inputs = definition.get("input") or {}
    spec = (inputs.get("required") or {}).get(input_name) or (inputs.get("optional") or {}).get(input_name)
    values: list = []
    if spec and isinstance(spec[0], list):
        values = spec[0]
    elif spec and spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
        values = spec[1].get("options") or []
    return {normalise_name(str(v)): str(v) for v in values}


def server_spelling(graph: dict, needs: list[ModelNeed], catalogue: Catalogue | None) -> None:
    """Write each model file name of `graph` as the server lists it (a Windows server lists
    "persona\\x.safetensors"); a name it does not list stays as it is."""
    for node_id, _, input_name, value, class_name in needs:
        names = catalogue.get((class_name, input_name), {}) if catalogue else {}
        graph[node_id]["inputs"][input_name] = names.get(normalise_name(value), value)
