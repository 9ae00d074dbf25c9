"""example_workflows/tuning_*.json: the sweep, schedule preview and preset examples say what they claim.

Torch-only tier: no ComfyUI import. Their well-formedness against the node snapshot
is checked with the other examples in test_example_workflows.py; the host tier
executes them (tests/host/test_tuning_host.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from test_example_workflows import SCHEMAS, by_type, load, origin_of, widgets

from guidance import check_scale, check_unit_interval, parse_preset, parse_values

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "example_workflows"
ESTIMATE_LABELS = {"two-way": "two-way (paper)", "three-way": "three-way"}


def test_the_tuning_examples_exist():
    assert {p.stem for p in EXAMPLES.glob("tuning_*.json")} == {"tuning_sweep", "tuning_schedule_preview", "tuning_preset"}


def test_tuning_nodes_are_in_the_snapshot():
    for kind in ("PG_Sweep", "PG_SchedulePreview", "PG_LoadPreset", "PG_SavePreset"):
        assert kind in SCHEMAS, f"{kind}: regenerate tests/schemas/node_schemas.json"


def test_sweep_example_sweeps_valid_lists_including_plain_cfg():
    workflow = load(EXAMPLES / "tuning_sweep.json")
    (sweep,) = by_type(workflow, "PG_Sweep")
    (pair,) = by_type(workflow, "PG_LoadFinetunedPair")
    values = widgets(sweep)
    omegas = parse_values("omega_values", values["omega_values"], check_unit_interval)
    lambdas = parse_values("lambda_values", values["lambda_values"], check_scale)
    assert 1.0 in omegas and len(omegas) * len(lambdas) > 1
    assert origin_of(workflow, sweep, "model") is pair and origin_of(workflow, sweep, "vae") is pair
    assert origin_of(workflow, origin_of(workflow, sweep, "sigmas"), "model") is pair
    assert origin_of(workflow, sweep, "negative") is None and values["estimate"] == "two-way (paper)"
    kinds = {origin_of(workflow, n, "images")["type"] for n in workflow["nodes"] if n["type"] in ("SaveImage", "PreviewImage")}
    assert kinds == {"PG_Sweep"}


def test_schedule_preview_example_is_wired_as_its_guider():
    workflow = load(EXAMPLES / "tuning_schedule_preview.json")
    (preview,) = by_type(workflow, "PG_SchedulePreview")
    (guider,) = by_type(workflow, "PG_PersonalizationGuider")
    (sampler,) = by_type(workflow, "SamplerCustomAdvanced")
    assert origin_of(workflow, preview, "weak_model") is origin_of(workflow, guider, "weak_model")
    assert origin_of(workflow, preview, "model") is origin_of(workflow, guider, "model")
    assert origin_of(workflow, preview, "sigmas") is origin_of(workflow, sampler, "sigmas")
    for name in ("estimate", "guidance_scale", "personalization_scale"):
        assert widgets(preview)[name] == widgets(guider)[name], name
    weak = origin_of(workflow, preview, "weak_model")
    assert widgets(weak)["schedule"] != "constant"
    (plot,) = by_type(workflow, "PreviewImage")
    assert origin_of(workflow, plot, "images") is preview


def test_preset_example_loads_a_shipped_preset_and_uses_its_values():
    workflow = load(EXAMPLES / "tuning_preset.json")
    (load_preset,) = by_type(workflow, "PG_LoadPreset")
    (guider,) = by_type(workflow, "PG_PersonalizationGuider")
    (save,) = by_type(workflow, "PG_SavePreset")
    name = widgets(load_preset)["preset"]
    preset = parse_preset((ROOT / "presets" / f"{name}.json").read_bytes())
    assert origin_of(workflow, guider, "weak_model") is load_preset
    assert widgets(guider)["estimate"] == ESTIMATE_LABELS[preset.estimate.value]
    assert widgets(guider)["guidance_scale"] == preset.guidance_scale
    saved = widgets(save)
    assert saved["name"] != name and saved["overwrite"] is True
    parse_preset(json.dumps({"version": 1, **{k: v for k, v in saved.items() if k != "overwrite"},
                             "estimate": {v: k for k, v in ESTIMATE_LABELS.items()}[saved["estimate"]]}))
