"""The shipped ComfyUI API-format templates are well-formed graphs (the template engine and LoRA
injection that fill them arrive with the generation issue)."""

import json
import re

import pytest

from persona_pipeline_tests.conftest import REPO

TEMPLATES = sorted((REPO / "workflows").glob("*.json"))


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_template_links_point_to_existing_nodes_and_it_saves_an_image(path):
    graph = json.loads(path.read_text())
    assert any(node["class_type"] == "SaveImage" for node in graph.values())
    for node_id, node in graph.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                assert value[0] in graph, f"{path.name}: node {node_id} input {name} links to missing node {value[0]}"
                assert isinstance(value[1], int)
    placeholders = set(re.findall(r"{{(\w+)}}", path.read_text()))
    assert {"prompt", "seed", "steps", "cfg", "sampler", "scheduler"} <= placeholders


def test_the_candidates_workflow_name_is_a_shipped_template():
    from persona_pipeline.assets.candidates import WORKFLOW

    assert (REPO / "workflows" / f"{WORKFLOW}.json") in TEMPLATES
