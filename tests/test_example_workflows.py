"""example_workflows/: every workflow is well formed against the node definitions.

Torch-only tier: no ComfyUI import. The node definitions come from the snapshot
tests/schemas/node_schemas.json, which the host tier compares with a live ComfyUI
(tests/host/schemas.py says how to regenerate it). A workflow passes when its node
types exist, its widget values fit their inputs (count, type, range, options), its
links agree with the nodes at both ends in id and type, and every required socket is
connected: what the frontend needs to load it and ComfyUI's validator to accept it.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = json.loads((ROOT / "tests" / "schemas" / "node_schemas.json").read_text())["nodes"]
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
FRONTEND_ONLY = {"Note", "MarkdownNote"}
MODEL_EXTENSIONS = (".safetensors", ".ckpt")
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
TOP_LEVEL = ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version")
PACK_PREFIX = "PG_"


def value_problem(spec: dict[str, Any], value: Any) -> str | None:
    """Why ``value`` does not fit the widget input ``spec``, or None when it does."""
    kind = spec["type"]
    if kind == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{value!r} is not an integer"
        if spec.get("step", 1) > 1 and value % spec["step"]:
            return f"{value} is not a multiple of the step {spec['step']}"
    elif kind == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return f"{value!r} is not a finite number"
    elif kind == "BOOLEAN":
        if not isinstance(value, bool):
            return f"{value!r} is not a boolean"
    elif kind == "STRING":
        if not isinstance(value, str):
            return f"{value!r} is not a string"
    elif kind == "COMBO":
        if value in spec["options"]:
            return None
        if "file_list" in spec:
            if isinstance(value, str) and value.endswith(MODEL_EXTENSIONS):
                return None
            return f"{value!r} is neither one of {spec['options']} nor a model file name ({spec['file_list']})"
        return f"{value!r} is not one of the options"
    if "min" in spec and value < spec["min"]:
        return f"{value} is below the minimum {spec['min']}"
    if "max" in spec and value > spec["max"]:
        return f"{value} is above the maximum {spec['max']}"
    return None


def widget_problems(where: str, spec: dict[str, Any], values: list) -> list[str]:
    """``widgets_values`` against the widget inputs in order, with the extra value after control_after_generate."""
    problems = []
    values = list(values)
    for entry in (i for i in spec["inputs"] if i["widget"]):
        if not values:
            return problems + [f"{where}: no widget value for {entry['name']}"]
        problem = value_problem(entry, values.pop(0))
        if problem:
            problems.append(f"{where}.{entry['name']}: {problem}")
        if entry["control_after_generate"]:
            if not values or values[0] not in CONTROL_VALUES:
                problems.append(f"{where}.{entry['name']}: no control_after_generate value after it")
            else:
                values.pop(0)
    if values:
        problems.append(f"{where}: {len(values)} widget value(s) too many: {values}")
    return problems


def workflow_problems(workflow: dict[str, Any], schemas: dict[str, Any] = SCHEMAS) -> list[str]:
    """Everything wrong with a UI-format workflow, as messages; empty when it is well formed."""
    missing = [key for key in TOP_LEVEL if key not in workflow]
    if missing:
        return [f"missing top-level keys {missing}"]
    problems = []
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    if len(nodes) != len(workflow["nodes"]):
        problems.append("node ids are not unique")
    if len(links) != len(workflow["links"]):
        problems.append("link ids are not unique")
    if workflow["last_node_id"] < max(nodes, default=0):
        problems.append(f"last_node_id {workflow['last_node_id']} is below the largest node id {max(nodes)}")
    if workflow["last_link_id"] < max(links, default=0):
        problems.append(f"last_link_id {workflow['last_link_id']} is below the largest link id {max(links)}")

    def socket(node, slot, side):
        """The schema entry of a node's input or output slot (inputs by name: widget inputs sit among them)."""
        entries = node.get(side, [])
        if not 0 <= slot < len(entries):
            return None
        if side == "outputs":
            outputs = schemas[node["type"]]["outputs"]
            return outputs[slot] if slot < len(outputs) else None
        return next((i for i in schemas[node["type"]]["inputs"] if i["name"] == entries[slot]["name"]), None)

    typed = {}
    for node in workflow["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        if node["type"] in FRONTEND_ONLY:
            if node.get("inputs") or node.get("outputs"):
                problems.append(f"{where}: a note has no sockets")
            continue
        if node["type"] not in schemas:
            problems.append(f"{where}: no such node type")
            continue
        typed[node["id"]] = node
        spec = schemas[node["type"]]
        problems += widget_problems(where, spec, node.get("widgets_values", []))
        by_name = {i["name"]: i for i in spec["inputs"]}
        connected = set()
        for slot, entry in enumerate(node.get("inputs", [])):
            known = by_name.get(entry["name"])
            if known is None:
                problems.append(f"{where}: no input named {entry['name']!r}")
                continue
            if entry["type"] != known["type"]:
                problems.append(f"{where}.{entry['name']}: type {entry['type']} but the node takes {known['type']}")
            if known["widget"] and entry.get("widget", {}).get("name") != entry["name"]:
                problems.append(f"{where}.{entry['name']}: a widget input without its widget name")
            if entry.get("link") is not None:
                connected.add(entry["name"])
                link = links.get(entry["link"])
                if link is None or (link[3], link[4]) != (node["id"], slot):
                    problems.append(f"{where}.{entry['name']}: link {entry['link']} does not end here")
        for entry in spec["inputs"]:
            if entry["required"] and not entry["widget"] and entry["name"] not in connected:
                problems.append(f"{where}.{entry['name']}: required input not connected")
        outputs = node.get("outputs", [])
        if [(o["name"], o["type"]) for o in outputs] != [(o["name"], o["type"]) for o in spec["outputs"]]:
            problems.append(f"{where}: outputs {[o['name'] for o in outputs]} differ from the node's")
        for slot, output in enumerate(outputs):
            for link_id in output.get("links") or []:
                link = links.get(link_id)
                if link is None or (link[1], link[2]) != (node["id"], slot):
                    problems.append(f"{where} output {slot}: link {link_id} does not start here")

    for link_id, origin, origin_slot, target, target_slot, kind in workflow["links"]:
        where = f"link {link_id}"
        if origin not in typed or target not in typed:
            problems.append(f"{where}: joins a node that is missing or has no sockets")
            continue
        source = socket(typed[origin], origin_slot, "outputs")
        sink = socket(typed[target], target_slot, "inputs")
        if source is None or sink is None:
            problems.append(f"{where}: slot {origin_slot} -> {target_slot} does not exist")
            continue
        if not (kind == source["type"] == sink["type"]):
            problems.append(f"{where}: type {kind}, from {source['type']} output to {sink['type']} input")
        if link_id not in (typed[origin]["outputs"][origin_slot].get("links") or []):
            problems.append(f"{where}: not listed by its origin's output")
        if typed[target]["inputs"][target_slot].get("link") != link_id:
            problems.append(f"{where}: not the link of its target's input")

    if not any(schemas[node["type"]]["output_node"] for node in typed.values()):
        problems.append("no output node: ComfyUI would not run it")
    return problems


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def by_type(workflow: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [n for n in workflow["nodes"] if n["type"] == kind]


def widgets(node: dict[str, Any]) -> dict[str, Any]:
    """A node's widget values by input name."""
    values, named = list(node["widgets_values"]), {}
    for entry in (i for i in SCHEMAS[node["type"]]["inputs"] if i["widget"]):
        named[entry["name"]] = values.pop(0)
        if entry["control_after_generate"]:
            values.pop(0)
    return named


def origin_of(workflow: dict[str, Any], node: dict[str, Any], input_name: str) -> dict[str, Any] | None:
    (entry,) = [i for i in node["inputs"] if i["name"] == input_name]
    if entry["link"] is None:
        return None
    (link,) = [link for link in workflow["links"] if link[0] == entry["link"]]
    (origin,) = [n for n in workflow["nodes"] if n["id"] == link[1]]
    return origin


def test_there_are_the_three_examples():
    assert {p.name for p in WORKFLOWS} >= {
        "personalization_lora_sampler_custom_advanced.json",
        "personalization_full_checkpoint.json",
        "personalization_ksampler_scheduled_omega.json",
    }


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_fits_the_node_definitions(path):
    assert workflow_problems(load(path)) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_has_a_note_and_an_empty_null_prompt(path):
    workflow = load(path)
    assert by_type(workflow, "Note"), "a Note says what to tune"
    pg = [n for n in workflow["nodes"]
          if n["type"] in ("PG_PersonalizationGuider", "PG_PersonalizationGuidanceModel", "PG_Sweep")]
    (node,) = pg
    if node["type"] != "PG_PersonalizationGuidanceModel":  # the guider and the sweep take null_conditioning
        null = origin_of(workflow, node, "null_conditioning")
    else:
        (sampler,) = by_type(workflow, "KSampler")
        null = origin_of(workflow, sampler, "negative")
    assert null["type"] == "CLIPTextEncode" and widgets(null)["text"] == ""


def test_lora_example_is_two_way_with_sampler_custom_advanced():
    workflow = load(ROOT / "example_workflows" / "personalization_lora_sampler_custom_advanced.json")
    (pair,) = by_type(workflow, "PG_LoadFinetunedPair")
    (guider,) = by_type(workflow, "PG_PersonalizationGuider")
    (weak,) = by_type(workflow, "PG_WeakModelInterpolator")
    (scheduler,) = by_type(workflow, "BasicScheduler")
    assert widgets(pair)["personalization"] == "LoRA" and widgets(pair)["lora_name"].endswith(".safetensors")
    assert widgets(weak)["schedule"] == "constant"
    assert widgets(guider)["estimate"].startswith("two-way")
    assert origin_of(workflow, guider, "negative") is None
    assert origin_of(workflow, scheduler, "model") is pair
    assert by_type(workflow, "SamplerCustomAdvanced")


def test_full_checkpoint_example_is_three_way_with_a_negative():
    workflow = load(ROOT / "example_workflows" / "personalization_full_checkpoint.json")
    (pair,) = by_type(workflow, "PG_LoadFinetunedPair")
    (guider,) = by_type(workflow, "PG_PersonalizationGuider")
    assert widgets(pair)["personalization"] == "fine-tuned checkpoint"
    assert widgets(pair)["finetuned_checkpoint"].endswith(".safetensors")
    assert widgets(guider)["estimate"] == "three-way"
    negative = origin_of(workflow, guider, "negative")
    assert negative["type"] == "CLIPTextEncode" and widgets(negative)["text"]


def test_ksampler_example_schedules_omega():
    workflow = load(ROOT / "example_workflows" / "personalization_ksampler_scheduled_omega.json")
    (weak,) = by_type(workflow, "PG_WeakModelInterpolator")
    (sampler,) = by_type(workflow, "KSampler")
    schedule = widgets(weak)
    assert schedule["schedule"] in ("linear", "cosine") and schedule["omega"] != schedule["omega_end"]
    assert schedule["guidance_start"] <= schedule["guidance_end"]
    assert origin_of(workflow, sampler, "model")["type"] == "PG_PersonalizationGuidanceModel"


def test_pack_widget_defaults_fit_their_ranges():
    pack = {kind: spec for kind, spec in SCHEMAS.items() if kind.startswith(PACK_PREFIX)}
    assert len(pack) >= 4
    for kind, spec in pack.items():
        for entry in spec["inputs"]:
            if entry["widget"] and "default" in entry:
                assert value_problem(entry, entry["default"]) is None, (kind, entry["name"], entry["default"])
                if "min" in entry:
                    assert entry["min"] <= entry["default"] <= entry["max"], (kind, entry["name"])


# Deliberately broken copies of a good workflow, and what the check must say about each.
def _node(workflow, kind):
    return by_type(workflow, kind)[0]


def _set_widget(kind, name, value):
    def mutate(workflow):
        node = _node(workflow, kind)
        index, position = 0, None
        for entry in (i for i in SCHEMAS[kind]["inputs"] if i["widget"]):
            if entry["name"] == name:
                position = index
            index += 2 if entry["control_after_generate"] else 1
        node["widgets_values"][position] = value
    return mutate


def _retype_link(workflow):
    workflow["links"][0][5] = "MODEL"


def _swap_link_target(workflow):
    # The weak model's link now ends at the guidance node's model input: wrong type, and that input's link is another.
    link = next(link for link in workflow["links"] if link[5] == "PG_WEAK_MODEL")
    link[4] = 0


def _disconnect_positive(workflow):
    sampler = _node(workflow, "KSampler")
    entry = next(i for i in sampler["inputs"] if i["name"] == "positive")
    workflow["links"] = [link for link in workflow["links"] if link[0] != entry["link"]]
    for node in workflow["nodes"]:
        for output in node["outputs"]:
            output["links"] = [i for i in output["links"] if i != entry["link"]]
    entry["link"] = None


def _dangling_output_link(workflow):
    _node(workflow, "VAEDecode")["outputs"][0]["links"].append(999)


def _unknown_type(workflow):
    _node(workflow, "VAEDecode")["type"] = "VAEDecodeTurbo"


def _drop_widget_value(workflow):
    _node(workflow, "PG_WeakModelInterpolator")["widgets_values"].pop()


def _drop_seed_control(workflow):
    _node(workflow, "KSampler")["widgets_values"].pop(1)


def _stale_last_link_id(workflow):
    workflow["last_link_id"] = 1


BROKEN = {
    "omega above max": (_set_widget("PG_WeakModelInterpolator", "omega", 1.5), "omega: 1.5 is above the maximum 1.0"),
    "negative cfg": (_set_widget("KSampler", "cfg", -1.0), "cfg: -1.0 is below the minimum 0.0"),
    "steps not int": (_set_widget("KSampler", "steps", 2.5), "steps: 2.5 is not an integer"),
    "width off step": (_set_widget("EmptyLatentImage", "width", 500), "width: 500 is not a multiple of the step 8"),
    "schedule not an option": (_set_widget("PG_WeakModelInterpolator", "schedule", "exponential"),
                               "schedule: 'exponential' is not one of the options"),
    "lora not a model file": (_set_widget("PG_LoadFinetunedPair", "lora_name", "notes.txt"),
                              "lora_name: 'notes.txt' is neither one of ['none'] nor a model file name"),
    "prompt not a string": (_set_widget("CLIPTextEncode", "text", 3), "text: 3 is not a string"),
    "widget value missing": (_drop_widget_value, "no widget value for guidance_end"),
    "seed control missing": (_drop_seed_control, "seed: no control_after_generate value after it"),
    "link type wrong": (_retype_link, "type MODEL, from PG_FINETUNED_PAIR output to PG_FINETUNED_PAIR input"),
    "link to the wrong slot": (_swap_link_target, "from PG_WEAK_MODEL output to MODEL input"),
    "required input disconnected": (_disconnect_positive, "KSampler).positive: required input not connected"),
    "output lists a missing link": (_dangling_output_link, "link 999 does not start here"),
    "unknown node type": (_unknown_type, "(VAEDecodeTurbo): no such node type"),
    "last_link_id stale": (_stale_last_link_id, "last_link_id 1 is below the largest link id"),
}


@pytest.mark.parametrize("name", BROKEN)
def test_broken_copy_is_caught(name):
    mutate, expected = BROKEN[name]
    workflow = copy.deepcopy(load(ROOT / "example_workflows" / "personalization_ksampler_scheduled_omega.json"))
    mutate(workflow)
    problems = workflow_problems(workflow)
    assert any(expected in p for p in problems), problems


def test_files_are_what_the_generator_writes(monkeypatch):
    spec = importlib.util.spec_from_file_location("build_example_workflows", ROOT / "tools" / "build_example_workflows.py")
    generator = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, generator)  # dataclasses look their module up there
    spec.loader.exec_module(generator)
    for name, make in generator.WORKFLOWS.items():
        written = load(ROOT / "example_workflows" / f"{name}.json")
        assert written == generator.build(make(), SCHEMAS), f"{name}.json: run tools/build_example_workflows.py"
