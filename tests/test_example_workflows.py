"""example_workflows/: every workflow is well formed against the node definitions, and shows what it claims.

Torch-only tier: no ComfyUI import. The node definitions come from the snapshot
tests/schemas/node_schemas.json, which the host tier compares with a live ComfyUI
(tests/host/schemas.py says how to regenerate it, and holds the checks). A workflow
passes when its node types exist, its widget values fit the inputs its nodes show
(count, type, range, options, and the inputs each DynamicCombo option adds), its
links agree with the nodes at both ends in id and type, and every required socket
is connected: what the frontend needs to load it and ComfyUI's validator to accept
it. tools/frontend_check.mjs checks the rest in the frontends themselves.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)  # dataclasses look their module up there
    spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


node_schemas = _load_module("pg_node_schemas", ROOT / "tests" / "host" / "schemas.py")
SCHEMAS = node_schemas.load()["nodes"]
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
PACK_PREFIX = node_schemas.PACK_PREFIX
value_problem = node_schemas.value_problem


def workflow_problems(workflow: dict[str, Any], schemas: dict[str, Any] = SCHEMAS) -> list[str]:
    return node_schemas.workflow_problems(workflow, schemas)


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def by_type(workflow: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [n for n in workflow["nodes"] if n["type"] == kind]


def widgets(node: dict[str, Any]) -> dict[str, Any]:
    """A node's widget values by input name (a DynamicCombo's inputs as ``<combo>.<input>``)."""
    shown = node_schemas.node_inputs(SCHEMAS[node["type"]]["inputs"], list(node["widgets_values"]))
    return {item.name: item.value for item in shown if item.widget}


def example(title_start: str) -> dict[str, Any]:
    (path,) = [p for p in WORKFLOWS if p.stem.startswith(title_start)]
    return load(path)


def origin_of(workflow: dict[str, Any], node: dict[str, Any], input_name: str) -> dict[str, Any] | None:
    (entry,) = [i for i in node["inputs"] if i["name"] == input_name]
    if entry["link"] is None:
        return None
    (link,) = [link for link in workflow["links"] if link[0] == entry["link"]]
    (origin,) = [n for n in workflow["nodes"] if n["id"] == link[1]]
    return origin


def test_there_are_the_examples_and_thumbnails():
    assert {p.stem for p in WORKFLOWS} >= {
        "LoRA pair, two-way guider",
        "DreamBooth pair, three-way with a negative prompt",
        "KSampler, omega rising over the run",
        "SDXL LoRA pair, two-way guider",
        "Qwen-Image LoRA pair, two-way guider",
        "Wan 2.1 text to video, LoRA pair",
    }
    # The template browser asks for <name>.jpg beside each workflow for its card.
    for path in WORKFLOWS:
        thumbnail = path.with_suffix(".jpg")
        assert thumbnail.is_file() and thumbnail.read_bytes()[:3] == b"\xff\xd8\xff", f"{thumbnail.name}: no JPEG"


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
    workflow = example("LoRA pair, two-way")
    (pair,) = by_type(workflow, "PG_LoadFinetunedPair")
    (guider,) = by_type(workflow, "PG_PersonalizationGuider")
    (weak,) = by_type(workflow, "PG_WeakModelInterpolator")
    (scheduler,) = by_type(workflow, "BasicScheduler")
    assert widgets(pair)["personalization"] == "LoRA"
    assert widgets(pair)["personalization.lora_name"].endswith(".safetensors")
    assert "personalization.finetuned_checkpoint" not in widgets(pair)
    assert widgets(weak)["schedule"] == "constant" and "schedule.omega_end" not in widgets(weak)
    assert widgets(guider)["estimate"].startswith("two-way")
    assert set(widgets(guider)) == {"estimate", "estimate.guidance_scale"}  # two-way shows lambda only
    assert "estimate.negative" not in {i["name"] for i in guider["inputs"]}
    assert origin_of(workflow, scheduler, "model") is pair
    assert by_type(workflow, "SamplerCustomAdvanced")


def test_full_checkpoint_example_is_three_way_with_a_negative():
    workflow = example("DreamBooth pair")
    (pair,) = by_type(workflow, "PG_LoadFinetunedPair")
    (guider,) = by_type(workflow, "PG_PersonalizationGuider")
    assert widgets(pair)["personalization"] == "fine-tuned checkpoint"
    assert widgets(pair)["personalization.finetuned_checkpoint"].endswith(".safetensors")
    assert widgets(pair)["personalization.finetuned_checkpoint"] != widgets(pair)["base_checkpoint"]
    assert "personalization.lora_name" not in widgets(pair)
    assert widgets(guider)["estimate"] == "three-way"
    negative = origin_of(workflow, guider, "estimate.negative")
    assert negative["type"] == "CLIPTextEncode" and widgets(negative)["text"]


def test_ksampler_example_schedules_omega():
    workflow = example("KSampler")
    (weak,) = by_type(workflow, "PG_WeakModelInterpolator")
    (sampler,) = by_type(workflow, "KSampler")
    (patch,) = by_type(workflow, "PG_PersonalizationGuidanceModel")
    schedule = widgets(weak)
    assert schedule["schedule"] in ("linear", "cosine")
    assert schedule["schedule.omega"] != schedule["schedule.omega_end"]
    assert schedule["guidance_start"] <= schedule["guidance_end"]
    assert origin_of(workflow, sampler, "model") is patch and widgets(patch) == {"estimate": "two-way (paper)"}


def test_sdxl_example_is_a_checkpoint_lora_pair_at_sdxl_size():
    workflow = example("SDXL LoRA pair")
    (pair,) = by_type(workflow, "PG_LoadFinetunedPair")
    (guider,) = by_type(workflow, "PG_PersonalizationGuider")
    (latent,) = by_type(workflow, "EmptyLatentImage")
    assert widgets(pair)["personalization"] == "LoRA" and "sd_xl" in widgets(pair)["base_checkpoint"]
    assert widgets(guider)["estimate"].startswith("two-way")
    assert (widgets(latent)["width"], widgets(latent)["height"]) == (1024, 1024)
    for name in ("positive", "null_conditioning"):
        assert origin_of(workflow, origin_of(workflow, guider, name), "clip") is pair


def _model_chain(workflow, node):
    """The node types along ``node``'s model input, back to the loader."""
    chain = []
    while any(i["name"] == "model" for i in node["inputs"]):
        node = origin_of(workflow, node, "model")
        chain.append(node["type"])
    return chain


@pytest.mark.parametrize(("title_start", "clip_type", "shift"), [
    ("Qwen-Image", "qwen_image", "ModelSamplingAuraFlow"), ("Wan 2.1", "wan", "ModelSamplingSD3")])
def test_diffusion_transformer_examples_load_as_the_family_templates_do(title_start, clip_type, shift):
    """Base and LoRA from the diffusion-model pair loader; text encoder and VAE from the stock loaders; the family's
    sampling shift between the pair's fine-tuned model and the guidance; both prompts from the one text encoder."""
    workflow = example(title_start)
    (pair,) = by_type(workflow, "PG_LoadDiffusionModelPair")
    (clip,) = by_type(workflow, "CLIPLoader")
    (decode,) = by_type(workflow, "VAEDecode")
    assert widgets(pair)["personalization"] == "LoRA" and widgets(pair)["weight_dtype"] == "default"
    assert widgets(clip)["type"] == clip_type
    assert origin_of(workflow, decode, "vae")["type"] == "VAELoader"
    (weak,) = by_type(workflow, "PG_WeakModelInterpolator")
    assert origin_of(workflow, weak, "pair") is pair and widgets(weak)["schedule.omega"] == 0.5
    (guided,) = by_type(workflow, "PG_PersonalizationGuider") or by_type(workflow, "KSampler")
    assert _model_chain(workflow, guided)[-2:] == [shift, "PG_LoadDiffusionModelPair"]
    for node in by_type(workflow, "CLIPTextEncode"):
        assert origin_of(workflow, node, "clip") is clip


def test_wan_example_samples_a_video_with_the_ksampler_patch():
    workflow = example("Wan 2.1")
    (sampler,) = by_type(workflow, "KSampler")
    (latent,) = by_type(workflow, "EmptyHunyuanLatentVideo")
    (save,) = by_type(workflow, "SaveAnimatedWEBP")
    assert _model_chain(workflow, sampler) == ["PG_PersonalizationGuidanceModel", "ModelSamplingSD3",
                                               "PG_LoadDiffusionModelPair"]
    assert (widgets(latent)["length"] - 1) % 4 == 0  # Wan's VAE takes 4k+1 frames
    assert origin_of(workflow, save, "images")["type"] == "VAEDecode"


def test_an_int_step_counts_from_the_minimum():
    """The frontends round an INT to min % step plus a multiple of step (a video's 4k+1 frames)."""
    (length,) = [i for i in SCHEMAS["EmptyHunyuanLatentVideo"]["inputs"] if i["name"] == "length"]
    assert (length["min"], length["step"]) == (1, 4)
    assert value_problem(length, 33) is None
    assert value_problem(length, 32) == "32 is not 1 plus a multiple of the step 4"


def test_pack_widget_defaults_fit_their_ranges():
    pack = {kind: spec for kind, spec in SCHEMAS.items() if kind.startswith(PACK_PREFIX)}
    assert len(pack) >= 9

    def entries(inputs):
        for entry in inputs:
            yield entry
            for children in entry.get("modes", {}).values():
                yield from entries(children)

    for kind, spec in pack.items():
        for entry in entries(spec["inputs"]):
            if entry["widget"] and "default" in entry:
                assert value_problem(entry, entry["default"]) is None, (kind, entry["name"], entry["default"])
                if "min" in entry:
                    assert entry["min"] <= entry["default"] <= entry["max"], (kind, entry["name"])


def test_nodes_do_not_overlap_as_saved():
    """The saved boxes (title included) are apart; tools/frontend_check.mjs checks the boxes the frontends draw."""
    for path in WORKFLOWS:
        boxes = [(n["id"], n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
                 for n in load(path)["nodes"]]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert not (a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]), (path.name, a[0], b[0])


# Deliberately broken copies of a good workflow, and what the check must say about each.
def _node(workflow, kind):
    return by_type(workflow, kind)[0]


def _set_widget(kind, name, value):
    """Set the widget ``name`` (a full name: ``schedule.omega``) in the node's widgets_values."""
    def mutate(workflow):
        node = _node(workflow, kind)
        values = list(node["widgets_values"])
        for item in node_schemas.node_inputs(SCHEMAS[kind]["inputs"], values):
            if item.name == name:
                position = len(node["widgets_values"]) - len(values) - 1 - (1 if item.entry.get("control_after_generate") else 0)
                break
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


def _negative_in_two_way(workflow):
    # A negative prompt linked to the KSampler patch's estimate in two-way, which shows no such socket.
    patch = _node(workflow, "PG_PersonalizationGuidanceModel")
    patch["inputs"].append({"name": "estimate.null_conditioning", "type": "CONDITIONING", "link": 99})
    workflow["links"].append([99, 4, 0, patch["id"], len(patch["inputs"]) - 1, "CONDITIONING"])


BROKEN = {
    "omega above max": (_set_widget("PG_WeakModelInterpolator", "schedule.omega", 1.5),
                        "schedule.omega: 1.5 is above the maximum 1.0"),
    "negative cfg": (_set_widget("KSampler", "cfg", -1.0), "cfg: -1.0 is below the minimum 0.0"),
    "steps not int": (_set_widget("KSampler", "steps", 2.5), "steps: 2.5 is not an integer"),
    "width off step": (_set_widget("EmptyLatentImage", "width", 500), "width: 500 is not a multiple of the step 8"),
    "schedule not an option": (_set_widget("PG_WeakModelInterpolator", "schedule", "exponential"),
                               "schedule: 'exponential' is not one of"),
    "lora not a model file": (_set_widget("PG_LoadFinetunedPair", "personalization.lora_name", "notes.txt"),
                              "personalization.lora_name: 'notes.txt' is neither one of [] nor a model file name"),
    "input of another mode": (_negative_in_two_way, "ends at 'estimate.null_conditioning', which the node does not show"),
    "prompt not a string": (_set_widget("CLIPTextEncode", "text", 3), "text: 3 is not a string"),
    "widget value missing": (_drop_widget_value, "no widget value for per_block"),
    # The cosine schedule's values read as the constant one's: they shift onto the inputs after it.
    "values of another mode": (_set_widget("PG_WeakModelInterpolator", "schedule", "constant"),
                               "per_block: 0.8 is not one of the options"),
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
    workflow = copy.deepcopy(example("KSampler"))
    mutate(workflow)
    problems = workflow_problems(workflow)
    assert any(expected in p for p in problems), problems


def test_files_are_what_the_generator_writes(monkeypatch):
    spec = importlib.util.spec_from_file_location("build_example_workflows", ROOT / "tools" / "build_example_workflows.py")
    generator = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, generator)  # dataclasses look their module up there
    spec.loader.exec_module(generator)
    assert {generator.file_of(make()).name for make in generator.WORKFLOWS.values()} == {p.name for p in WORKFLOWS}
    for make in generator.WORKFLOWS.values():
        workflow = make()
        written = load(generator.file_of(workflow))
        assert written == generator.build(workflow, SCHEMAS), f"{workflow.title}: run tools/build_example_workflows.py"
