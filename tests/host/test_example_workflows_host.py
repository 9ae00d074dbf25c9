"""The example workflows queued as ComfyUI's server queues them, on the tiny test models.

The SD1.5 examples run on the tiny SD1.5 checkpoints; the SDXL, Qwen-Image and Wan
examples on tiny files that ComfyUI's stock loaders detect as those families
(detectable.py), with one substitution: no text encoder can be made tiny, so a test-only
node stands in for CLIPLoader + CLIPTextEncode and gives the CONDITIONING of the family's
encoder at the tiny model's widths. Every other node is ComfyUI's or the pack's own.

Also: the node-schema snapshot that the torch-only workflow tests and the workflow
generator rely on fits this ComfyUI. The pack's own nodes must equal it on every
version; the stock nodes the workflows use may change between versions as long as
every example workflow still fits them (checked against this ComfyUI's live
definitions), and must equal it on the version it was written from.
``PG_WRITE_SCHEMAS=1`` rewrites it instead (schemas.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import detectable
import pytest
import schemas
import workflow_api

# The examples of the families that detectable.py writes tiny files for, and the family of each.
FAMILY_EXAMPLES = {
    "SDXL LoRA pair, two-way guider": "sdxl",
    "Qwen-Image LoRA pair, two-way guider": "qwen_image",
    "Wan 2.1 text to video, LoRA pair": "wan21",
}
# The SD1.5 sampling examples, which save one image each; test_tuning_host.py queues the tuning ones.
WORKFLOWS = sorted(p for p in schemas.WORKFLOWS_DIR.glob("*.json")
                   if not p.stem.startswith("Tuning") and p.stem not in FAMILY_EXAMPLES)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SIZE = 64
FRAMES = 5  # a video's length: 2 latent frames, 5 decoded ones


def workflow_path(title_start: str) -> Path:
    (found,) = [p for p in schemas.WORKFLOWS_DIR.glob("*.json") if p.stem.startswith(title_start)]
    return found


LORA_WORKFLOW = "LoRA pair"
FULL_WORKFLOW = "DreamBooth pair"
KSAMPLER_WORKFLOW = "KSampler"


@pytest.fixture(scope="module")
def executor(comfy_host):
    """One executor for the module, as a running ComfyUI has: loader outputs are cached between the prompts."""
    return workflow_api.prompt_executor()


def tiny_overrides(tiny_files, prefix: str) -> workflow_api.Overrides:
    """The workflow's model names swapped for the tiny models; 2 steps, 64x64, and a SaveImage prefix per test."""
    return {
        "PG_LoadFinetunedPair": {"base_checkpoint": tiny_files["base"],
                                 "personalization.lora_name": tiny_files["lora"],
                                 "personalization.finetuned_checkpoint": tiny_files["finetuned"]},
        "BasicScheduler": {"steps": 2},
        "KSampler": {"steps": 2},
        "EmptyLatentImage": {"width": SIZE, "height": SIZE, "batch_size": 1},
        "SaveImage": {"filename_prefix": prefix},
    }


def prompt_of(tiny_files, title_start: str, prefix: str, **changes) -> tuple[dict, dict]:
    """The workflow and its API prompt on the tiny models; ``changes`` are further overrides by node type."""
    workflow = json.loads(workflow_path(title_start).read_text())
    overrides = tiny_overrides(tiny_files, prefix)
    overrides = {kind: {**overrides.get(kind, {}), **changes.get(kind, {})} for kind in {*overrides, *changes}}
    return workflow, workflow_api.to_api(workflow, overrides)


def saved_pngs(prefix: str, extension: str = "png") -> list[Path]:
    import folder_paths

    folder, stem = os.path.split(prefix)
    return sorted(Path(folder_paths.get_output_directory(), folder).glob(f"{stem}_*.{extension}"))


def node_id(workflow: dict, kind: str) -> str:
    (found,) = [n["id"] for n in workflow["nodes"] if n["type"] == kind]
    return str(found)


# ------------------------------------------------------------------------------------------------ the snapshot


def test_snapshot_fits_live_comfyui(comfy_host, tiny_files, family_folders):
    import comfyui_version

    live = json.loads(schemas.dumps(schemas.build(schemas.snapshot_node_types(comfy_host))))
    if os.environ.get("PG_WRITE_SCHEMAS"):
        schemas.SNAPSHOT_PATH.parent.mkdir(parents=True, exist_ok=True)
        schemas.SNAPSHOT_PATH.write_text(schemas.dumps(live))
        pytest.skip(f"PG_WRITE_SCHEMAS: wrote {schemas.SNAPSHOT_PATH}")
    recorded = schemas.load()
    assert sorted(recorded["nodes"]) == sorted(live["nodes"]), "node types differ: regenerate (schemas.py)"
    for kind, definition in live["nodes"].items():
        if kind.startswith(schemas.PACK_PREFIX) or comfyui_version.__version__ == recorded["comfyui_version"]:
            assert recorded["nodes"][kind] == definition, f"{kind} differs from the snapshot: regenerate (schemas.py)"
    for path in sorted(schemas.WORKFLOWS_DIR.glob("*.json")):
        problems = schemas.workflow_problems(json.loads(path.read_text()), live["nodes"])
        assert problems == [], f"{path.name} does not fit ComfyUI {comfyui_version.__version__}: {problems}"


def test_dynamic_inputs_have_their_tooltips_in_the_locale(comfy_host):
    """locales/en/nodeDefs.json holds the tooltips of the inputs that DynamicCombos add (schemas.py says why)."""
    import nodes

    live = schemas.dynamic_input_tooltips({node.define_schema().node_id: nodes.NODE_CLASS_MAPPINGS[
        node.define_schema().node_id] for node in comfy_host.nodes.NODES})
    if os.environ.get("PG_WRITE_SCHEMAS"):
        schemas.LOCALE_PATH.parent.mkdir(parents=True, exist_ok=True)
        schemas.LOCALE_PATH.write_text(json.dumps(live, indent=2, ensure_ascii=False) + "\n")
        pytest.skip(f"PG_WRITE_SCHEMAS: wrote {schemas.LOCALE_PATH}")
    assert json.loads(schemas.LOCALE_PATH.read_text()) == live, "regenerate with PG_WRITE_SCHEMAS=1 (schemas.py)"


# ------------------------------------------------------------------------------------- queue-time errors


def node_error_inputs(run: workflow_api.Run, node: str) -> list[tuple[str, str]]:
    return [(e["extra_info"].get("input_name"), e["details"]) for e in run.node_errors[node]["errors"]]


def test_empty_guidance_interval_is_refused_when_queued(executor, tiny_files):
    workflow, prompt = prompt_of(tiny_files, KSAMPLER_WORKFLOW, "pg_examples/never",
                                 PG_WeakModelInterpolator={"guidance_start": 0.9, "guidance_end": 0.1})
    run = workflow_api.queue(executor, prompt)
    assert not run.valid and run.executed == []
    errors = node_error_inputs(run, node_id(workflow, "PG_WeakModelInterpolator"))
    # ComfyUI shows a validate_inputs message under each input the check reads: here the two ends of the interval.
    assert sorted(name for name, _ in errors) == ["guidance_end", "guidance_start"]
    assert all("guidance_start (0.9) must not be after guidance_end (0.1)" in details for _, details in errors)


def test_three_way_ksampler_patch_without_null_is_refused_when_queued(executor, tiny_files):
    workflow, prompt = prompt_of(tiny_files, KSAMPLER_WORKFLOW, "pg_examples/never")
    patch = node_id(workflow, "PG_PersonalizationGuidanceModel")
    prompt[patch]["inputs"].update({"estimate": "three-way", "estimate.personalization_scale": 3.0})
    run = workflow_api.queue(executor, prompt)
    assert not run.valid and run.executed == []
    ((name, details),) = node_error_inputs(run, patch)
    assert name == "estimate.null_conditioning" and details == "null_conditioning"
    (error,) = run.node_errors[patch]["errors"]
    assert error["type"] == "required_input_missing"


def test_two_way_shows_no_negative_socket(comfy_host):
    """A negative prompt cannot be connected in two-way: the two-way option has no such socket."""
    import nodes

    for kind in ("PG_PersonalizationGuider", "PG_SchedulePreview", "PG_Sweep"):
        (estimate,) = [i for i in schemas.inputs_of(nodes.NODE_CLASS_MAPPINGS[kind]) if i["name"] == "estimate"]
        assert "negative" not in {i["name"] for i in estimate["modes"]["two-way (paper)"]}, kind
        assert "negative" in {i["name"] for i in estimate["modes"]["three-way"]}, kind


# ----------------------------------------------------------------------------------------- the examples


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_example_workflow_executes(executor, tiny_files, path):
    from PIL import Image

    # One output prefix per workflow (two share the words before their comma).
    prefix = "pg_examples/" + "".join(c if c.isalnum() else "_" for c in path.stem)
    workflow, prompt = prompt_of(tiny_files, path.stem, prefix)
    run = workflow_api.queue(executor, prompt)

    assert run.valid, (run.error, run.node_errors)
    assert run.success and not run.errors, run.errors
    assert [prompt[o]["class_type"] for o in run.outputs] == ["SaveImage"]
    (png,) = saved_pngs(prefix)
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(png) as image:
        assert image.size == (SIZE, SIZE)


def test_base_given_as_its_own_finetune_fails_before_loading(executor, tiny_files):
    workflow, prompt = prompt_of(tiny_files, FULL_WORKFLOW, "pg_examples/base_as_finetune")
    loader = node_id(workflow, "PG_LoadFinetunedPair")
    prompt[loader]["inputs"]["personalization.finetuned_checkpoint"] = tiny_files["base"]
    run = workflow_api.queue(executor, prompt)

    assert run.valid and not run.success
    (error,) = run.errors
    assert error["node_type"] == "PG_LoadFinetunedPair"
    assert "The fine-tuned file is the base itself" in error["exception_message"]
    assert error["exception_type"] == "personalization_guidance.GuidanceInputError"
    assert saved_pngs("pg_examples/base_as_finetune") == []


def test_a_user_error_is_logged_as_one_line(executor, tiny_files, caplog):
    import logging

    workflow, prompt = prompt_of(tiny_files, FULL_WORKFLOW, "pg_examples/base_as_finetune_log")
    prompt[node_id(workflow, "PG_LoadFinetunedPair")]["inputs"]["personalization.finetuned_checkpoint"] = \
        tiny_files["base"]
    with caplog.at_level(logging.INFO):
        run = workflow_api.queue(executor, prompt)
    assert not run.success
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("The fine-tuned file is the base itself" in line for line in logged), logged
    assert not any("Traceback" in line for line in logged), logged


# ------------------------------------------------------------------------- the examples of the other families

TEXT_ENCODE = "TESTONLY_TinyTextEncode"


class TinyTextEncode:
    """TEST ONLY, in place of CLIPLoader + CLIPTextEncode: the CONDITIONING that the family's text encoder gives
    (detectable.Detectable.conditioning: its widths and the extras the model reads), a function of the text."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True}), "family": (list(detectable.DETECTABLE),)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "_for_testing"

    def encode(self, text: str, family: str):
        return (detectable.DETECTABLE[family].conditioning(text),)


@pytest.fixture(scope="module")
def text_encoder_stand_in(comfy_host):
    """The stand-in, known to ComfyUI while this module's tests run, and only then."""
    import nodes

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(nodes.NODE_CLASS_MAPPINGS, TEXT_ENCODE, TinyTextEncode)
        yield


def with_text_encoder_stand_in(prompt: dict, family: str) -> dict:
    """The one substitution: each CLIPTextEncode becomes the stand-in (same node id and text, so every link to it
    holds), and the CLIPLoader that fed them is left out. Everything else is the workflow's own."""
    out = {}
    for node_id, node in prompt.items():
        if node["class_type"] == "CLIPLoader":
            continue
        if node["class_type"] == "CLIPTextEncode":
            node = {**node, "class_type": TEXT_ENCODE, "inputs": {"text": node["inputs"]["text"], "family": family}}
        out[node_id] = node
    return out


def family_overrides(files: dict[str, str], prefix: str) -> workflow_api.Overrides:
    """The workflow's model names swapped for the family's tiny files; 2 steps, 64x64 (5 frames), an output prefix."""
    return {
        "PG_LoadFinetunedPair": {"base_checkpoint": files["base"], "personalization.lora_name": files["lora"]},
        "PG_LoadDiffusionModelPair": {"base_model": files["base"], "personalization.lora_name": files["lora"]},
        "VAELoader": {"vae_name": files.get("vae")},
        "BasicScheduler": {"steps": 2},
        "KSampler": {"steps": 2},
        "EmptyLatentImage": {"width": SIZE, "height": SIZE},
        "EmptySD3LatentImage": {"width": SIZE, "height": SIZE},
        "EmptyHunyuanLatentVideo": {"width": SIZE, "height": SIZE, "length": FRAMES},
        "SaveImage": {"filename_prefix": prefix},
        "SaveAnimatedWEBP": {"filename_prefix": prefix},
    }


@pytest.mark.parametrize("family", sorted(detectable.DETECTABLE))
def test_tiny_files_are_detected_as_their_family(comfy_host, detectable_files, family):
    """ComfyUI's model detection rebuilds each tiny model exactly: its class, every key, every shape."""
    assert detectable.detected_exactly(detectable.DETECTABLE[family], detectable_files["shapes"][family]) is None


@pytest.mark.parametrize("title", sorted(FAMILY_EXAMPLES))
def test_family_example_executes(executor, detectable_files, text_encoder_stand_in, title):
    from PIL import Image

    family = FAMILY_EXAMPLES[title]
    prefix = f"pg_examples/{family}"
    workflow = json.loads((schemas.WORKFLOWS_DIR / f"{title}.json").read_text())
    prompt = workflow_api.to_api(workflow, family_overrides(detectable_files["files"][family], prefix))
    prompt = with_text_encoder_stand_in(prompt, family)
    run = workflow_api.queue(executor, prompt)

    assert run.valid, (run.error, run.node_errors)
    assert run.success and not run.errors, run.errors
    (output,) = [prompt[o]["class_type"] for o in run.outputs]
    if output == "SaveAnimatedWEBP":
        (saved,) = saved_pngs(prefix, "webp")
        frames = FRAMES
    else:
        assert output == "SaveImage"
        (saved,) = saved_pngs(prefix)
        frames = 1
    with Image.open(saved) as image:
        assert image.size == (SIZE, SIZE) and getattr(image, "n_frames", 1) == frames
        low, high = image.convert("L").getextrema()
        assert low < high, "a flat picture: the sampled latent was not finite"
