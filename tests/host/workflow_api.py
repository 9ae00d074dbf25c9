"""A UI-format workflow (what the frontend saves) to ComfyUI's API prompt format, with the live node definitions.

What the frontend does when it queues a workflow, for the plain graphs our examples
are: frontend-only nodes (notes) are left out; each node's ``widgets_values`` are
given, in order, to its widget inputs (the extra "fixed"/"randomize" value after a
``control_after_generate`` input is skipped); a linked input becomes
``[origin node id, origin slot]``. Groups, subgraphs, reroutes and muted or bypassed
nodes are not supported and raise.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

from schemas import FRONTEND_ONLY, inputs_of

# Per node type, per input name: a value, or a function of the workflow's value.
Overrides = Mapping[str, Mapping[str, Any | Callable[[Any], Any]]]


def to_api(workflow: dict[str, Any], overrides: Overrides | None = None) -> dict[str, dict[str, Any]]:
    """The API prompt of ``workflow``; ``overrides`` replaces widget values by node type (model names, steps)."""
    import nodes

    overrides = overrides or {}
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in FRONTEND_ONLY:
            continue
        if node.get("mode", 0) != 0:
            raise NotImplementedError(f"node {node['id']} ({kind}) is muted or bypassed")
        if kind not in nodes.NODE_CLASS_MAPPINGS:
            raise KeyError(f"node {node['id']}: ComfyUI has no node type {kind!r}")
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs: dict[str, Any] = {}
        for spec in inputs_of(nodes.NODE_CLASS_MAPPINGS[kind]):
            name = spec["name"]
            if spec["widget"]:
                if not values:
                    raise ValueError(f"node {node['id']} ({kind}): no widget value left for {name!r}")
                inputs[name] = values.pop(0)
                if spec["control_after_generate"]:
                    values.pop(0)
            if name in linked:
                link = links[linked[name]]
                inputs[name] = [str(link[1]), link[2]]
        if values:
            raise ValueError(f"node {node['id']} ({kind}): {len(values)} widget value(s) left over: {values}")
        for name, value in overrides.get(kind, {}).items():
            inputs[name] = value(inputs[name]) if callable(value) else copy.deepcopy(value)
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs, "_meta": {"title": node.get("title", kind)}}
    return prompt


class ServerStub:
    """What ComfyUI's PromptExecutor and its progress handler use of the PromptServer; records the messages."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass
