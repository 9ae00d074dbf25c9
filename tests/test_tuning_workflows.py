"""example_workflows/Tuning, *.json: the sweep, schedule preview and preset examples say what they claim.

Torch-only tier: no ComfyUI import. Their well-formedness against the node snapshot
is checked with the other examples in test_example_workflows.py; the host tier
executes them (tests/host/test_tuning_host.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from test_example_workflows import SCHEMAS, by_type, example, origin_of, widgets

from guidance import check_scale, check_unit_interval, parse_preset, parse_values

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "example_workflows"
ESTIMATE_LABELS = {"two-way": "two-way (paper)", "three-way": "three-way"}


def test_the_tuning_examples_exist():
    assert {p.stem for p in EXAMPLES.glob("Tuning*.json")} == {
        "Tuning, a sweep grid of omega and lambda", "Tuning, a schedule preview", "Tuning, presets"}


def test_tuning_nodes_are_in_the_snapshot():
    for kind in ("PG_Sweep", "PG_SchedulePreview", "PG_LoadPreset", "PG_SavePreset"):
        assert kind in SCHEMAS, f"{kind}: regenerate tests/schemas/node_schemas.json"


def test_sweep_example_sweeps_valid_lists_including_plain_cfg():
    workflow = example("Tuning, a sweep")
    (sweep,) = by_type(workflow, "PG_Sweep")
    (pair,) = by_type(workflow, "PG_LoadFinetunedPair")
    values = widgets(sweep)
    omegas = parse_values("omega_values", values["omega_values"], check_unit_interval)
    lambdas = parse_values("lambda_values", values["lambda_values"], check_scale)
    assert 1.0 in omegas and len(omegas) * len(lambdas) > 1
    assert origin_of(workflow, sweep, "model") is pair and origin_of(workflow, sweep, "vae") is pair
    assert origin_of(workflow, origin_of(workflow, sweep, "sigmas"), "model") is pair
    assert values["estimate"] == "two-way (paper)" and "estimate.negative" not in {i["name"] for i in sweep["inputs"]}
    kinds = {origin_of(workflow, n, "images")["type"] for n in workflow["nodes"] if n["type"] in ("SaveImage", "PreviewImage")}
    assert kinds == {"PG_Sweep"}


def test_sweep_note_says_how_the_combinations_are_sampled():
    """With a sampler that draws no noise (euler) the sweep batches every combination: one sampling run."""
    workflow = example("Tuning, a sweep")
    (sampler,) = by_type(workflow, "KSamplerSelect")
    (note,) = by_type(workflow, "Note")
    values = widgets(by_type(workflow, "PG_Sweep")[0])
    count = len(values["omega_values"].split(",")) * len(values["lambda_values"].split(","))
    assert widgets(sampler)["sampler_name"] == "euler"
    text = note["widgets_values"][0]
    assert f'"{count} combinations in 1 sampling run(s)"' in text
    assert not re.search(r"one after the other: .* costs \d+ runs", text)


def test_schedule_preview_example_is_wired_as_its_guider():
    workflow = example("Tuning, a schedule preview")
    (preview,) = by_type(workflow, "PG_SchedulePreview")
    (guider,) = by_type(workflow, "PG_PersonalizationGuider")
    (sampler,) = by_type(workflow, "SamplerCustomAdvanced")
    assert origin_of(workflow, preview, "weak_model") is origin_of(workflow, guider, "weak_model")
    assert origin_of(workflow, preview, "model") is origin_of(workflow, guider, "model")
    assert origin_of(workflow, preview, "sigmas") is origin_of(workflow, sampler, "sigmas")
    assert widgets(preview) == widgets(guider)  # the estimate and the scales it shows
    weak = origin_of(workflow, preview, "weak_model")
    assert widgets(weak)["schedule"] != "constant"
    (plot,) = by_type(workflow, "PreviewImage")
    assert origin_of(workflow, plot, "images") is preview


def test_preset_example_loads_a_shipped_preset_and_uses_its_values():
    workflow = example("Tuning, presets")
    (load_preset,) = by_type(workflow, "PG_LoadPreset")
    (guider,) = by_type(workflow, "PG_PersonalizationGuider")
    (save,) = by_type(workflow, "PG_SavePreset")
    name = widgets(load_preset)["preset"]
    preset = parse_preset((ROOT / "presets" / f"{name}.json").read_bytes())
    assert origin_of(workflow, guider, "weak_model") is load_preset
    assert widgets(guider)["estimate"] == ESTIMATE_LABELS[preset.estimate.value]
    assert widgets(guider)["estimate.guidance_scale"] == preset.guidance_scale
    saved = widgets(save)
    assert saved["name"] != name and saved["overwrite"] is True
    assert saved["estimate"] == "two-way (paper)" and saved["schedule"] == "constant"
    parse_preset(json.dumps({
        "version": 1, "name": saved["name"], "description": saved["description"], "schedule": saved["schedule"],
        "omega": saved["schedule.omega"], "omega_end": saved["schedule.omega"], "guidance_start": saved["guidance_start"],
        "guidance_end": saved["guidance_end"], "estimate": "two-way", "guidance_scale": saved["estimate.guidance_scale"],
        "personalization_scale": saved["estimate.guidance_scale"],
    }))
