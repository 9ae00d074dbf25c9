"""Writes example_workflows/*.json: UI-format workflows (frontend format 0.4) for ComfyUI's template browser.

Each workflow is declared below as nodes (widget values by input name; the rest take
their defaults) and edges by socket name. The slot indices, ``widgets_values`` order
and link records come from the node snapshot ``tests/schemas/node_schemas.json``, so
this needs no ComfyUI. Run it from anywhere after changing a workflow or the snapshot:

    python tools/build_example_workflows.py

``tests/test_example_workflows.py`` checks the output against the snapshot and the
host tier executes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "tests" / "schemas" / "node_schemas.json"
OUT_DIR = ROOT / "example_workflows"

BASE = "v1-5-pruned-emaonly.safetensors"
LORA = "my_subject_lora.safetensors"
DREAMBOOTH = "my_dreambooth_model.safetensors"
PROMPT = "a photo of sks dog wearing a red hat on the beach"
NEGATIVE = "blurry, low quality, deformed, watermark"
TWO_WAY, THREE_WAY = "two-way (paper)", "three-way"
SEED = 42


@dataclass
class Node:
    type: str
    pos: tuple[int, int]
    size: tuple[int, int]
    widgets: dict[str, Any] = field(default_factory=dict)
    title: str | None = None


@dataclass
class Workflow:
    nodes: dict[str, Node]
    edges: list[tuple[str, str, str, str]]  # (from node, output name, to node, input name)
    note: tuple[str, tuple[int, int], tuple[int, int]]  # (text, pos, size)


def _widget_values(spec: dict, node: Node) -> list:
    widgets = [i for i in spec["inputs"] if i["widget"]]
    unknown = set(node.widgets) - {i["name"] for i in widgets}
    if unknown:
        raise KeyError(f"{node.type} has no widget {sorted(unknown)}")
    values = []
    for entry in widgets:
        if entry["name"] in node.widgets:
            values.append(node.widgets[entry["name"]])
        elif "default" in entry:
            values.append(entry["default"])
        else:
            raise KeyError(f"{node.type}.{entry['name']} has no default: give a value")
        if entry["control_after_generate"]:
            values.append("fixed")
    return values


def _order(ids: list[int], links: list[list]) -> dict[int, int]:
    """Execution order as the frontend stores it: a topological order, ties by node id."""
    pending = {i: {link[1] for link in links if link[3] == i} for i in ids}
    order = {}
    while pending:
        ready = min(i for i, deps in pending.items() if not deps - set(order))
        order[ready] = len(order)
        del pending[ready]
    return order


def build(workflow: Workflow, schemas: dict[str, dict]) -> dict[str, Any]:
    keys = list(workflow.nodes)
    ids = {key: n for n, key in enumerate(keys, start=1)}
    note_id = len(keys) + 1
    sockets = {key: [i for i in schemas[node.type]["inputs"] if not i["widget"]] for key, node in workflow.nodes.items()}

    links = []
    for link_id, (src, output, dst, input_name) in enumerate(workflow.edges, start=1):
        outputs = schemas[workflow.nodes[src].type]["outputs"]
        slot = [o["name"] for o in outputs].index(output)
        to_slot = [i["name"] for i in sockets[dst]].index(input_name)
        links.append([link_id, ids[src], slot, ids[dst], to_slot, outputs[slot]["type"]])
    order = _order(list(ids.values()) + [note_id], links)

    nodes = []
    for key, node in workflow.nodes.items():
        spec, node_id = schemas[node.type], ids[key]
        inputs = []
        for entry in sockets[key]:
            linked = [link[0] for link in links if link[3] == node_id and link[4] == len(inputs)]
            inputs.append({"name": entry["name"], "type": entry["type"], "link": linked[0] if linked else None,
                           **({} if entry["required"] else {"shape": 7})})
        inputs += [{"name": i["name"], "type": i["type"], "widget": {"name": i["name"]}, "link": None}
                   for i in spec["inputs"] if i["widget"]]
        outputs = [{"name": o["name"], "type": o["type"], "slot_index": slot,
                    "links": [link[0] for link in links if link[1] == node_id and link[2] == slot]}
                   for slot, o in enumerate(spec["outputs"])]
        nodes.append({
            "id": node_id, "type": node.type, "pos": list(node.pos), "size": list(node.size), "flags": {},
            "order": order[node_id], "mode": 0, "inputs": inputs, "outputs": outputs,
            **({"title": node.title} if node.title else {}),
            "properties": {"Node name for S&R": node.type},
            "widgets_values": _widget_values(spec, node),
        })
    text, pos, size = workflow.note
    nodes.append({"id": note_id, "type": "Note", "pos": list(pos), "size": list(size), "flags": {},
                  "order": order[note_id], "mode": 0, "inputs": [], "outputs": [], "title": "What to tune",
                  "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"})

    return {
        "last_node_id": note_id,
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.75, "offset": [0, 0]}},
        "version": 0.4,
    }


def _prompts(x: int, y: int, negative: bool) -> dict[str, Node]:
    nodes = {
        "positive": Node("CLIPTextEncode", (x, y), (420, 150), {"text": PROMPT}, "Prompt (c)"),
        "null": Node("CLIPTextEncode", (x, y + 200), (420, 100), {"text": ""}, "Null prompt: leave empty"),
    }
    if negative:
        nodes["negative"] = Node("CLIPTextEncode", (x, y + 350), (420, 120), {"text": NEGATIVE}, "Negative prompt (n)")
    return nodes


def _text_edges(negative: bool) -> list[tuple[str, str, str, str]]:
    names = ("positive", "null", "negative") if negative else ("positive", "null")
    return [("pair", "clip", name, "clip") for name in names]


def _custom_advanced_tail(guider: Node) -> tuple[dict[str, Node], list]:
    nodes = {
        "guider": guider,
        "noise": Node("RandomNoise", (1010, 470), (320, 90), {"noise_seed": SEED}),
        "sampler": Node("KSamplerSelect", (1010, 600), (320, 60), {"sampler_name": "euler"}),
        "sigmas": Node("BasicScheduler", (1010, 700), (320, 110), {"scheduler": "normal", "steps": 25, "denoise": 1.0}),
        "latent": Node("EmptyLatentImage", (1010, 850), (320, 110), {"width": 512, "height": 512, "batch_size": 1}),
        "sample": Node("SamplerCustomAdvanced", (1380, 140), (300, 330)),
        "decode": Node("VAEDecode", (1730, 140), (210, 50)),
        "save": Node("SaveImage", (1730, 240), (420, 460), {"filename_prefix": "personalization_guidance"}),
    }
    edges = [
        ("pair", "finetuned_model", "guider", "model"),
        ("weak", "weak_model", "guider", "weak_model"),
        ("positive", "CONDITIONING", "guider", "positive"),
        ("null", "CONDITIONING", "guider", "null_conditioning"),
        ("pair", "finetuned_model", "sigmas", "model"),
        ("noise", "NOISE", "sample", "noise"),
        ("guider", "guider", "sample", "guider"),
        ("sampler", "SAMPLER", "sample", "sampler"),
        ("sigmas", "SIGMAS", "sample", "sigmas"),
        ("latent", "LATENT", "sample", "latent_image"),
        ("sample", "output", "decode", "samples"),
        ("pair", "vae", "decode", "vae"),
        ("decode", "IMAGE", "save", "images"),
    ]
    return nodes, edges


def lora_sampler_custom_advanced() -> Workflow:
    tail, tail_edges = _custom_advanced_tail(
        Node("PG_PersonalizationGuider", (1010, 140), (320, 270), {"estimate": TWO_WAY, "guidance_scale": 7.5}))
    return Workflow(
        nodes={
            "pair": Node("PG_LoadFinetunedPair", (40, 140), (400, 200),
                         {"base_checkpoint": BASE, "personalization": "LoRA", "lora_name": LORA, "lora_strength": 1.0}),
            "weak": Node("PG_WeakModelInterpolator", (520, 140), (420, 200), {"schedule": "constant", "omega": 0.5}),
            **_prompts(520, 400, negative=False),
            **tail,
        },
        edges=[("pair", "pair", "weak", "pair"), *_text_edges(False), *tail_edges],
        note=(
            "Personalization guidance (arXiv 2508.00319), two-way: the weak model on the empty prompt guides the "
            "fine-tuned model, at the cost of CFG.\n\n"
            "omega (Weak Model Interpolator): how much of the LoRA the weak model keeps. 1 = plain CFG on the "
            "fine-tuned model; lower pulls harder toward the personalized subject (0 = base model). Start at 0.5.\n\n"
            "guidance_scale (lambda): as CFG's scale; 1 = the fine-tuned model alone.\n\n"
            "Keep the null prompt empty, and sample (and schedule) with the fine-tuned model.",
            (40, 420), (400, 330),
        ),
    )


def full_checkpoint() -> Workflow:
    tail, tail_edges = _custom_advanced_tail(
        Node("PG_PersonalizationGuider", (1010, 140), (320, 270),
             {"estimate": THREE_WAY, "guidance_scale": 7.5, "personalization_scale": 3.0}))
    return Workflow(
        nodes={
            "pair": Node("PG_LoadFinetunedPair", (40, 140), (400, 200),
                         {"base_checkpoint": BASE, "personalization": "fine-tuned checkpoint",
                          "finetuned_checkpoint": DREAMBOOTH}),
            "weak": Node("PG_WeakModelInterpolator", (520, 140), (420, 200), {"schedule": "constant", "omega": 0.5}),
            **_prompts(520, 400, negative=True),
            **tail,
        },
        edges=[("pair", "pair", "weak", "pair"), *_text_edges(True), *tail_edges,
               ("negative", "CONDITIONING", "guider", "negative")],
        note=(
            "Full fine-tuned checkpoint (DreamBooth) against its base; three-way estimate (this pack's extension) "
            "for a negative prompt.\n\n"
            "guidance_scale (lambda_t): the text / negative-prompt scale, as CFG's.\n"
            "personalization_scale (lambda_p): the pull away from the weak model. Equal to guidance_scale = the "
            "paper's two-way estimate; 1 = plain CFG with the negative.\n"
            "omega: how much of the fine-tune the weak model keeps (1 = the fine-tuned model itself, 0 = the "
            "base). Start at 0.5.\n\n"
            "Two full checkpoints are resident while sampling.",
            (40, 420), (400, 330),
        ),
    )


def ksampler_scheduled_omega() -> Workflow:
    return Workflow(
        nodes={
            "pair": Node("PG_LoadFinetunedPair", (40, 140), (400, 200),
                         {"base_checkpoint": BASE, "personalization": "LoRA", "lora_name": LORA, "lora_strength": 1.0}),
            "weak": Node("PG_WeakModelInterpolator", (520, 140), (420, 200),
                         {"schedule": "cosine", "omega": 0.2, "omega_end": 1.0, "guidance_start": 0.0,
                          "guidance_end": 0.8}),
            **_prompts(520, 400, negative=False),
            "patch": Node("PG_PersonalizationGuidanceModel", (1010, 140), (320, 130), {"estimate": TWO_WAY}),
            "latent": Node("EmptyLatentImage", (1010, 470), (320, 110), {"width": 512, "height": 512, "batch_size": 1}),
            "sample": Node("KSampler", (1380, 140), (320, 270),
                           {"seed": SEED, "steps": 25, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
                            "denoise": 1.0}),
            "decode": Node("VAEDecode", (1750, 140), (210, 50)),
            "save": Node("SaveImage", (1750, 240), (420, 460), {"filename_prefix": "personalization_guidance"}),
        },
        edges=[
            ("pair", "pair", "weak", "pair"),
            *_text_edges(False),
            ("pair", "finetuned_model", "patch", "model"),
            ("weak", "weak_model", "patch", "weak_model"),
            ("patch", "MODEL", "sample", "model"),
            ("positive", "CONDITIONING", "sample", "positive"),
            ("null", "CONDITIONING", "sample", "negative"),
            ("latent", "LATENT", "sample", "latent_image"),
            ("sample", "LATENT", "decode", "samples"),
            ("pair", "vae", "decode", "vae"),
            ("decode", "IMAGE", "save", "images"),
        ],
        note=(
            "The KSampler route: the patched MODEL makes KSampler (and detailers, upscalers) sample with "
            "personalization guidance. KSampler's cfg is lambda; in two-way its negative must be the empty prompt.\n\n"
            "Scheduled omega: cosine from omega 0.2 (strong pull toward the subject) to omega_end 1.0 over the first "
            "80% of sampling (guidance_start 0 to guidance_end 0.8); after that, plain CFG. guidance_end < 1 leaves "
            "the last, detail-forming steps to the fine-tuned model.",
            (40, 420), (400, 330),
        ),
    )


def tuning_sweep() -> Workflow:
    return Workflow(
        nodes={
            "pair": Node("PG_LoadFinetunedPair", (40, 140), (400, 200),
                         {"base_checkpoint": BASE, "personalization": "LoRA", "lora_name": LORA, "lora_strength": 1.0}),
            "weak": Node("PG_WeakModelInterpolator", (520, 140), (420, 200), {"schedule": "constant", "omega": 0.5},
                         "Weak Model Interpolator (the sweep uses its pair)"),
            **_prompts(520, 400, negative=False),
            "noise": Node("RandomNoise", (1010, 470), (320, 90), {"noise_seed": SEED}),
            "sampler": Node("KSamplerSelect", (1010, 600), (320, 60), {"sampler_name": "euler"}),
            "sigmas": Node("BasicScheduler", (1010, 700), (320, 110), {"scheduler": "normal", "steps": 20, "denoise": 1.0}),
            "latent": Node("EmptyLatentImage", (1010, 850), (320, 110), {"width": 512, "height": 512, "batch_size": 1}),
            "sweep": Node("PG_Sweep", (1010, 140), (340, 300),
                          {"estimate": TWO_WAY, "omega_values": "0.3, 0.5, 0.7, 1", "lambda_values": "4, 7.5, 11"}),
            "save_grid": Node("SaveImage", (1400, 140), (520, 560), {"filename_prefix": "pg_sweep_grid"}),
            "preview_images": Node("PreviewImage", (1400, 740), (520, 300)),
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
            "PG Sweep: every omega (rows) and lambda (columns) from the same noise, in one queue, as a labelled "
            "grid. Each image is exactly what the Personalization Guider samples with those values.\n\n"
            "omega_values and lambda_values: numbers separated by commas, at most 8 each (64 images in all). Keep "
            "omega 1 as the reference row: it is plain CFG on the fine-tuned model.\n\n"
            "Combinations are sampled one after the other: 4 x 3 here costs 12 runs. Tune at few steps, then "
            "sample the winner with the Personalization Guider (or save it with PG Save Preset).",
            (40, 420), (400, 330),
        ),
    )


def tuning_schedule_preview() -> Workflow:
    tail, tail_edges = _custom_advanced_tail(
        Node("PG_PersonalizationGuider", (1010, 140), (320, 270), {"estimate": TWO_WAY, "guidance_scale": 7.5}))
    return Workflow(
        nodes={
            "pair": Node("PG_LoadFinetunedPair", (40, 140), (400, 200),
                         {"base_checkpoint": BASE, "personalization": "LoRA", "lora_name": LORA, "lora_strength": 1.0}),
            "weak": Node("PG_WeakModelInterpolator", (520, 140), (420, 200),
                         {"schedule": "cosine", "omega": 0.2, "omega_end": 1.0, "guidance_start": 0.0,
                          "guidance_end": 0.8}),
            **_prompts(520, 400, negative=False),
            **tail,
            "schedule_preview": Node("PG_SchedulePreview", (1380, 520), (300, 200),
                                     {"estimate": TWO_WAY, "guidance_scale": 7.5}),
            "preview_plot": Node("PreviewImage", (1730, 760), (560, 400)),
        },
        edges=[
            ("pair", "pair", "weak", "pair"), *_text_edges(False), *tail_edges,
            ("pair", "finetuned_model", "schedule_preview", "model"),
            ("weak", "weak_model", "schedule_preview", "weak_model"),
            ("sigmas", "SIGMAS", "schedule_preview", "sigmas"),
            ("schedule_preview", "plot", "preview_plot", "images"),
        ],
        note=(
            "PG Schedule Preview plots omega(p) at every step of the sigmas, and the weight the estimate puts on "
            "each prediction, before you sample. Wire it as the guider: same weak model, same sigmas, same "
            "estimate and scales.\n\n"
            "Here omega rises (cosine) from 0.2 to 1 over the first 80% of sampling, then stays 1: plain CFG.\n\n"
            "To look before sampling, mute Save Image (select it, Ctrl+M) and queue: only the plot is made.",
            (40, 420), (400, 330),
        ),
    )


def _shipped_preset(name: str) -> dict[str, Any]:
    return json.loads((ROOT / "presets" / f"{name}.json").read_text())


def tuning_preset() -> Workflow:
    preset = _shipped_preset("sd15_lora")
    estimate = {"two-way": TWO_WAY, "three-way": THREE_WAY}[preset["estimate"]]
    tail, tail_edges = _custom_advanced_tail(
        Node("PG_PersonalizationGuider", (1010, 140), (320, 270),
             {"estimate": estimate, "guidance_scale": preset["guidance_scale"],
              "personalization_scale": preset["personalization_scale"]},
             "Personalization Guider (values of the preset)"))
    return Workflow(
        nodes={
            "pair": Node("PG_LoadFinetunedPair", (40, 140), (400, 200),
                         {"base_checkpoint": BASE, "personalization": "LoRA", "lora_name": LORA, "lora_strength": 1.0}),
            "weak": Node("PG_LoadPreset", (520, 140), (420, 130), {"preset": preset["name"]}),
            **_prompts(520, 400, negative=False),
            **tail,
            "save_preset": Node("PG_SavePreset", (40, 800), (400, 420),
                                {"name": "my_sd15_subject", "description": "sd15_lora with a stronger pull (omega 0.4)",
                                 "schedule": preset["schedule"], "omega": 0.4, "omega_end": 0.4,
                                 "guidance_start": preset["guidance_start"], "guidance_end": preset["guidance_end"],
                                 "estimate": estimate, "guidance_scale": preset["guidance_scale"],
                                 "personalization_scale": preset["personalization_scale"], "overwrite": True}),
        },
        edges=[("pair", "pair", "weak", "pair"), *_text_edges(False), *tail_edges],
        note=(
            "PG Load Preset: a named starting point (here sd15_lora, for an SD1.5 subject LoRA) as a weak model with "
            "the preset's omega schedule. Its estimate, guidance_scale and personalization_scale outputs hold the "
            "preset's scales: drag them onto the guider's widgets of the same names to follow the preset (here "
            "they are typed in with the same values).\n\n"
            "PG Save Preset writes its widgets to ComfyUI/user/personalization_guidance/presets/<name>.json each "
            "time this runs (overwrite on). Press R to see it in PG Load Preset's list. Rename it for your own "
            "presets, or delete the node.",
            (40, 420), (400, 330),
        ),
    )


WORKFLOWS = {
    "personalization_lora_sampler_custom_advanced": lora_sampler_custom_advanced,
    "personalization_full_checkpoint": full_checkpoint,
    "personalization_ksampler_scheduled_omega": ksampler_scheduled_omega,
    "tuning_sweep": tuning_sweep,
    "tuning_schedule_preview": tuning_schedule_preview,
    "tuning_preset": tuning_preset,
}


def main() -> None:
    schemas = json.loads(SNAPSHOT.read_text())["nodes"]
    OUT_DIR.mkdir(exist_ok=True)
    for name, make in WORKFLOWS.items():
        path = OUT_DIR / f"{name}.json"
        path.write_text(json.dumps(build(make(), schemas), indent=2) + "\n")
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
