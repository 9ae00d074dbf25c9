"""Node definitions as the frontend sees them, read from a live ComfyUI; the snapshot in tests/schemas/.

``tests/schemas/node_schemas.json`` records, for every node type the example
workflows use (and every node of this pack), the inputs in the order the frontend
lays out widgets, with their types, ranges and options, and the outputs. The
torch-only tests (``tests/test_example_workflows.py``) and the workflow generator
(``tools/build_example_workflows.py``) work from it without ComfyUI; the host tier
checks it against the ComfyUI it runs on.

A DynamicCombo input (``COMFY_DYNAMICCOMBO_V3``) is recorded with ``modes``: per
option key, the inputs that option adds. The frontend shows them right after the
combo, named ``<combo>.<input>``, and stores their widget values right after the
combo's own value; ``node_inputs`` walks a node's inputs that way.

Combos whose options are a model folder's files (checkpoints, LoRAs) are recorded
as ``"file_list": <folder>`` plus their fixed options (such as "none"), so the
snapshot names no model file. Telling them apart needs the model folders to hold
files, as they do under the ``tiny_files`` and ``family_folders`` fixtures.

The snapshot is written from the oldest ComfyUI the pack supports (v0.8.0), whose
version it records. Regenerate it there after changing a node's inputs or a
workflow's node types:

    PG_WRITE_SCHEMAS=1 COMFYUI_PATH=/path/to/ComfyUI-v0.8.0 python -m pytest \\
        tests/host/test_example_workflows_host.py -k snapshot -p no:cacheprovider

This module imports nothing from ComfyUI at import time; the torch-only tests and
the generator load it by path.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACK_DIR = Path(__file__).resolve().parents[2]
SNAPSHOT_PATH = PACK_DIR / "tests" / "schemas" / "node_schemas.json"
WORKFLOWS_DIR = PACK_DIR / "example_workflows"
PACK_PREFIX = "PG_"

# Nodes that exist only in the frontend: no definition in ComfyUI, never sent to the server.
FRONTEND_ONLY = frozenset({"Note", "MarkdownNote"})

# Stock nodes that the example workflows use (the workflows' own types are added to these).
STOCK_NODE_TYPES = (
    "CLIPTextEncode",
    "EmptyLatentImage",
    "RandomNoise",
    "KSamplerSelect",
    "BasicScheduler",
    "SamplerCustomAdvanced",
    "KSampler",
    "VAEDecode",
    "SaveImage",
    # Diffusion transformers (the SDXL, Qwen-Image and Wan examples): their text encoder, VAE, sampling shift,
    # latents and video output.
    "CLIPLoader",
    "VAELoader",
    "ModelSamplingAuraFlow",
    "ModelSamplingSD3",
    "EmptySD3LatentImage",
    "EmptyHunyuanLatentVideo",
    "SaveAnimatedWEBP",
)

DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
# Input types the frontend shows as a widget (unless the input says forceInput).
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", DYNAMIC_COMBO})
# The value the frontend stores after a control_after_generate widget's own.
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
# The options of a widget that the snapshot keeps; tooltips and display hints are left out.
KEPT_OPTIONS = ("default", "min", "max", "step", "round", "multiline", "control_after_generate")


def parse_input(name: str, spec: tuple, required: bool) -> dict[str, Any]:
    """One entry of INPUT_TYPES, normalized: V1 list-typed combos and V3 ``COMBO`` look the same."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    entry: dict[str, Any] = {"name": name, "required": required}
    if kind == DYNAMIC_COMBO:
        entry.update(type=kind, widget=True,
                     modes={option["key"]: parse_inputs(option["inputs"]) for option in options["options"]})
        return entry
    if isinstance(kind, (list, tuple)):
        entry["type"] = "COMBO"
        entry["options"] = list(kind)
    else:
        entry["type"] = kind
        if kind == "COMBO":
            entry["options"] = list(options.get("options", []))
    entry["widget"] = entry["type"] in WIDGET_TYPES and not options.get("forceInput", False)
    if entry["widget"]:
        for key in KEPT_OPTIONS:
            if key in options:
                entry[key] = options[key]
        entry["control_after_generate"] = bool(options.get("control_after_generate", False))
    return entry


def parse_inputs(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """An INPUT_TYPES dict's inputs, required then optional, in declaration order (the frontend's order)."""
    return [
        parse_input(name, value, section == "required")
        for section in ("required", "optional")
        for name, value in spec.get(section, {}).items()
    ]


def inputs_of(node_class) -> list[dict[str, Any]]:
    return parse_inputs(node_class.INPUT_TYPES())


def outputs_of(node_class) -> list[dict[str, str]]:
    types = list(node_class.RETURN_TYPES)
    names = list(getattr(node_class, "RETURN_NAMES", None) or types)
    return [{"name": name, "type": kind if isinstance(kind, str) else "COMBO"} for name, kind in zip(names, types, strict=True)]


# ------------------------------------------------------------------------------------ a node's inputs, walked


@dataclass(frozen=True)
class NodeInput:
    """One input a node shows for its widget values: its full name (``estimate.negative``) and its entry."""

    name: str
    entry: dict[str, Any]
    value: Any = None  # a widget's value; None for a socket

    @property
    def widget(self) -> bool:
        return self.entry["widget"]


class WidgetValuesError(ValueError):
    """The widget values do not fit the node's inputs (too few, or a DynamicCombo key it does not have)."""


def node_inputs(entries: list[dict[str, Any]], values: list, prefix: str = "") -> Iterator[NodeInput]:
    """The inputs a node shows, in the frontend's order, each widget with its value taken from ``values``.

    ``values`` is the node's ``widgets_values`` and is consumed: what remains afterwards is left over. The
    extra value after a ``control_after_generate`` widget ("fixed", "randomize", ...) is skipped. A
    DynamicCombo's value is its key; the inputs of that option follow it, named ``<combo>.<input>``.
    """
    for entry in entries:
        name = prefix + entry["name"]
        if not entry["widget"]:
            yield NodeInput(name, entry)
            continue
        if not values:
            raise WidgetValuesError(f"no widget value for {name}")
        value = values.pop(0)
        yield NodeInput(name, entry, value)
        if entry.get("control_after_generate"):
            if not values or values[0] not in CONTROL_VALUES:
                raise WidgetValuesError(f"{name}: no control_after_generate value after it")
            values.pop(0)
        if entry["type"] == DYNAMIC_COMBO:
            if value not in entry["modes"]:
                raise WidgetValuesError(f"{name}: {value!r} is not one of {list(entry['modes'])}")
            yield from node_inputs(entry["modes"][value], values, name + ".")


# ------------------------------------------------------------------------------------------- the snapshot


def _mark_file_lists(entry: dict[str, Any], folder_files: dict[str, list[str]]) -> None:
    """Replace a combo's model-file options by the folder they come from, keeping the fixed ones."""
    for children in entry.get("modes", {}).values():
        for child in children:
            _mark_file_lists(child, folder_files)
    if entry["type"] != "COMBO":
        return
    options = entry["options"]
    matches = [folder for folder, files in folder_files.items() if files and set(files) <= set(options)]
    if not matches:
        if not options:
            raise ValueError(f"{entry['name']} has no options: put a model file in its folder to tell which it lists")
        return
    folder = max(matches, key=lambda f: len(folder_files[f]))
    entry["file_list"] = folder
    entry["options"] = [o for o in options if o not in folder_files[folder]]


def node_schema(node_class, folder_files: dict[str, list[str]]) -> dict[str, Any]:
    inputs = inputs_of(node_class)
    for entry in inputs:
        _mark_file_lists(entry, folder_files)
    return {
        "inputs": inputs,
        "outputs": outputs_of(node_class),
        "output_node": bool(getattr(node_class, "OUTPUT_NODE", False)),
    }


def workflow_node_types(workflows_dir: Path = WORKFLOWS_DIR) -> set[str]:
    types = set()
    for path in sorted(workflows_dir.glob("*.json")):
        types |= {node["type"] for node in json.loads(path.read_text())["nodes"]}
    return types - FRONTEND_ONLY


def snapshot_node_types(pack) -> list[str]:
    """The pack's nodes, the stock nodes listed above, and whatever else the example workflows use."""
    pack_types = [node.define_schema().node_id for node in pack.nodes.NODES]
    return sorted(set(pack_types) | set(STOCK_NODE_TYPES) | workflow_node_types())


def build(node_types: list[str]) -> dict[str, Any]:
    """The snapshot of ``node_types`` from the live ComfyUI (which must be imported and initialized)."""
    import comfyui_version
    import folder_paths

    import nodes

    folder_files = {
        folder: folder_paths.get_filename_list(folder)
        for folder in ("checkpoints", "loras", "vae", "diffusion_models", "text_encoders", "embeddings")
    }
    return {
        "about": "Node definitions as ComfyUI reports them, for tests/test_example_workflows.py and "
        "tools/build_example_workflows.py. Generated by tests/host/schemas.py; see its docstring to regenerate. "
        "Do not edit by hand.",
        "comfyui_version": comfyui_version.__version__,
        "nodes": {t: node_schema(nodes.NODE_CLASS_MAPPINGS[t], folder_files) for t in node_types},
    }


def dumps(snapshot: dict[str, Any]) -> str:
    """JSON with one line per input and output, so that a regenerated snapshot diffs readably."""
    nodes = []
    for kind, node in snapshot["nodes"].items():
        inputs, outputs = (
            "[" + ",".join(f"\n    {json.dumps(item)}" for item in node[key]) + ("\n   ]" if node[key] else "]")
            for key in ("inputs", "outputs")
        )
        nodes.append(
            f"  {json.dumps(kind)}: {{\n   \"inputs\": {inputs},\n   \"outputs\": {outputs},\n"
            f"   \"output_node\": {json.dumps(node['output_node'])}\n  }}"
        )
    head = f" \"about\": {json.dumps(snapshot['about'])},\n \"comfyui_version\": {json.dumps(snapshot['comfyui_version'])},\n"
    return "{\n" + head + " \"nodes\": {\n" + ",\n".join(nodes) + "\n }\n}\n"


def load() -> dict[str, Any]:
    return json.loads(SNAPSHOT_PATH.read_text())


# ------------------------------------------------------------------------- tooltips of a DynamicCombo's inputs

LOCALE_PATH = PACK_DIR / "locales" / "en" / "nodeDefs.json"


def _collect_tooltips(kind: str, spec: dict, prefix: str, found: dict[str, str]) -> None:
    """The tooltips of the inputs under DynamicCombos in ``spec``, by full name, into ``found``."""
    for section in ("required", "optional"):
        for name, (io_type, *rest) in spec.get(section, {}).items():
            options = rest[0] if rest and isinstance(rest[0], dict) else {}
            full = prefix + name
            if prefix and options.get("tooltip"):
                if found.setdefault(full, options["tooltip"]) != options["tooltip"]:
                    raise ValueError(f"{kind}.{full} has two tooltips; a translation key holds one")
            if io_type == DYNAMIC_COMBO:
                for option in options["options"]:
                    _collect_tooltips(kind, option["inputs"], full + ".", found)


def dynamic_input_tooltips(node_classes: dict[str, Any]) -> dict[str, Any]:
    """The frontend's translation entries that give a DynamicCombo's inputs their tooltips.

    The frontends of v0.8.0 and 0.33 look a hovered input's tooltip up by its full name (``estimate.negative``)
    in the node definition, which lists the combo alone, and then in the translations, under
    ``nodeDefs.<node>.inputs.<full name with "_" for ".">.tooltip``; ComfyUI serves these from the pack's
    ``locales/<language>/nodeDefs.json``. One name has one tooltip in every option that shows it.
    """
    out: dict[str, Any] = {}
    for kind, node_class in sorted(node_classes.items()):
        found: dict[str, str] = {}
        _collect_tooltips(kind, node_class.INPUT_TYPES(), "", found)
        if found:
            out[kind] = {"inputs": {key.replace(".", "_"): {"tooltip": text} for key, text in sorted(found.items())}}
    return out


# ------------------------------------------------------------------------------------------- workflow checks

MODEL_EXTENSIONS = (".safetensors", ".ckpt")
TOP_LEVEL = ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version")


def value_problem(spec: dict[str, Any], value: Any) -> str | None:
    """Why ``value`` does not fit the widget input ``spec``, or None when it does."""
    kind = spec["type"]
    if kind == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{value!r} is not an integer"
        step = spec.get("step", 1)
        offset = spec.get("min", 0) % step  # the frontend rounds to the steps counted from the minimum's offset
        if step > 1 and (value - offset) % step:
            return f"{value} is not {f'{offset} plus ' if offset else ''}a multiple of the step {step}"
    elif kind == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return f"{value!r} is not a finite number"
    elif kind == "BOOLEAN":
        if not isinstance(value, bool):
            return f"{value!r} is not a boolean"
    elif kind == "STRING":
        if not isinstance(value, str):
            return f"{value!r} is not a string"
    elif kind == DYNAMIC_COMBO:
        return None if value in spec["modes"] else f"{value!r} is not one of the options"
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


def shown_inputs(where: str, spec: dict[str, Any], values: list) -> tuple[list[NodeInput], list[str]]:
    """The inputs a node shows for its ``widgets_values``, and what is wrong with those values."""
    values = list(values)
    shown: list[NodeInput] = []
    problems = []
    walk = node_inputs(spec["inputs"], values)
    while True:
        try:
            item = next(walk)
        except StopIteration:
            break
        except WidgetValuesError as error:
            return shown, problems + [f"{where}: {error}"]
        shown.append(item)
        if item.widget:
            problem = value_problem(item.entry, item.value)
            if problem:
                problems.append(f"{where}.{item.name}: {problem}")
    if values:
        problems.append(f"{where}: {len(values)} widget value(s) too many: {values}")
    return shown, problems


def workflow_problems(workflow: dict[str, Any], schemas: dict[str, Any]) -> list[str]:
    """Everything wrong with a UI-format workflow against the node definitions ``schemas``; empty when it is well
    formed. A node may have more outputs than the workflow lists (a newer ComfyUI's), not fewer or others."""
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

    typed, inputs_by_node = {}, {}
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
        shown, widget_errors = shown_inputs(where, spec, node.get("widgets_values", []))
        problems += widget_errors
        by_name = {item.name: item.entry for item in shown}
        inputs_by_node[node["id"]] = by_name
        connected = set()
        listed = [entry["name"] for entry in node.get("inputs", [])]
        if sorted(listed) != sorted(by_name) and not widget_errors:
            problems.append(f"{where}: lists inputs {listed}, but shows {list(by_name)} for its widget values")
        for slot, entry in enumerate(node.get("inputs", [])):
            known = by_name.get(entry["name"])
            if known is None:
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
        for name, known in by_name.items():
            if known["required"] and not known["widget"] and name not in connected:
                problems.append(f"{where}.{name}: required input not connected")
        outputs = node.get("outputs", [])
        ours = [(o["name"], o["type"]) for o in spec["outputs"]]
        if [(o["name"], o["type"]) for o in outputs] != ours[: len(outputs)]:
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
        outputs, inputs = typed[origin].get("outputs", []), typed[target].get("inputs", [])
        source_spec = schemas[typed[origin]["type"]]["outputs"]
        if not (0 <= origin_slot < min(len(outputs), len(source_spec))) or not 0 <= target_slot < len(inputs):
            problems.append(f"{where}: slot {origin_slot} -> {target_slot} does not exist")
            continue
        source = source_spec[origin_slot]
        sink = inputs_by_node[target].get(inputs[target_slot]["name"])
        if sink is None:
            problems.append(f"{where}: ends at {inputs[target_slot]['name']!r}, which the node does not show")
            continue
        if not (kind == source["type"] == sink["type"]):
            problems.append(f"{where}: type {kind}, from {source['type']} output to {sink['type']} input")
        if link_id not in (outputs[origin_slot].get("links") or []):
            problems.append(f"{where}: not listed by its origin's output")
        if inputs[target_slot].get("link") != link_id:
            problems.append(f"{where}: not the link of its target's input")

    if not any(schemas[node["type"]]["output_node"] for node in typed.values()):
        problems.append("no output node: ComfyUI would not run it")
    return problems
