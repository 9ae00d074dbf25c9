"""Queueing example workflows the way ComfyUI's frontend and server do, against the live ComfyUI.

``to_api`` turns a UI-format workflow (what the frontend saves) into ComfyUI's API
prompt, as the frontend does when it queues one, for the plain graphs our examples
are: frontend-only nodes (notes) are left out; each node's ``widgets_values`` are
given, in order, to the widget inputs it shows (``schemas.node_inputs``: the extra
"fixed"/"randomize" value after a ``control_after_generate`` input is skipped, and
a DynamicCombo's key brings its option's inputs, named ``<combo>.<input>``); a
linked input becomes ``[origin node id, origin slot]``. Groups, subgraphs, reroutes
and muted or bypassed nodes are not supported and raise.

``queue`` then does what the server does with a queued prompt: it parses the
request afresh (the executor writes into the prompt dict it is given, so reusing
one dict would hide changes such as a fingerprint that never compares equal),
validates it with ``execution.validate_prompt`` and runs the valid outputs on one
long-lived ``PromptExecutor``, whose caches persist between prompts as a running
server's do.
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from schemas import FRONTEND_ONLY, inputs_of, node_inputs

# Per node type, per input name: a value, or a function of the workflow's value. An input that a node does not
# show (another mode's, such as a LoRA loader's finetuned_checkpoint) is left alone.
Overrides = Mapping[str, Mapping[str, Any | Callable[[Any], Any]]]
CLIENT_ID = "pg-host-tests"


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
        for shown in node_inputs(inputs_of(nodes.NODE_CLASS_MAPPINGS[kind]), values):
            if shown.widget:
                inputs[shown.name] = shown.value
            if shown.name in linked:
                link = links[linked.pop(shown.name)]
                inputs[shown.name] = [str(link[1]), link[2]]
        if values:
            raise ValueError(f"node {node['id']} ({kind}): {len(values)} widget value(s) left over: {values}")
        if linked:
            raise ValueError(f"node {node['id']} ({kind}): links to inputs it does not show: {sorted(linked)}")
        for name, value in overrides.get(kind, {}).items():
            if name in inputs:
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


class CacheLimits(dict):
    """The cache limits a prompt worker passes to its PromptExecutor, none given on the command line: each is 0.

    Which limits there are depends on the version (0.33 added "ram_inactive"); a limit not named here reads as 0.
    """

    def __missing__(self, key):
        return 0


def prompt_executor():
    """A PromptExecutor as ComfyUI's prompt worker builds it when the server runs with ``--cache-classic``
    (v0.8.0's default cache): outputs stay cached between prompts while their inputs are unchanged."""
    import execution

    return execution.PromptExecutor(ServerStub(), cache_type=execution.CacheType.CLASSIC,
                                    cache_args=CacheLimits(lru=0, ram=0))


@dataclass
class Run:
    """What became of one queued prompt."""

    valid: bool
    error: Any
    node_errors: dict
    outputs: list[str]
    messages: list[tuple[str, dict]] = field(default_factory=list)
    success: bool = False
    history: dict = field(default_factory=dict)

    def events(self, name: str) -> list[dict]:
        return [data for event, data in self.messages if event == name]

    @property
    def executed(self) -> list[str]:
        """The nodes that ran (not taken from the cache), in order."""
        return [data["node"] for data in self.events("executing") if data.get("node") is not None]

    @property
    def cached(self) -> list[str]:
        return [node for data in self.events("execution_cached") for node in data["nodes"]]

    @property
    def errors(self) -> list[dict]:
        return self.events("execution_error")


def validate(prompt: dict) -> tuple:
    import execution

    return asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))


def queue(executor, prompt: dict[str, Any]) -> Run:
    """Queue ``prompt`` as the server does: a fresh copy, validated, then its valid outputs executed."""
    prompt = json.loads(json.dumps(prompt))
    valid, error, outputs, node_errors = validate(prompt)
    run = Run(valid, error, node_errors, outputs)
    if not valid:
        return run
    stub = executor.server
    start = len(stub.messages)
    executor.execute(prompt, str(uuid.uuid4()), {"client_id": CLIENT_ID}, outputs)
    run.messages = stub.messages[start:]
    run.success = executor.success
    run.history = executor.history_result
    return run
