"""Writes example_workflows/*.json: UI-format workflows (frontend format 0.4) for ComfyUI's template browser.

Each workflow is declared below as columns of nodes (widget values by input name;
the rest take their defaults) and edges by socket name. Inputs that a
DynamicCombo adds are named as the frontend names them, ``<combo>.<input>``
(``estimate.guidance_scale``). The slot indices, ``widgets_values`` order and link
records come from the node snapshot ``tests/schemas/node_schemas.json``, so this
needs no ComfyUI. Run it from anywhere after changing a workflow or the snapshot:

    python tools/build_example_workflows.py

The template browser shows a workflow's file name as its title, so the files are
named for people. Nodes are stacked in columns from their sizes, which are at
least what the frontends of both supported ComfyUI versions compute for them
(tools/frontend_check.mjs checks that no two nodes overlap there), and the saved
view leaves room for the frontend's sidebar and menu bar.

``tests/test_example_workflows.py`` checks the output against the snapshot and the
host tier executes it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "tests" / "schemas" / "node_schemas.json"
OUT_DIR = ROOT / "example_workflows"


def _schemas_module():
    """tests/host/schemas.py (no ComfyUI import): how a node's inputs follow from its widget values."""
    spec = importlib.util.spec_from_file_location("pg_node_schemas", ROOT / "tests" / "host" / "schemas.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return sys.modules[spec.name]


schemas_module = _schemas_module()

BASE = "v1-5-pruned-emaonly.safetensors"
LORA = "my_subject_lora.safetensors"
DREAMBOOTH = "my_dreambooth_model.safetensors"
PROMPT = "a photo of sks dog wearing a red hat on the beach"
# The other families' files, named as ComfyUI's own templates for them name theirs.
SDXL_BASE = "sd_xl_base_1.0.safetensors"
SDXL_LORA = "my_sdxl_subject_lora.safetensors"
QWEN_IMAGE = {"base": "qwen_image_fp8_e4m3fn.safetensors", "lora": "my_qwen_image_subject_lora.safetensors",
              "text_encoder": "qwen_2.5_vl_7b_fp8_scaled.safetensors", "vae": "qwen_image_vae.safetensors"}
WAN = {"base": "wan2.1_t2v_1.3B_fp16.safetensors", "lora": "my_wan2.1_subject_lora.safetensors",
       "text_encoder": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "vae": "wan_2.1_vae.safetensors"}
VIDEO_PROMPT = "sks dog wearing a red hat runs along the beach, waves rolling in, the camera follows it"
NEGATIVE = "blurry, low quality, deformed, watermark"
TWO_WAY, THREE_WAY = "two-way (paper)", "three-way"
SEED = 42

TITLE_HEIGHT = 30  # the frontend draws a node's title above its pos
GAP = 40  # between a node's bottom and the next node's title, and between columns
# Height of the pack's nodes in their tallest mode, as both frontends compute it (rounded up): the node below is
# placed clear of it, so that switching a DynamicCombo (which resizes the node) covers nothing.
TALLEST = {
    "PG_LoadFinetunedPair": 240,
    "PG_LoadDiffusionModelPair": 230,
    "PG_WeakModelInterpolator": 300,  # the free form of per_block (a text box) is its tallest mode
    "PG_PersonalizationGuider": 190,
    "PG_PersonalizationGuidanceModel": 130,
    "PG_Sweep": 340,
    "PG_SchedulePreview": 170,
    "PG_SavePreset": 330,
}
# The saved view: scale, and an offset that keeps the first column clear of the sidebar and the menu bar.
VIEW = {"scale": 0.75, "offset": [110, 70]}


@dataclass
class Node:
    type: str
    size: tuple[int, int]
    widgets: dict[str, Any] = field(default_factory=dict)
    title: str | None = None


@dataclass
class Workflow:
    title: str  # the file name, which the template browser shows
    columns: list[tuple[int, list[str]]]  # (x, node keys from top to bottom); "note" places the note
    nodes: dict[str, Node]
    edges: list[tuple[str, str, str, str]]  # (from node, output name, to node, input name)
    note: tuple[str, tuple[int, int]]  # (text, size)

    @property
    def slug(self) -> str:
        return slug(self.title)


def slug(title: str) -> str:
    """The workflow's name in code and file names: 'LoRA pair, two-way guider' -> 'lora_pair_two_way_guider'."""
    return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")


def _layout(spec: dict, node: Node) -> tuple[list, list]:
    """The node's ``widgets_values`` and the inputs it shows (full names), defaults for what it leaves out."""
    names = set()

    def walk(entries, prefix):
        values, shown = [], []
        for entry in entries:
            name = prefix + entry["name"]
            shown.append((name, entry))
            if not entry["widget"]:
                continue
            names.add(name)
            if name in node.widgets:
                value = node.widgets[name]
            elif entry["type"] == schemas_module.DYNAMIC_COMBO:
                value = next(iter(entry["modes"]))  # the frontend selects the first option
            elif "default" in entry:
                value = entry["default"]
            else:
                raise KeyError(f"{node.type}.{name} has no default: give a value")
            values.append(value)
            if entry.get("control_after_generate"):
                values.append("fixed")
            if entry["type"] == schemas_module.DYNAMIC_COMBO:
                more_values, more_shown = walk(entry["modes"][value], name + ".")
                values += more_values
                shown += more_shown
        return values, shown

    values, shown = walk(spec["inputs"], "")
    unknown = set(node.widgets) - names
    if unknown:
        raise KeyError(f"{node.type} shows no widget {sorted(unknown)} with these values")
    return values, shown


def _order(ids: list[int], links: list[list]) -> dict[int, int]:
    """Execution order as the frontend stores it: a topological order, ties by node id."""
    pending = {i: {link[1] for link in links if link[3] == i} for i in ids}
    order = {}
    while pending:
        ready = min(i for i, deps in pending.items() if not deps - set(order))
        order[ready] = len(order)
        del pending[ready]
    return order


def _positions(workflow: Workflow) -> dict[str, tuple[int, int]]:
    """Each node's pos: its column's x, stacked below the one above with a gap (the title sits above pos)."""
    positions = {}
    for x, keys in workflow.columns:
        y = 140
        for key in keys:
            positions[key] = (x, y)
            if key == "note":
                height = workflow.note[1][1]
            else:
                node = workflow.nodes[key]
                height = max(node.size[1], TALLEST.get(node.type, 0))
            y += height + GAP + TITLE_HEIGHT
    return positions


def build(workflow: Workflow, schemas: dict[str, dict]) -> dict[str, Any]:
    keys = list(workflow.nodes)
    ids = {key: n for n, key in enumerate(keys, start=1)}
    note_id = len(keys) + 1
    layouts = {key: _layout(schemas[node.type], node) for key, node in workflow.nodes.items()}
    # The frontend lists a node's sockets first, then its widget inputs in widget order; the inputs a
    # DynamicCombo adds follow the combo, sockets among them in the option's order.
    slots = {}
    for key, (_values, shown) in layouts.items():
        top_sockets = [(name, entry) for name, entry in shown if not entry["widget"] and "." not in name]
        slots[key] = top_sockets + [(name, entry) for name, entry in shown if entry["widget"] or "." in name]
    positions = _positions(workflow)

    links = []
    for link_id, (src, output, dst, input_name) in enumerate(workflow.edges, start=1):
        outputs = schemas[workflow.nodes[src].type]["outputs"]
        slot = [o["name"] for o in outputs].index(output)
        to_slot = [name for name, _ in slots[dst]].index(input_name)
        links.append([link_id, ids[src], slot, ids[dst], to_slot, outputs[slot]["type"]])
    order = _order(list(ids.values()) + [note_id], links)

    nodes = []
    for key, node in workflow.nodes.items():
        spec, node_id = schemas[node.type], ids[key]
        inputs = []
        for slot, (name, entry) in enumerate(slots[key]):
            linked = [link[0] for link in links if link[3] == node_id and link[4] == slot]
            item = {"name": name, "type": entry["type"]}
            if "." in name and not entry["widget"]:
                item["label"] = entry["name"]  # the frontend labels a DynamicCombo's sockets with their own name
            if entry["widget"]:
                item["widget"] = {"name": name}
            item["link"] = linked[0] if linked else None
            if not entry["required"] and not entry["widget"]:
                item["shape"] = 7
            inputs.append(item)
        outputs = [{"name": o["name"], "type": o["type"], "slot_index": slot,
                    "links": [link[0] for link in links if link[1] == node_id and link[2] == slot]}
                   for slot, o in enumerate(spec["outputs"])]
        nodes.append({
            "id": node_id, "type": node.type, "pos": list(positions[key]), "size": list(node.size), "flags": {},
            "order": order[node_id], "mode": 0, "inputs": inputs, "outputs": outputs,
            **({"title": node.title} if node.title else {}),
            "properties": {"Node name for S&R": node.type},
            "widgets_values": layouts[key][0],
        })
    text, size = workflow.note
    nodes.append({"id": note_id, "type": "Note", "pos": list(positions["note"]), "size": list(size), "flags": {},
                  "order": order[note_id], "mode": 0, "inputs": [], "outputs": [], "title": "What to tune",
                  "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"})

    return {
        "last_node_id": note_id,
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": json.loads(json.dumps(VIEW))},
        "version": 0.4,
    }


# ------------------------------------------------------------------------------------------- the building blocks

COLUMNS = (40, 500, 980, 1390, 1790)  # pair and note; weak model and prompts; guidance; sampler; decode and save
NOTE_SIZE = (400, 330)


def _pair(personalization: str = "LoRA", base: str = BASE, lora: str = LORA) -> Node:
    if personalization == "LoRA":
        widgets = {"personalization": "LoRA", "personalization.lora_name": lora, "personalization.lora_strength": 1.0}
    else:
        widgets = {"personalization": "fine-tuned checkpoint", "personalization.finetuned_checkpoint": DREAMBOOTH}
    return Node("PG_LoadFinetunedPair", (400, 190), {"base_checkpoint": base, **widgets})


def _diffusion_model_loaders(files: dict[str, str], clip_type: str) -> dict[str, Node]:
    """A LoRA pair from the diffusion_models folder, and the text encoder and VAE from their own loaders."""
    return {
        "pair": Node("PG_LoadDiffusionModelPair", (400, 190),
                     {"base_model": files["base"], "weight_dtype": "default", "personalization": "LoRA",
                      "personalization.lora_name": files["lora"], "personalization.lora_strength": 1.0}),
        "clip": Node("CLIPLoader", (400, 110), {"clip_name": files["text_encoder"], "type": clip_type, "device": "default"}),
        "vae": Node("VAELoader", (400, 60), {"vae_name": files["vae"]}),
    }


def _weak(schedule: str = "constant", omega: float = 0.5, omega_end: float | None = None, guidance_start: float = 0.0,
          guidance_end: float = 1.0, title: str | None = None, per_block: tuple[str, dict] | None = None) -> Node:
    """The Weak Model; ``per_block``: (option, {factor widget: value}), else per_block stays off."""
    widgets = {"schedule": schedule, "schedule.omega": omega, "guidance_start": guidance_start,
               "guidance_end": guidance_end}
    if omega_end is not None:
        widgets["schedule.omega_end"] = omega_end
    height = 155 if schedule == "constant" else 185
    if per_block is not None:
        option, factors = per_block
        widgets["per_block"] = option
        widgets.update({f"per_block.{name}": value for name, value in factors.items()})
        height += 25 * len(factors)
    return Node("PG_WeakModelInterpolator", (420, height), widgets, title)


def _prompts(negative: bool, prompt: str = PROMPT) -> dict[str, Node]:
    nodes = {
        "positive": Node("CLIPTextEncode", (420, 150), {"text": prompt}, "Prompt (c)"),
        "null": Node("CLIPTextEncode", (420, 100), {"text": ""}, "Null prompt: leave empty"),
    }
    if negative:
        nodes["negative"] = Node("CLIPTextEncode", (420, 120), {"text": NEGATIVE}, "Negative prompt (n)")
    return nodes


def _text_edges(negative: bool, clip: tuple[str, str] = ("pair", "clip")) -> list[tuple[str, str, str, str]]:
    names = ("positive", "null", "negative") if negative else ("positive", "null")
    return [(*clip, name, "clip") for name in names]


def _sampling_inputs(steps: int = 25, scheduler: str = "normal", latent: Node | None = None) -> dict[str, Node]:
    return {
        "noise": Node("RandomNoise", (360, 90), {"noise_seed": SEED}),
        "sampler": Node("KSamplerSelect", (360, 60), {"sampler_name": "euler"}),
        "sigmas": Node("BasicScheduler", (360, 110), {"scheduler": scheduler, "steps": steps, "denoise": 1.0}),
        "latent": latent or Node("EmptyLatentImage", (360, 110), {"width": 512, "height": 512, "batch_size": 1}),
    }


def _custom_advanced_tail(guider: Node, model: tuple[str, str] = ("pair", "finetuned_model"),
                          vae: tuple[str, str] = ("pair", "vae"), **sampling) -> tuple[dict[str, Node], list]:
    """The guider, SamplerCustomAdvanced and its inputs, decoding and saving; ``model`` is what the guider samples
    and the scheduler schedules (the pair's fine-tuned model, or a model made from it); ``sampling`` as
    ``_sampling_inputs``."""
    nodes = {
        "guider": guider,
        **_sampling_inputs(**sampling),
        "sample": Node("SamplerCustomAdvanced", (320, 330)),
        "decode": Node("VAEDecode", (220, 50)),
        "save": Node("SaveImage", (420, 460), {"filename_prefix": "personalization_guidance"}),
    }
    edges = [
        (*model, "guider", "model"),
        ("weak", "weak_model", "guider", "weak_model"),
        ("positive", "CONDITIONING", "guider", "positive"),
        ("null", "CONDITIONING", "guider", "null_conditioning"),
        (*model, "sigmas", "model"),
        ("noise", "NOISE", "sample", "noise"),
        ("guider", "guider", "sample", "guider"),
        ("sampler", "SAMPLER", "sample", "sampler"),
        ("sigmas", "SIGMAS", "sample", "sigmas"),
        ("latent", "LATENT", "sample", "latent_image"),
        ("sample", "output", "decode", "samples"),
        (*vae, "decode", "vae"),
        ("decode", "IMAGE", "save", "images"),
    ]
    return nodes, edges


def _ksampler_edges(model: tuple[str, str] = ("pair", "finetuned_model"),
                    vae: tuple[str, str] = ("pair", "vae")) -> list[tuple[str, str, str, str]]:
    """The KSampler route's links: ``model`` into the PG patch with the weak model, the patched MODEL into KSampler
    with the prompt and the null prompt as its negative, then decoding with ``vae`` and saving."""
    return [
        (*model, "patch", "model"),
        ("weak", "weak_model", "patch", "weak_model"),
        ("patch", "MODEL", "sample", "model"),
        ("positive", "CONDITIONING", "sample", "positive"),
        ("null", "CONDITIONING", "sample", "negative"),
        ("latent", "LATENT", "sample", "latent_image"),
        ("sample", "LATENT", "decode", "samples"),
        (*vae, "decode", "vae"),
        ("decode", "IMAGE", "save", "images"),
    ]


def _guider(estimate: str, title: str | None = None, **scales) -> Node:
    widgets = {"estimate": estimate, **{f"estimate.{k}": v for k, v in scales.items()}}
    return Node("PG_PersonalizationGuider", (360, 190 if estimate == THREE_WAY else 150), widgets, title)


def _columns(middle: list[str], guidance: list[str], sampler: list[str], last: list[str],
             first: tuple[str, ...] = ("pair", "note")) -> list:
    return [(COLUMNS[0], list(first)), (COLUMNS[1], middle), (COLUMNS[2], guidance), (COLUMNS[3], sampler),
            (COLUMNS[4], last)]


GUIDANCE_COLUMN = ["guider", "noise", "sampler", "sigmas", "latent"]


# ----------------------------------------------------------------------------------------------- the workflows


def lora_sampler_custom_advanced() -> Workflow:
    tail, tail_edges = _custom_advanced_tail(_guider(TWO_WAY, guidance_scale=7.5))
    return Workflow(
        title="LoRA pair, two-way guider",
        columns=_columns(["weak", "positive", "null"], GUIDANCE_COLUMN, ["sample"], ["decode", "save"]),
        nodes={"pair": _pair(), "weak": _weak(), **_prompts(negative=False), **tail},
        edges=[("pair", "pair", "weak", "pair"), *_text_edges(False), *tail_edges],
        note=(
            "Personalization guidance (arXiv 2508.00319), two-way: the weak model on the empty prompt guides the "
            "fine-tuned model, at the cost of CFG.\n\n"
            "omega (Personalization Weak Model): how much of the LoRA the weak model keeps. 1 = plain CFG on the "
            "fine-tuned model; lower pulls harder toward the personalized subject (0 = base model). Start at 0.5.\n\n"
            "guidance_scale (lambda): as CFG's scale; 1 = the fine-tuned model alone.\n\n"
            "Keep the null prompt empty, and sample (and schedule) with the fine-tuned model.",
            NOTE_SIZE,
        ),
    )


def full_checkpoint() -> Workflow:
    tail, tail_edges = _custom_advanced_tail(
        _guider(THREE_WAY, guidance_scale=7.5, personalization_scale=3.0))
    return Workflow(
        title="DreamBooth pair, three-way with a negative prompt",
        columns=_columns(["weak", "positive", "null", "negative"], GUIDANCE_COLUMN, ["sample"], ["decode", "save"]),
        nodes={"pair": _pair("fine-tuned checkpoint"), "weak": _weak(), **_prompts(negative=True), **tail},
        edges=[("pair", "pair", "weak", "pair"), *_text_edges(True), *tail_edges,
               ("negative", "CONDITIONING", "guider", "estimate.negative")],
        note=(
            "Full fine-tuned checkpoint (DreamBooth) against its base; three-way estimate (this pack's extension) "
            "for a negative prompt.\n\n"
            "guidance_scale (lambda_t): the text / negative-prompt scale, as CFG's.\n"
            "personalization_scale (lambda_p): the pull away from the weak model. Equal to guidance_scale = the "
            "paper's two-way estimate; 1 = plain CFG with the negative.\n"
            "omega: how much of the fine-tune the weak model keeps (1 = the fine-tuned model itself, 0 = the "
            "base). Start at 0.5.\n\n"
            "Two full checkpoints are resident while sampling.",
            NOTE_SIZE,
        ),
    )


def ksampler_scheduled_omega() -> Workflow:
    return Workflow(
        title="KSampler, omega rising over the run",
        columns=_columns(["weak", "positive", "null"], ["patch", "latent"], ["sample"], ["decode", "save"]),
        nodes={
            "pair": _pair(),
            "weak": _weak("cosine", 0.2, omega_end=1.0, guidance_start=0.0, guidance_end=0.8),
            **_prompts(negative=False),
            "patch": Node("PG_PersonalizationGuidanceModel", (360, 90), {"estimate": TWO_WAY}),
            "latent": Node("EmptyLatentImage", (360, 110), {"width": 512, "height": 512, "batch_size": 1}),
            "sample": Node("KSampler", (320, 270),
                           {"seed": SEED, "steps": 25, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
                            "denoise": 1.0}),
            "decode": Node("VAEDecode", (220, 50)),
            "save": Node("SaveImage", (420, 460), {"filename_prefix": "personalization_guidance"}),
        },
        edges=[
            ("pair", "pair", "weak", "pair"),
            *_text_edges(False),
            *_ksampler_edges(),
        ],
        note=(
            "The KSampler route: the patched MODEL makes KSampler (and detailers, upscalers) sample with "
            "personalization guidance. KSampler's cfg is lambda; in two-way its negative must be the empty prompt.\n\n"
            "Scheduled omega: cosine from omega 0.2 (strong pull toward the subject) to omega_end 1.0 over the first "
            "80% of sampling (guidance_start 0 to guidance_end 0.8); after that, plain CFG. guidance_end < 1 leaves "
            "the last, detail-forming steps to the fine-tuned model.",
            NOTE_SIZE,
        ),
    )


def lora_omega_per_block() -> Workflow:
    tail, tail_edges = _custom_advanced_tail(_guider(TWO_WAY, guidance_scale=7.5))
    factors = {"input_blocks": 0.25, "middle_block": 1.0, "output_blocks": 1.0}
    return Workflow(
        title="LoRA pair, omega per block (UNet)",
        columns=_columns(["weak", "positive", "null"], GUIDANCE_COLUMN, ["sample"], ["decode", "save"]),
        nodes={"pair": _pair(), "weak": _weak(per_block=("UNet: input / middle / output", factors)),
               **_prompts(negative=False), **tail},
        edges=[("pair", "pair", "weak", "pair"), *_text_edges(False), *tail_edges],
        note=(
            "Omega per block: the weak model forgets the subject block by block. A block's omega is "
            "1 - factor * (1 - omega): factor 1 = the run's omega (full push), 0 = the block keeps the subject "
            "(no push there). All 1 = per_block off.\n\n"
            "Here the UNet's input blocks get a quarter of the push (input_blocks 0.25) and the middle and output "
            "blocks all of it: the guidance pushes on the subject while the input blocks, which lay out the "
            "picture, stay closer to the plain prompt. A starting point to compare, not a known optimum: sweep "
            "settings with the Personalization Sweep's block_settings (one per line, e.g. unet: 0.25, 1, 1).\n\n"
            "Flux-like models: the double / single stream preset; any DiT: depth thirds; anything else: the free "
            "form (glob = factor per line). The Schedule Preview plots each block's omega.",
            NOTE_SIZE,
        ),
    )


def sdxl_lora() -> Workflow:
    tail, tail_edges = _custom_advanced_tail(
        _guider(TWO_WAY, guidance_scale=6.0),
        latent=Node("EmptyLatentImage", (360, 110), {"width": 1024, "height": 1024, "batch_size": 1}))
    return Workflow(
        title="SDXL LoRA pair, two-way guider",
        columns=_columns(["weak", "positive", "null"], GUIDANCE_COLUMN, ["sample"], ["decode", "save"]),
        nodes={"pair": _pair(base=SDXL_BASE, lora=SDXL_LORA), "weak": _weak(), **_prompts(negative=False), **tail},
        edges=[("pair", "pair", "weak", "pair"), *_text_edges(False), *tail_edges],
        note=(
            "SDXL: the base checkpoint and your subject LoRA as a pair; two-way personalization guidance (the "
            "paper's), at the cost of CFG.\n\n"
            "omega (Personalization Weak Model): how much of the LoRA the weak model keeps. 1 = plain CFG on the "
            "LoRA model; lower pulls harder toward the subject (0 = base model). Start at 0.5.\n\n"
            "guidance_scale (lambda): as CFG's scale; SDXL is usually sampled at 5-7. 1 = the LoRA model alone.\n\n"
            "Both prompts are encoded with the pair's CLIP (the LoRA's text-encoder part included); keep the null "
            "prompt empty. Sample at SDXL's 1024x1024 (or another size of about a megapixel). The preset sdxl_lora "
            "(Personalization Preset Loader) is a scheduled start.",
            NOTE_SIZE,
        ),
    )


# Diffusion transformers ship as diffusion model, text encoder and VAE: the first column loads all three.
DIT_FIRST_COLUMN = ("pair", "clip", "vae", "note")


def qwen_image_lora() -> Workflow:
    tail, tail_edges = _custom_advanced_tail(
        _guider(TWO_WAY, guidance_scale=4.0), model=("shift", "MODEL"), vae=("vae", "VAE"), steps=20,
        scheduler="simple",
        latent=Node("EmptySD3LatentImage", (360, 110), {"width": 1328, "height": 1328, "batch_size": 1}))
    return Workflow(
        title="Qwen-Image LoRA pair, two-way guider",
        columns=_columns(["weak", "positive", "null"], ["shift", *GUIDANCE_COLUMN], ["sample"], ["decode", "save"],
                         first=DIT_FIRST_COLUMN),
        nodes={
            **_diffusion_model_loaders(QWEN_IMAGE, "qwen_image"),
            "weak": _weak(),
            **_prompts(negative=False),
            "shift": Node("ModelSamplingAuraFlow", (360, 60), {"shift": 3.1}),
            **tail,
        },
        edges=[
            ("pair", "pair", "weak", "pair"),
            *_text_edges(False, clip=("clip", "CLIP")),
            ("pair", "finetuned_model", "shift", "model"),
            *tail_edges,
        ],
        note=(
            "Qwen-Image with a subject LoRA, two-way personalization guidance (the paper's), at the cost of CFG.\n\n"
            "The Diffusion Model Pair Loader loads the base from the diffusion_models folder (as Load Diffusion Model "
            "does) and the LoRA; the text encoder (type qwen_image) and the VAE come from their own loaders. "
            "ModelSamplingAuraFlow (shift 3.1, as ComfyUI's Qwen-Image template) goes between the pair's fine-tuned "
            "model and both the guider and the scheduler.\n\n"
            "omega: how much of the LoRA the weak model keeps (1 = plain CFG, 0 = the base model). Start at 0.5.\n"
            "guidance_scale (lambda): as CFG's scale; Qwen-Image is usually sampled at 2.5-4.\n\n"
            "Keep the null prompt empty.",
            NOTE_SIZE,
        ),
    )


def wan_text_to_video_lora() -> Workflow:
    return Workflow(
        title="Wan 2.1 text to video, LoRA pair",
        columns=_columns(["weak", "positive", "null"], ["shift", "patch", "latent"], ["sample"], ["decode", "save"],
                         first=DIT_FIRST_COLUMN),
        nodes={
            **_diffusion_model_loaders(WAN, "wan"),
            "weak": _weak(),
            **_prompts(negative=False, prompt=VIDEO_PROMPT),
            "shift": Node("ModelSamplingSD3", (360, 60), {"shift": 8.0}),
            "patch": Node("PG_PersonalizationGuidanceModel", (360, 90), {"estimate": TWO_WAY}),
            "latent": Node("EmptyHunyuanLatentVideo", (360, 130),
                           {"width": 832, "height": 480, "length": 33, "batch_size": 1}),
            "sample": Node("KSampler", (320, 270),
                           {"seed": SEED, "steps": 30, "cfg": 6.0, "sampler_name": "uni_pc", "scheduler": "simple",
                            "denoise": 1.0}),
            "decode": Node("VAEDecode", (220, 50)),
            "save": Node("SaveAnimatedWEBP", (420, 460),
                         {"filename_prefix": "personalization_guidance", "fps": 16.0, "lossless": False,
                          "quality": 90, "method": "default"}),
        },
        edges=[
            ("pair", "pair", "weak", "pair"),
            *_text_edges(False, clip=("clip", "CLIP")),
            ("pair", "finetuned_model", "shift", "model"),
            *_ksampler_edges(model=("shift", "MODEL"), vae=("vae", "VAE")),
        ],
        note=(
            "Wan 2.1 text to video (1.3B) with a subject LoRA, through the stock KSampler: the patched MODEL samples "
            "with two-way personalization guidance. KSampler's cfg is lambda, and its negative must be the empty "
            "prompt (the weak model sees it).\n\n"
            "The Diffusion Model Pair Loader loads the base and the LoRA; the text encoder (type wan) and the VAE "
            "come from their own loaders. ModelSamplingSD3 (shift 8, as ComfyUI's Wan template) goes before the "
            "patch.\n\n"
            "omega: how much of the LoRA the weak model keeps (1 = plain CFG, 0 = the base model). Start at 0.5.\n"
            "832x480, 33 frames (length 4k+1), 16 fps: the 1.3B model's size; the 14B takes 1280x720.",
            NOTE_SIZE,
        ),
    )


def tuning_sweep() -> Workflow:
    return Workflow(
        title="Tuning, a sweep grid of omega and lambda",
        columns=_columns(["weak", "positive", "null"], ["sweep", "noise", "sampler", "sigmas", "latent"],
                         ["save_grid"], ["preview_images"]),
        nodes={
            "pair": _pair(),
            "weak": _weak(title="Personalization Weak Model (the sweep uses its pair)"),
            **_prompts(negative=False),
            "sweep": Node("PG_Sweep", (380, 340),
                          {"estimate": TWO_WAY, "omega_values": "0.3, 0.5, 0.7, 1", "lambda_values": "4, 7.5, 11"}),
            **{key: node for key, node in _sampling_inputs(steps=20).items()},
            "save_grid": Node("SaveImage", (360, 460), {"filename_prefix": "pg_sweep_grid"}),
            "preview_images": Node("PreviewImage", (420, 460)),
        },
        edges=[
            ("pair", "pair", "weak", "pair"),
            *_text_edges(False),
            ("pair", "finetuned_model", "sweep", "model"),
            ("weak", "weak_model", "sweep", "weak_model"),
            ("positive", "CONDITIONING", "sweep", "positive"),
            ("null", "CONDITIONING", "sweep", "null_conditioning"),
            ("noise", "NOISE", "sweep", "noise"),
            ("sampler", "SAMPLER", "sweep", "sampler"),
            ("pair", "finetuned_model", "sigmas", "model"),
            ("sigmas", "SIGMAS", "sweep", "sigmas"),
            ("latent", "LATENT", "sweep", "latent_image"),
            ("pair", "vae", "sweep", "vae"),
            ("sweep", "grid", "save_grid", "images"),
            ("sweep", "images", "preview_images", "images"),
        ],
        note=(
            "Personalization Sweep: every omega (rows) and lambda (columns) from the same noise, in one queue, as a "
            "labelled grid. Each image is what the Personalization Guider samples with those values.\n\n"
            "omega_values and lambda_values: numbers separated by commas, at most 8 each (64 images in all). Keep "
            "omega 1 as the reference row: it is plain CFG on the fine-tuned model.\n\n"
            "With euler, as here, all 4 x 3 combinations are sampled together as one batch (the log says \"12 "
            "combinations in 1 sampling run(s)\"); a sampler that adds noise of its own (ancestral, SDE) samples them "
            "one after another. Tune at few steps, then sample the winner with the Personalization Guider (or save "
            "it with the Preset Saver).",
            NOTE_SIZE,
        ),
    )


def tuning_schedule_preview() -> Workflow:
    tail, tail_edges = _custom_advanced_tail(_guider(TWO_WAY, guidance_scale=7.5))
    return Workflow(
        title="Tuning, a schedule preview",
        columns=_columns(["weak", "positive", "null"], GUIDANCE_COLUMN, ["sample", "schedule_preview"],
                         ["decode", "save", "preview_plot"]),
        nodes={
            "pair": _pair(),
            "weak": _weak("cosine", 0.2, omega_end=1.0, guidance_start=0.0, guidance_end=0.8),
            **_prompts(negative=False),
            **tail,
            "schedule_preview": Node("PG_SchedulePreview", (320, 130),
                                     {"estimate": TWO_WAY, "estimate.guidance_scale": 7.5}),
            "preview_plot": Node("PreviewImage", (560, 400)),
        },
        edges=[
            ("pair", "pair", "weak", "pair"), *_text_edges(False), *tail_edges,
            ("pair", "finetuned_model", "schedule_preview", "model"),
            ("weak", "weak_model", "schedule_preview", "weak_model"),
            ("sigmas", "SIGMAS", "schedule_preview", "sigmas"),
            ("schedule_preview", "plot", "preview_plot", "images"),
        ],
        note=(
            "Personalization Schedule Preview plots omega(p) at every step of the sigmas, and the weight the "
            "estimate puts on each prediction, before you sample. Wire it as the guider: same weak model, same "
            "sigmas, same estimate and scales.\n\n"
            "Here omega rises (cosine) from 0.2 to 1 over the first 80% of sampling, then stays 1: plain CFG.\n\n"
            "To look before sampling, mute Save Image (select it, Ctrl+M) and queue: only the plot is made.",
            NOTE_SIZE,
        ),
    )


def _shipped_preset(name: str) -> dict[str, Any]:
    return json.loads((ROOT / "presets" / f"{name}.json").read_text())


def tuning_preset() -> Workflow:
    preset = _shipped_preset("sd15_lora")
    estimate = {"two-way": TWO_WAY, "three-way": THREE_WAY}[preset["estimate"]]
    scales = {"guidance_scale": preset["guidance_scale"]}
    if estimate == THREE_WAY:
        scales["personalization_scale"] = preset["personalization_scale"]
    tail, tail_edges = _custom_advanced_tail(_guider(estimate, "Personalization Guider (values of the preset)",
                                                     **scales))
    return Workflow(
        title="Tuning, presets",
        columns=_columns(["weak", "positive", "null"], GUIDANCE_COLUMN, ["sample"], ["decode", "save"],
                         first=("pair", "note", "save_preset")),
        nodes={
            "pair": _pair(),
            "weak": Node("PG_LoadPreset", (420, 120), {"preset": preset["name"]}),
            **_prompts(negative=False),
            **tail,
            "save_preset": Node("PG_SavePreset", (400, 290),
                                {"name": "my_sd15_subject", "description": "sd15_lora with a stronger pull (omega 0.4)",
                                 "schedule": preset["schedule"], "schedule.omega": 0.4,
                                 "guidance_start": preset["guidance_start"], "guidance_end": preset["guidance_end"],
                                 "estimate": estimate, **{f"estimate.{k}": v for k, v in scales.items()},
                                 "overwrite": True}),
        },
        edges=[("pair", "pair", "weak", "pair"), *_text_edges(False), *tail_edges],
        note=(
            "Personalization Preset Loader: a named starting point (here sd15_lora, for an SD1.5 subject LoRA) as a "
            "weak model with the preset's omega schedule. Its guidance_scale and personalization_scale outputs hold "
            "the preset's scales: drag them onto the guider's widgets of the same names to follow the preset (here "
            "they are typed in with the same values). Set the guider's estimate to the preset's.\n\n"
            "Personalization Preset Saver (below) writes its widgets to ComfyUI/user/personalization_guidance/presets/"
            "<name>.json each time this runs (overwrite on). Press R to see it in the loader's list. Rename it for "
            "your own presets, or delete the node.",
            NOTE_SIZE,
        ),
    )


WORKFLOWS = {
    make().slug: make
    for make in (lora_sampler_custom_advanced, full_checkpoint, ksampler_scheduled_omega, lora_omega_per_block, sdxl_lora,
                 qwen_image_lora, wan_text_to_video_lora, tuning_sweep, tuning_schedule_preview, tuning_preset)
}


def file_of(workflow: Workflow) -> Path:
    return OUT_DIR / f"{workflow.title}.json"


def main() -> None:
    schemas = json.loads(SNAPSHOT.read_text())["nodes"]
    OUT_DIR.mkdir(exist_ok=True)
    written = set()
    for make in WORKFLOWS.values():
        workflow = make()
        path = file_of(workflow)
        path.write_text(json.dumps(build(workflow, schemas), indent=2) + "\n")
        written.add(path.name)
        print(f"wrote {path.relative_to(ROOT)}")
    for stale in sorted(p for p in OUT_DIR.glob("*.json") if p.name not in written):
        print(f"not written by this generator (remove it?): {stale.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
