"""Workflow templates: loading, typed filling, graph and parameter validation, LoRA injection, and the
shipped templates in workflows/. Pure unit tests; no server."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from persona_pipeline.domain.workflows import (
    COMFY_SAMPLERS,
    COMFY_SCHEDULERS,
    CONTROL_STRENGTH_DEFAULT,
    MAX_LORAS,
    PLACEHOLDER_TYPES,
    GraphError,
    LoraRef,
    ParamError,
    TemplateError,
    WorkflowError,
    check_params,
    fill_template,
    inject_loras,
    load_image_nodes,
    load_template,
    load_templates,
    parse_template,
    save_image_nodes,
    template_placeholders,
    validate_graph,
    validate_params,
)

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
SHIPPED = sorted(WORKFLOWS.glob("*.json"))

STANDARD_VALUES = {
    "prompt": "photo of mira walking in a city street, golden hour",
    "negative_prompt": "blurry, deformed hands",
    "input_image": "mira/base_00001_.png",
    "frames": 81, "fps": 16,  # a video step's clip
    "checkpoint": "sd15/realistic.safetensors",
    "filename_prefix": "persona-pipeline/mira/run7",
    "seed": 123456789,
    "steps": 25,
    "cfg": 7,  # an int for a float placeholder: must come out as 7.0
    "sampler": "dpmpp_2m",
    "scheduler": "karras",
    "width": 512,
    "height": 768,
    "batch_size": 1,
    "denoise": 0.45,
    "parent_image": "persona-pipeline/parent_17.png",
    "pose_image": "persona-pipeline/pose_3.png",
    "controlnet": "control_v11p_sd15_openpose.pth",
    "control_strength": CONTROL_STRENGTH_DEFAULT,
}


def _graph() -> dict:
    """The txt2img shape with literal values: checkpoint 4, latent 5, prompts 6/7, sampler 3, decode 8, save 9."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "model.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": 1, "steps": 20, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "out", "images": ["8", 0]}},
    }


def _template(graph: dict, name: str = "t") -> object:
    return parse_template(json.dumps(graph), name, f"{name}.json")


# ---------------------------------------------------------------- loading


def test_not_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "4": {"class_type": "SaveImage", "inputs": {}},\n  "5": oops\n}\n')
    with pytest.raises(TemplateError) as err:
        load_template(path)
    assert str(path) in str(err.value) and "not valid JSON" in str(err.value)
    assert "line 3" in str(err.value)


def test_unreadable_file_names_it(tmp_path):
    path = tmp_path / "missing.json"
    with pytest.raises(TemplateError, match="missing.json.*cannot be read"):
        load_template(path)


def test_ui_format_is_refused_with_export_hint():
    ui = {"last_node_id": 9, "nodes": [{"id": 3, "type": "KSampler"}], "links": [[1, 4, 0, 3, 0, "MODEL"]]}
    with pytest.raises(TemplateError) as err:
        parse_template(json.dumps(ui), "ui", "ui.json")
    assert "ui.json" in str(err.value) and "Save (API format)" in str(err.value)


@pytest.mark.parametrize("text, expected", [
    ("[1, 2]", "top level must be a JSON object"),
    ('{"4": 5}', "node '4' must be an object"),
    ('{"4": {"inputs": {}}}', "node '4' has no class_type"),
    ('{"4": {"class_type": "SaveImage"}}', "node '4' (SaveImage) has no inputs"),
    ('{"9": {"class_type": "SaveImage", "inputs": {}}, "9": {"class_type": "LoadImage", "inputs": {}}}',
     "key '9' appears twice"),
    ("{}", "has no nodes"),
])
def test_malformed_templates_are_refused(text, expected):
    with pytest.raises(TemplateError, match=re.escape(expected)) as err:
        parse_template(text, "bad", "bad.json")
    assert "bad.json" in str(err.value)


@pytest.mark.parametrize("placeholder", ["promt", " prompt ", "lora"])
def test_unknown_placeholder_is_refused_naming_it_the_node_and_input(placeholder):
    graph = _graph()
    graph["6"]["inputs"]["text"] = f"photo of {{{{{placeholder}}}}}"
    with pytest.raises(TemplateError) as err:
        _template(graph)
    message = str(err.value)
    assert f"{{{{{placeholder}}}}}" in message and "node 6" in message and "'text'" in message and "t.json" in message


def test_load_template_records_name_source_placeholders_and_file_hash(tmp_path):
    path = tmp_path / "mine.json"
    graph = _graph()
    graph["3"]["inputs"]["seed"] = "{{seed}}"
    graph["6"]["inputs"]["text"] = "{{prompt}}, high detail"
    raw = json.dumps(graph).encode()
    path.write_bytes(raw)
    template = load_template(path)
    assert template.name == "mine" and template.source == str(path)
    assert template.placeholders == frozenset({"seed", "prompt"})
    assert template.sha256 == __import__("hashlib").sha256(raw).hexdigest()
    assert template_placeholders(template.graph) == {"seed", "prompt"}


def test_load_templates_propagates_the_bad_file(tmp_path):
    (tmp_path / "good.json").write_text(json.dumps(_graph()))
    (tmp_path / "zbad.json").write_text("{not json")
    with pytest.raises(TemplateError, match="zbad.json"):
        load_templates(tmp_path)
    (tmp_path / "zbad.json").unlink()
    assert list(load_templates(tmp_path)) == ["good"]
    with pytest.raises(TemplateError, match="nowhere"):
        load_templates(tmp_path / "nowhere")


# ---------------------------------------------------------------- filling


def _placeholder_graph() -> dict:
    graph = _graph()
    graph["5"]["inputs"].update(width="{{width}}", height="{{height}}")
    graph["6"]["inputs"]["text"] = "{{prompt}}"
    graph["3"]["inputs"].update(seed="{{seed}}", cfg="{{cfg}}", sampler_name="{{sampler}}", denoise="{{denoise}}")
    graph["9"]["inputs"]["filename_prefix"] = "mira/{{seed}}_{{sampler}}"
    return graph


def test_typed_filling_keeps_types_and_interpolates_inside_strings():
    template = _template(_placeholder_graph())
    filled = fill_template(template, {"width": 512, "height": 768, "prompt": "a photo", "seed": 42, "cfg": 7,
                                      "sampler": "euler", "denoise": 0.5, "unused_extra": object()})
    assert filled["5"]["inputs"]["width"] == 512 and type(filled["5"]["inputs"]["width"]) is int
    assert filled["3"]["inputs"]["seed"] == 42 and type(filled["3"]["inputs"]["seed"]) is int
    assert filled["3"]["inputs"]["cfg"] == 7.0 and type(filled["3"]["inputs"]["cfg"]) is float
    assert filled["3"]["inputs"]["denoise"] == 0.5
    assert filled["6"]["inputs"]["text"] == "a photo"
    assert filled["9"]["inputs"]["filename_prefix"] == "mira/42_euler"
    assert filled["3"]["inputs"]["model"] == ["4", 0]
    # The template itself is untouched, so it can be filled again.
    assert template.graph["3"]["inputs"]["seed"] == "{{seed}}"
    validate_graph(filled)
    validate_params(filled)


def test_missing_or_none_value_is_refused_naming_placeholder_and_template():
    template = _template(_placeholder_graph(), "mine")
    values = {"width": 512, "height": 768, "prompt": "p", "seed": 1, "cfg": 7.0, "sampler": "euler", "denoise": None}
    with pytest.raises(TemplateError) as err:
        fill_template(template, values)
    assert "denoise" in str(err.value) and "mine" in str(err.value)
    del values["seed"]
    with pytest.raises(TemplateError, match="denoise, seed"):
        fill_template(template, values)


@pytest.mark.parametrize("name, value, expected", [
    ("seed", "42", "int"),
    ("seed", 4.0, "int"),
    ("seed", True, "int"),
    ("cfg", "7.5", "float"),
    ("cfg", False, "float"),
    ("prompt", 5, "str"),
    ("width", 512.0, "int"),
])
def test_wrong_type_is_refused_naming_placeholder_type_and_value(name, value, expected):
    values = {"width": 512, "height": 768, "prompt": "p", "seed": 1, "cfg": 7.0, "sampler": "euler", "denoise": 1.0}
    values[name] = value
    with pytest.raises(TemplateError) as err:
        fill_template(_template(_placeholder_graph()), values)
    message = str(err.value)
    assert f"placeholder {name}" in message and f"expects {expected}" in message and repr(value) in message


def test_every_placeholder_type_is_a_plain_type():
    assert set(PLACEHOLDER_TYPES.values()) == {str, int, float}


# ---------------------------------------------------------------- graph validation


def test_valid_graph_passes_and_lists_save_and_load_nodes():
    graph = _graph()
    validate_graph(graph)
    assert save_image_nodes(graph) == ["9"]
    assert load_image_nodes(graph) == []
    graph["12"] = {"class_type": "LoadImage", "inputs": {"image": "a.png"}}
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": "b.png"}}
    graph["2"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["8", 0]}}
    assert load_image_nodes(graph) == ["10", "12"]  # numeric order, not string order
    assert save_image_nodes(graph) == ["2", "9"]


def test_dangling_link_names_node_input_and_target():
    graph = _graph()
    graph["8"]["inputs"]["samples"] = ["33", 0]
    with pytest.raises(GraphError) as err:
        validate_graph(graph, "g.json")
    message = str(err.value)
    assert "g.json" in message and "node 8 (VAEDecode)" in message and "'samples'" in message and "'33'" in message


@pytest.mark.parametrize("link, expected", [
    (["4", 3], "output 3 of node 4 (CheckpointLoaderSimple); it has 3 output(s)"),
    (["6", 1], "output 1 of node 6 (CLIPTextEncode); it has 1 output(s)"),
    (["4", -1], "output -1 of node 4"),
])
def test_bad_output_index_names_the_target_and_its_class(link, expected):
    graph = _graph()
    graph["3"]["inputs"]["model"] = link
    with pytest.raises(GraphError, match=r"node 3 \(KSampler\) input 'model'") as err:
        validate_graph(graph)
    assert expected in str(err.value)


def test_node_ids_must_be_strings():
    graph = _graph()
    graph[10] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    with pytest.raises(GraphError, match="node id 10 must be a string"):
        validate_graph(graph)


def test_custom_node_outputs_are_only_checked_for_non_negative():
    graph = _graph()
    graph["20"] = {"class_type": "FaceDetailerPipe", "inputs": {"image": ["8", 0]}}
    graph["9"]["inputs"]["images"] = ["20", 5]
    validate_graph(graph)
    graph["9"]["inputs"]["images"] = ["20", -1]
    with pytest.raises(GraphError, match="output indexes start at 0"):
        validate_graph(graph)


@pytest.mark.parametrize("value", [["4"], ["4", 0, 1], [4, 0], ["4", "0"], ["4", True], ["4", 0.0]])
def test_malformed_link_is_refused(value):
    graph = _graph()
    graph["3"]["inputs"]["model"] = value
    with pytest.raises(GraphError, match=r"node 3 \(KSampler\) input 'model'.*is not a link"):
        validate_graph(graph)


def test_missing_save_image_is_refused():
    graph = _graph()
    graph["9"]["class_type"] = "PreviewImage"
    with pytest.raises(GraphError, match="g.json: the graph has no SaveImage"):
        validate_graph(graph, "g.json")


def test_cycle_is_refused_naming_a_node_on_it():
    graph = _graph()
    graph["6"]["inputs"]["clip"] = ["3", 0]  # 3 -> 6 -> 3
    with pytest.raises(GraphError, match="cycle") as err:
        validate_graph(graph)
    assert "3" in str(err.value) and "6" in str(err.value)
    graph = _graph()
    graph["20"] = {"class_type": "ImageScaleBy", "inputs": {"image": ["20", 0], "scale_by": 2.0}}
    with pytest.raises(GraphError, match=r"cycle through node 20 \(ImageScaleBy\)"):
        validate_graph(graph)


def test_a_long_chain_does_not_hit_the_recursion_limit():
    graph = _graph()
    previous = "8"
    for index in range(100, 3100):
        graph[str(index)] = {"class_type": "ImageScaleBy", "inputs": {"image": [previous, 0], "scale_by": 1.0}}
        previous = str(index)
    graph["9"]["inputs"]["images"] = [previous, 0]
    validate_graph(graph)


# ---------------------------------------------------------------- parameters


def _ksampler_graph(**overrides) -> dict:
    graph = _graph()
    graph["3"]["inputs"].update(overrides)
    return graph


@pytest.mark.parametrize("node, field, bad, good", [
    ("5", "width", 248, 256),
    ("5", "width", 2056, 2048),
    ("5", "width", 516, 520),
    ("5", "height", 248, 256),
    ("5", "height", 2056, 2048),
    ("5", "height", 300, 304),
    ("5", "batch_size", 0, 1),
    ("5", "batch_size", 65, 64),
    ("3", "steps", 0, 1),
    ("3", "steps", 151, 150),
    ("3", "cfg", 0.99, 1.0),
    ("3", "cfg", 30.01, 30.0),
    ("3", "denoise", -0.01, 0.0),
    ("3", "denoise", 1.01, 1.0),
    ("3", "seed", -1, 0),
    ("3", "seed", 2**64, 2**64 - 1),
    ("3", "cfg", float("nan"), 7.5),
    ("3", "steps", 20.0, 20),
    ("3", "steps", True, 1),
])
def test_every_parameter_bound_in_a_graph(node, field, bad, good):
    graph = _graph()
    graph[node]["inputs"][field] = good
    validate_params(graph)
    graph[node]["inputs"][field] = bad
    with pytest.raises(ParamError) as err:
        validate_params(graph, source="g.json")
    message = str(err.value)
    assert "g.json" in message and f"node {node} ({graph[node]['class_type']})" in message
    assert f"'{field}'" in message and (str(bad) in message or repr(bad) in message)


def test_min_side_can_be_lowered_for_tiny_models():
    graph = _graph()
    graph["5"]["inputs"].update(width=64, height=64)
    with pytest.raises(ParamError, match="allowed 256 to 2048"):
        validate_params(graph)
    validate_params(graph, min_side=64)


def test_sampler_names_as_comfyui_spells_them():
    with pytest.raises(ParamError) as err:
        validate_params(_ksampler_graph(sampler_name="euler_a"))
    assert "'sampler_name' = 'euler_a'" in str(err.value) and "(did you mean euler_ancestral?)" in str(err.value)
    with pytest.raises(ParamError, match=r"'DPM\+\+ 2M' .*\(did you mean dpmpp_2m\?\)"):
        validate_params(_ksampler_graph(sampler_name="DPM++ 2M"))
    validate_params(_ksampler_graph(sampler_name="euler_ancestral"))
    for name in ("euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "ddim", "uni_pc", "heun", "lms"):
        assert name in COMFY_SAMPLERS
    with pytest.raises(ParamError, match="'scheduler' = 'Karras'"):
        validate_params(_ksampler_graph(scheduler="Karras"))
    for name in COMFY_SCHEDULERS:
        validate_params(_ksampler_graph(scheduler=name))


def test_ksampler_advanced_fields_are_checked_where_present():
    graph = _graph()
    inputs = graph["3"]["inputs"]
    del inputs["seed"], inputs["denoise"]
    graph["3"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **inputs, "noise_seed": 5, "add_noise": "enable", "start_at_step": 0, "end_at_step": 10000,
        "return_with_leftover_noise": "disable"}}
    validate_params(graph)
    graph["3"]["inputs"]["noise_seed"] = -5
    with pytest.raises(ParamError, match=r"node 3 \(KSamplerAdvanced\) input 'noise_seed'"):
        validate_params(graph)
    graph["3"]["inputs"].update(noise_seed=5, sampler_name="euler_a")
    with pytest.raises(ParamError, match="euler_a"):
        validate_params(graph)


def test_linked_parameters_are_not_range_checked():
    graph = _graph()
    graph["30"] = {"class_type": "PrimitiveInt", "inputs": {"value": 7}}
    graph["3"]["inputs"]["seed"] = ["30", 0]
    validate_params(graph)


def _controlnet_graph(class_type: str = "ControlNetApplyAdvanced", **inputs) -> dict:
    graph = _graph()
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": "pose.png"}}
    graph["11"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "openpose.pth"}}
    base = {"positive": ["6", 0], "negative": ["7", 0], "control_net": ["11", 0], "image": ["10", 0],
            "strength": CONTROL_STRENGTH_DEFAULT, "start_percent": 0.0, "end_percent": 1.0}
    if class_type == "ControlNetApply":
        base = {"conditioning": ["6", 0], "control_net": ["11", 0], "image": ["10", 0],
                "strength": CONTROL_STRENGTH_DEFAULT}
    graph["12"] = {"class_type": class_type, "inputs": {**base, **inputs}}
    return graph


@pytest.mark.parametrize("class_type", ["ControlNetApply", "ControlNetApplyAdvanced"])
@pytest.mark.parametrize("strength, ok", [(0.39, False), (0.4, True), (CONTROL_STRENGTH_DEFAULT, True),
                                          (0.9, True), (0.91, False)])
def test_controlnet_strength_bounds(class_type, strength, ok):
    graph = _controlnet_graph(class_type, strength=strength)
    validate_graph(graph)
    if ok:
        validate_params(graph)
    else:
        with pytest.raises(ParamError, match=rf"node 12 \({class_type}\) input 'strength' = {strength} .*0.4 to 0.9"):
            validate_params(graph)


@pytest.mark.parametrize("inputs, expected", [
    ({"start_percent": -0.1}, "'start_percent' = -0.1"),
    ({"end_percent": 1.1}, "'end_percent' = 1.1"),
    ({"start_percent": 0.6, "end_percent": 0.5}, "start_percent 0.6 is after end_percent 0.5"),
])
def test_controlnet_percent_bounds(inputs, expected):
    with pytest.raises(ParamError, match=expected):
        validate_params(_controlnet_graph(**inputs))


@pytest.mark.parametrize("field", ["strength_model", "strength_clip"])
@pytest.mark.parametrize("value, ok", [(-0.01, False), (0.0, True), (2.0, True), (2.01, False)])
def test_lora_loader_strength_bounds(field, value, ok):
    graph = inject_loras(_graph(), [LoraRef("a.safetensors")])
    lora_id = next(i for i, n in graph.items() if n["class_type"] == "LoraLoader")
    graph[lora_id]["inputs"][field] = value
    if ok:
        validate_params(graph)
    else:
        with pytest.raises(ParamError, match=rf"node {lora_id} \(LoraLoader\) input '{field}' = {value}"):
            validate_params(graph)


def test_unfilled_placeholder_is_refused_by_validate_params():
    graph = _graph()
    graph["3"]["inputs"]["steps"] = "{{steps}}"
    with pytest.raises(TemplateError, match=r"node 3 \(KSampler\) input 'steps' still holds placeholder \{\{steps\}\}"):
        validate_params(graph)


PLAIN_OK = dict(width=512, height=512, steps=20, cfg=7.0, denoise=1.0, sampler="euler", scheduler="normal")


@pytest.mark.parametrize("field, bad, good", [
    ("width", 248, 256), ("width", 2056, 2048), ("width", 260, 264),
    ("height", 248, 256), ("height", 2056, 2048),
    ("steps", 0, 1), ("steps", 151, 150),
    ("cfg", 0.5, 1), ("cfg", 31, 30),
    ("denoise", -0.1, 0.0), ("denoise", 1.5, 1.0),
    ("sampler", "euler_a", "euler_ancestral"),
    ("scheduler", "cosine", "kl_optimal"),
    ("control_strength", 0.39, 0.4), ("control_strength", 0.91, 0.9),
])
def test_check_params_on_plain_values(field, bad, good):
    check_params(**{**PLAIN_OK, field: good})
    with pytest.raises(ParamError) as err:
        check_params(**{**PLAIN_OK, field: bad})
    assert str(err.value).startswith(f"{field} = ") and str(bad) in str(err.value)
    check_params(**PLAIN_OK, control_strength=None)


def test_check_params_min_side():
    check_params(**{**PLAIN_OK, "width": 64, "height": 64}, min_side=64)
    with pytest.raises(ParamError, match="width = 64"):
        check_params(**{**PLAIN_OK, "width": 64, "height": 64})


# ---------------------------------------------------------------- LoRA injection


def _loras(count: int) -> list[LoraRef]:
    return [LoraRef(f"persona-pipeline/mira/v{index}.safetensors", 0.5 + index / 10, 1.0) for index in range(count)]


def test_no_loras_returns_an_unchanged_copy():
    graph = _graph()
    result = inject_loras(graph, [])
    assert result == graph and result is not graph
    result["3"]["inputs"]["steps"] = 99
    assert graph["3"]["inputs"]["steps"] == 20


@pytest.mark.parametrize("count", [1, 3, MAX_LORAS])
def test_loras_are_chained_and_every_model_and_clip_consumer_rewired(count):
    graph = _graph()
    graph["20"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "extra", "clip": ["4", 1]}}  # another consumer
    graph["21"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["8", 0], "vae": ["4", 2]}}
    original = copy.deepcopy(graph)
    loras = _loras(count)
    result = inject_loras(graph, loras, "g.json")
    assert graph == original  # input not mutated

    new_ids = [str(22 + index) for index in range(count)]  # above the largest numeric id (21)
    assert [i for i, n in result.items() if n["class_type"] == "LoraLoader"] == new_ids
    previous = "4"
    for node_id, lora in zip(new_ids, loras):
        inputs = result[node_id]["inputs"]
        assert inputs == {"model": [previous, 0], "clip": [previous, 1], "lora_name": lora.name,
                          "strength_model": lora.strength_model, "strength_clip": lora.strength_clip}
        previous = node_id
    last = new_ids[-1]
    assert result["3"]["inputs"]["model"] == [last, 0]
    for consumer in ("6", "7", "20"):
        assert result[consumer]["inputs"]["clip"] == [last, 1]
    # Nothing but the first LoRA still reads the checkpoint's MODEL/CLIP; the VAE links are untouched.
    readers = {(node_id, field) for node_id, node in result.items() for field, value in node["inputs"].items()
               if isinstance(value, list) and value[0] == "4"}
    assert readers == {(new_ids[0], "model"), (new_ids[0], "clip"), ("8", "vae"), ("21", "vae")}
    assert result["8"]["inputs"]["vae"] == ["4", 2] and result["21"]["inputs"]["vae"] == ["4", 2]
    validate_graph(result)
    validate_params(result)


def test_injection_ids_are_deterministic_and_skip_non_numeric_ids():
    graph = _graph()
    graph["face:detail"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    graph["²"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    first = inject_loras(graph, _loras(2))
    assert first == inject_loras(graph, _loras(2))
    assert {"10", "11"} <= first.keys()


def test_more_than_max_loras_is_refused_naming_the_count():
    with pytest.raises(GraphError, match=rf"g.json: {MAX_LORAS + 1} LoRAs given; at most {MAX_LORAS}"):
        inject_loras(_graph(), _loras(MAX_LORAS + 1), "g.json")


def test_two_or_no_checkpoint_loaders_are_refused():
    graph = _graph()
    graph["40"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "other.safetensors"}}
    with pytest.raises(GraphError, match=r"exactly one CheckpointLoaderSimple node, found 2 \(nodes 4, 40\)"):
        inject_loras(graph, _loras(1))
    graph = _graph()
    del graph["4"]
    with pytest.raises(GraphError, match="found none"):
        inject_loras(graph, _loras(1))


def test_bad_lora_refs_are_refused():
    with pytest.raises(GraphError, match="no file name"):
        inject_loras(_graph(), [LoraRef("  ")])
    with pytest.raises(ParamError, match="LoRA big.safetensors strength_model = 6"):
        inject_loras(_graph(), [LoraRef("big.safetensors", strength_model=6)])


def test_all_errors_share_the_base_class():
    for error in (TemplateError, GraphError, ParamError):
        assert issubclass(error, WorkflowError) and issubclass(error, ValueError)


# ---------------------------------------------------------------- shipped templates


def test_the_three_templates_are_shipped():
    assert {path.stem for path in SHIPPED} >= {"txt2img_lora", "img2img_refine", "txt2img_pose"}
    assert set(load_templates(WORKFLOWS)) == {path.stem for path in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_template_loads_fills_and_validates_with_two_loras(path):
    template = load_template(path)
    # FLUX.1 Kontext's graph has no negative text: its negative is the positive zeroed (ConditioningZeroOut).
    negative = set() if path.stem == "flux_kontext_edit" else {"negative_prompt"}
    assert {"prompt", "checkpoint", "seed", "steps", "cfg", "sampler", "scheduler",
            "filename_prefix"} | negative <= template.placeholders
    assert not any(node["class_type"].startswith("LoraLoader") for node in template.graph.values())  # LoRAs are injected
    filled = fill_template(template, STANDARD_VALUES)
    validate_graph(filled, template.source)
    validate_params(filled, source=template.source)
    injected = inject_loras(filled, _loras(2), template.source)
    validate_graph(injected, template.source)
    validate_params(injected, source=template.source)
    sampler = next(node for node in injected.values() if node["class_type"] == "KSampler")
    flux = any(node["class_type"] == "UNETLoader" for node in injected.values())
    loader = "LoraLoaderModelOnly" if flux else "LoraLoader"  # FLUX: the LoRA patches the diffusion model alone
    model = sampler["inputs"]["model"][0]
    if injected[model]["class_type"] in ("ModelSamplingAuraFlow", "ModelSamplingSD3"):  # Qwen-Image's, Wan's shift sits after the LoRAs
        model = injected[model]["inputs"]["model"][0]
    assert model in {i for i, n in injected.items() if n["class_type"] == loader}
    assert len([n for n in injected.values() if n["class_type"] == loader]) == 2
    if any(n["class_type"] == "FluxGuidance" for n in injected.values()):
        # cfg is FLUX's distilled guidance, on the positive prompt; the sampler itself runs at cfg 1
        guidance = injected[sampler["inputs"]["positive"][0]]
        assert guidance["class_type"] == "FluxGuidance" and guidance["inputs"]["guidance"] == 7.0
        assert sampler["inputs"]["cfg"] == 1.0
    else:
        assert sampler["inputs"]["cfg"] == 7.0
    assert type(sampler["inputs"]["seed"]) is int
    assert save_image_nodes(injected)
    assert all(isinstance(node_id, str) and node_id.isdigit() for node_id in injected)


def test_img2img_refine_encodes_the_parent_and_follows_its_size():
    template = load_template(WORKFLOWS / "img2img_refine.json")
    assert {"parent_image", "denoise"} <= template.placeholders
    assert not {"width", "height"} & template.placeholders
    filled = fill_template(template, STANDARD_VALUES)
    (load_id,) = load_image_nodes(filled)
    assert filled[load_id]["inputs"]["image"] == STANDARD_VALUES["parent_image"]
    sampler = next(node for node in filled.values() if node["class_type"] == "KSampler")
    encoder = filled[sampler["inputs"]["latent_image"][0]]
    assert encoder["class_type"] == "VAEEncode" and encoder["inputs"]["pixels"] == [load_id, 0]
    assert sampler["inputs"]["denoise"] == STANDARD_VALUES["denoise"]
    with pytest.raises(ParamError, match="denoise"):
        validate_params(fill_template(template, {**STANDARD_VALUES, "denoise": 1.2}))


def test_txt2img_pose_feeds_controlnet_into_the_sampler():
    template = load_template(WORKFLOWS / "txt2img_pose.json")
    assert {"pose_image", "controlnet", "control_strength"} <= template.placeholders
    filled = fill_template(template, STANDARD_VALUES)
    sampler = next(node for node in filled.values() if node["class_type"] == "KSampler")
    apply_id = sampler["inputs"]["positive"][0]
    assert sampler["inputs"]["positive"] == [apply_id, 0] and sampler["inputs"]["negative"] == [apply_id, 1]
    apply = filled[apply_id]
    assert apply["class_type"] == "ControlNetApplyAdvanced"
    assert apply["inputs"]["strength"] == CONTROL_STRENGTH_DEFAULT
    assert (apply["inputs"]["start_percent"], apply["inputs"]["end_percent"]) == (0.0, 1.0)
    assert filled[apply["inputs"]["image"][0]]["inputs"]["image"] == STANDARD_VALUES["pose_image"]
    assert filled[apply["inputs"]["control_net"][0]]["class_type"] == "ControlNetLoader"
    # The prompts reach the sampler only through the ControlNet, and still get the LoRA's CLIP.
    injected = inject_loras(filled, _loras(1))
    lora_id = next(i for i, n in injected.items() if n["class_type"] == "LoraLoader")
    for prompt_id in (apply["inputs"]["positive"][0], apply["inputs"]["negative"][0]):
        assert injected[prompt_id]["inputs"]["clip"] == [lora_id, 1]
    with pytest.raises(ParamError, match="strength"):
        validate_params(fill_template(template, {**STANDARD_VALUES, "control_strength": 0.95}))


def test_model_only_injection_on_a_flux_graph_leaves_the_text_encoders_alone():
    template = load_template(WORKFLOWS / "flux_txt2img_lora.json")
    filled = fill_template(template, {**STANDARD_VALUES, "checkpoint": "flux1-dev.safetensors", "sampler": "euler",
                                      "scheduler": "simple", "cfg": 3.5})
    injected = inject_loras(filled, _loras(3))
    chain = [i for i, n in injected.items() if n["class_type"] == "LoraLoaderModelOnly"]
    unet = next(i for i, n in injected.items() if n["class_type"] == "UNETLoader")
    assert [injected[i]["inputs"]["model"] for i in chain] == [[unet, 0], [chain[0], 0], [chain[1], 0]]
    assert [injected[i]["inputs"]["strength_model"] for i in chain] == [0.5, 0.6, 0.7]
    assert all("strength_clip" not in injected[i]["inputs"] for i in chain)
    clip = next(i for i, n in injected.items() if n["class_type"] == "DualCLIPLoader")
    assert all(n["inputs"]["clip"] == [clip, 0] for n in injected.values() if n["class_type"] == "CLIPTextEncode")
    with pytest.raises(ParamError, match=r"FluxGuidance\) input 'guidance'"):
        validate_params(fill_template(template, {**STANDARD_VALUES, "cfg": 12.0}))
    both = {**filled, "90": {"class_type": "UNETLoader", "inputs": {"unet_name": "other.safetensors", "weight_dtype": "default"}}}
    with pytest.raises(GraphError, match="found none and 2 UNETLoader nodes"):
        inject_loras(both, _loras(1))
