"""The example workflows run through ComfyUI's own validator and executor, on the tiny test models.

Also: the node-schema snapshot that the torch-only workflow test relies on equals
what this ComfyUI reports, so it cannot go stale. ``PG_WRITE_SCHEMAS=1`` rewrites it
instead (schemas.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path

import pytest
import schemas
import workflow_api

# The sampling examples, which save one image each; test_tuning_host.py executes the tuning_* ones.
WORKFLOWS = sorted(p for p in schemas.WORKFLOWS_DIR.glob("*.json") if not p.stem.startswith("tuning_"))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SIZE = 64


@pytest.fixture(scope="module")
def executor(comfy_host):
    """One executor for the module, as a running ComfyUI has: loader outputs are cached between the prompts."""
    import execution

    return execution.PromptExecutor(workflow_api.ServerStub(), cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0})


def tiny_overrides(tiny_files, prefix: str) -> workflow_api.Overrides:
    """The workflow's model names swapped for the tiny models; 2 steps, 64x64, and a SaveImage prefix per test."""

    def swap(key):
        return lambda name: name if name == "none" else tiny_files[key]

    return {
        "PG_LoadFinetunedPair": {"base_checkpoint": swap("base"), "lora_name": swap("lora"),
                                 "finetuned_checkpoint": swap("finetuned")},
        "BasicScheduler": {"steps": 2},
        "KSampler": {"steps": 2},
        "EmptyLatentImage": {"width": SIZE, "height": SIZE, "batch_size": 1},
        "SaveImage": {"filename_prefix": prefix},
    }


def load(name: str) -> dict:
    return json.loads((schemas.WORKFLOWS_DIR / name).read_text())


def validate(prompt: dict):
    import execution

    return asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))


def run(executor, prompt: dict) -> list:
    """Validates and executes ``prompt``; returns the output node ids that validation accepted."""
    valid, error, outputs, node_errors = validate(prompt)
    assert valid, (error, node_errors)
    executor.execute(prompt, str(uuid.uuid4()), {}, outputs)
    return outputs


def saved_pngs(prefix: str) -> list[Path]:
    import folder_paths

    folder, stem = os.path.split(prefix)
    return sorted(Path(folder_paths.get_output_directory(), folder).glob(f"{stem}_*.png"))


def node_id(workflow: dict, kind: str) -> str:
    (found,) = [n["id"] for n in workflow["nodes"] if n["type"] == kind]
    return str(found)


def test_snapshot_matches_live_comfyui(comfy_host, tiny_files):
    live = json.loads(schemas.dumps(schemas.build(schemas.snapshot_node_types(comfy_host))))
    if os.environ.get("PG_WRITE_SCHEMAS"):
        schemas.SNAPSHOT_PATH.parent.mkdir(parents=True, exist_ok=True)
        schemas.SNAPSHOT_PATH.write_text(schemas.dumps(live))
        pytest.skip(f"PG_WRITE_SCHEMAS: wrote {schemas.SNAPSHOT_PATH}")
    recorded = schemas.load()
    assert sorted(recorded["nodes"]) == sorted(live["nodes"]), "node types differ: regenerate (schemas.py)"
    for kind, definition in live["nodes"].items():
        assert recorded["nodes"][kind] == definition, f"{kind} changed in ComfyUI: regenerate (schemas.py)"


def test_interval_that_ends_before_it_starts_fails_validation(comfy_host, tiny_files):
    workflow = load("personalization_ksampler_scheduled_omega.json")
    overrides = {**tiny_overrides(tiny_files, "pg_examples/never"),
                 "PG_WeakModelInterpolator": {"guidance_start": 0.9, "guidance_end": 0.1}}
    prompt = workflow_api.to_api(workflow, overrides)

    valid, error, outputs, node_errors = validate(prompt)

    assert not valid and outputs == []
    weak = node_id(workflow, "PG_WeakModelInterpolator")
    details = [e["details"] for e in node_errors[weak]["errors"]]
    assert any("guidance_start (0.9) must not be after guidance_end (0.1)" in d for d in details), details


def test_negative_in_two_way_fails_before_sampling(comfy_host, executor, tiny_files):
    # Before the examples run: the full-checkpoint example then finds its loader and prompts in the cache.
    workflow = load("personalization_full_checkpoint.json")
    prefix = "pg_examples/two_way_with_negative"
    two_way = comfy_host.nodes.core.runtime.Estimate.TWO_WAY.value
    overrides = {**tiny_overrides(tiny_files, prefix), "PG_PersonalizationGuider": {"estimate": two_way}}
    prompt = workflow_api.to_api(workflow, overrides)
    assert "negative" in prompt[node_id(workflow, "PG_PersonalizationGuider")]["inputs"]

    run(executor, prompt)

    assert not executor.success
    (error,) = [data for event, data in executor.status_messages if event == "execution_error"]
    assert error["node_type"] == "PG_PersonalizationGuider"
    assert "The two-way estimate has no negative prompt" in error["exception_message"]
    assert node_id(workflow, "SamplerCustomAdvanced") not in error["executed"]
    assert saved_pngs(prefix) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_example_workflow_executes(executor, tiny_files, path):
    from PIL import Image

    prefix = f"pg_examples/{path.stem}"
    prompt = workflow_api.to_api(json.loads(path.read_text()), tiny_overrides(tiny_files, prefix))
    outputs = run(executor, prompt)

    errors = [data for event, data in executor.status_messages if event == "execution_error"]
    assert executor.success and not errors, errors
    assert [prompt[o]["class_type"] for o in outputs] == ["SaveImage"]
    (png,) = saved_pngs(prefix)
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(png) as image:
        assert image.size == (SIZE, SIZE)
