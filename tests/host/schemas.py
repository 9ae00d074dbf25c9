"""Node definitions as the frontend sees them, read from a live ComfyUI; the snapshot in tests/schemas/.

``tests/schemas/node_schemas.json`` records, for every node type the example
workflows use (and every node of this pack), the inputs in the order the frontend
lays out widgets, with their types, ranges and options, and the outputs. The
torch-only test ``tests/test_example_workflows.py`` checks the workflows against it
without ComfyUI; the host test checks that it still equals what ComfyUI reports.

Combos whose options are a model folder's files (checkpoints, LoRAs) are recorded
as ``"file_list": <folder>`` plus their fixed options (such as "none"), so the
snapshot names no model file. Telling them apart needs the model folders to hold
files, as they do under the ``tiny_files`` fixture.

Regenerate after changing a node's inputs or a workflow's node types:

    PG_WRITE_SCHEMAS=1 COMFYUI_PATH=/path/to/ComfyUI python -m pytest \\
        tests/host/test_example_workflows_host.py -k snapshot -p no:cacheprovider
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PACK_DIR = Path(__file__).resolve().parents[2]
SNAPSHOT_PATH = PACK_DIR / "tests" / "schemas" / "node_schemas.json"
WORKFLOWS_DIR = PACK_DIR / "example_workflows"

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
)

# Input types the frontend shows as a widget (unless the input says forceInput).
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
# The options of a widget that the snapshot keeps; tooltips and display hints are left out.
KEPT_OPTIONS = ("default", "min", "max", "step", "round", "multiline", "control_after_generate")


def parse_input(name: str, spec: tuple, required: bool) -> dict[str, Any]:
    """One entry of INPUT_TYPES, normalized: V1 list-typed combos and V3 ``COMBO`` look the same."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    entry: dict[str, Any] = {"name": name, "required": required}
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


def inputs_of(node_class) -> list[dict[str, Any]]:
    """The node's inputs, required then optional, in declaration order (the frontend's widget order)."""
    spec = node_class.INPUT_TYPES()
    return [
        parse_input(name, value, section == "required")
        for section in ("required", "optional")
        for name, value in spec.get(section, {}).items()
    ]


def outputs_of(node_class) -> list[dict[str, str]]:
    types = list(node_class.RETURN_TYPES)
    names = list(getattr(node_class, "RETURN_NAMES", None) or types)
    return [{"name": name, "type": kind if isinstance(kind, str) else "COMBO"} for name, kind in zip(names, types, strict=True)]


def _mark_file_lists(entry: dict[str, Any], folder_files: dict[str, list[str]]) -> None:
    """Replace a combo's model-file options by the folder they come from, keeping the fixed ones."""
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
    import folder_paths

    import nodes

    folder_files = {
        folder: folder_paths.get_filename_list(folder)
        for folder in ("checkpoints", "loras", "vae", "diffusion_models", "text_encoders", "embeddings")
    }
    return {
        "about": "Node definitions as ComfyUI reports them, for tests/test_example_workflows.py. "
        "Generated by tests/host/schemas.py; see its docstring to regenerate. Do not edit by hand.",
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
    return "{\n" + f" \"about\": {json.dumps(snapshot['about'])},\n \"nodes\": {{\n" + ",\n".join(nodes) + "\n }\n}\n"


def load() -> dict[str, Any]:
    return json.loads(SNAPSHOT_PATH.read_text())
