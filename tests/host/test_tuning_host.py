"""The tuning nodes in a real ComfyUI, on the tiny models: PG Sweep, PG Schedule Preview, PG Load/Save Preset.

- The sweep's images are bit-identical to the Personalization Guider sampled on its
  own, combination by combination, with the same noise; its grid holds them, labelled.
- The schedule preview plots the omega the runtime uses at each sigma, and the number
  of model evaluations that sampling then makes.
- Presets: the shipped ones load; save then load gives back what was saved; bad names
  and values are refused before anything is written.
- The "Tuning, ..." example workflows run as ComfyUI's server runs them, and the
  preset workflow queued twice executes nothing the second time (the preset's
  fingerprint keeps it cached).

``PG_WRITE_DOCS=1`` also writes the pictures of docs/tuning.md, docs/sweep_grid_tiny.png and
docs/schedule_preview.png (tiny random-weight models, so the images are not pretty).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import comfy.samplers
import folder_paths
import pytest
import schemas
import torch
import workflow_api

PACK_DIR = Path(__file__).resolve().parents[2]
SIZE = 64
STEPS = 2
SEED = 5


@pytest.fixture(scope="module")
def user_dir(comfy_host, tmp_path_factory):
    """ComfyUI's user directory pointed at a temporary folder for this module (saved presets land there)."""
    previous = folder_paths.get_user_directory()
    folder = tmp_path_factory.mktemp("user")
    folder_paths.set_user_directory(str(folder))
    yield folder
    folder_paths.set_user_directory(previous)


@pytest.fixture(scope="module")
def setup(comfy_host, tiny_files):
    nodes = comfy_host.nodes
    pair, model, _clip, vae = nodes.load_pair.LoadFinetunedPair.execute(
        tiny_files["base"], "LoRA", tiny_files["lora"], 1.0, "none").args
    gen = torch.Generator().manual_seed(11)
    positive, null, negative = ([[torch.randn(1, 77, 768, generator=gen), {}]] for _ in range(3))
    return {"nodes": nodes, "guidance": comfy_host.guidance, "pair": pair, "model": model, "vae": vae,
            "positive": positive, "null": null, "negative": negative}


def sampling_inputs(model, sampler_name="euler_ancestral", steps=STEPS):
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    latent = {"samples": torch.zeros(1, 4, SIZE // 8, SIZE // 8)}
    return Noise_RandomNoise(SEED), comfy.samplers.sampler_object(sampler_name), sigmas, latent


LAMBDA_T, LAMBDA_P = "guidance_scale (lambda_t)", "personalization_scale (lambda_p)"


def run_sweep(setup, estimate, omega_values, lambda_values, lambda_sweeps=LAMBDA_T, negative=None,
              guidance_scale=7.5, personalization_scale=3.0, latent=None, sampler_name="euler_ancestral"):
    noise, sampler, sigmas, empty = sampling_inputs(setup["model"], sampler_name)
    with torch.inference_mode():
        return setup["nodes"].tuning.sweep.Sweep.execute(
            setup["model"], comfy_weak(setup, 0.5), setup["positive"], setup["null"], noise, sampler, sigmas,
            latent or empty, setup["vae"], estimate, omega_values, lambda_values, lambda_sweeps, guidance_scale,
            personalization_scale, negative=negative).args


def comfy_weak(setup, omega, **schedule):
    settings = {"schedule": "constant", "omega": omega, "omega_end": omega, "guidance_start": 0.0,
                "guidance_end": 1.0, **schedule}
    return setup["nodes"].weak_model.WeakModelInterpolator.execute(setup["pair"], **settings).args[0]


def guider_image(setup, omega, estimate, guidance_scale, personalization_scale, negative=None, sampler_name="euler_ancestral",
                 latent=None):
    """The same combination the way a user samples it: Weak Model Interpolator, guider, SamplerCustomAdvanced, VAEDecode."""
    from comfy_extras.nodes_custom_sampler import SamplerCustomAdvanced

    import nodes as comfy_nodes

    noise, sampler, sigmas, empty = sampling_inputs(setup["model"], sampler_name)
    latent = latent or empty
    with torch.inference_mode():
        guider = setup["nodes"].guider.PersonalizationGuider.execute(
            setup["model"], comfy_weak(setup, omega), setup["positive"], setup["null"], estimate, guidance_scale,
            personalization_scale, negative=negative).args[0]
        samples = SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent).args[0]
        return comfy_nodes.VAEDecode().decode(setup["vae"], samples)[0]


def grid_layout(setup, grid, rows, cols):
    """The layout the sweep drew (same labels, same font) and a check that its size is the grid's."""
    image_grid = setup["nodes"].tuning.image_grid
    font = image_grid.label_font(SIZE, SIZE, cols)
    layout = image_grid.grid_layout(len(rows), len(cols), SIZE, SIZE, rows, cols, font)
    assert grid.shape[1:] == (layout.height, layout.width, 3)
    return layout


def assert_labels_drawn(grid, layout):
    """Every row label's and column label's margin area holds dark (text) pixels; the corner stays white."""
    for row in range(layout.rows):
        y, _ = layout.cell(row, 0)
        assert grid[y : y + layout.cell_height, : layout.left].min() < 0.5, f"row {row} has no label"
    for col in range(layout.cols):
        _, x = layout.cell(0, col)
        assert grid[: layout.top, x : x + layout.cell_width].min() < 0.5, f"column {col} has no label"
    assert torch.all(grid[: layout.top, : layout.left] == 1.0)


# ------------------------------------------------------------------------------------------------ schemas


@pytest.mark.parametrize("kind", ["PG_LoadFinetunedPair", "PG_PairFromModels", "PG_WeakModelInterpolator",
                                  "PG_PersonalizationGuider", "PG_PersonalizationGuidanceModel", "PG_Sweep",
                                  "PG_SchedulePreview", "PG_LoadPreset", "PG_SavePreset"])
def test_every_input_and_output_has_a_tooltip(comfy_host, kind):
    (node,) = [n for n in comfy_host.nodes.NODES if n.define_schema().node_id == kind]
    schema = node.define_schema()
    assert schema.description and schema.display_name.startswith("Personalization")

    def items(inputs):
        for item in inputs:
            yield item
            for option in getattr(item, "options", None) or []:
                if hasattr(option, "inputs"):  # a DynamicCombo's option
                    yield from items(option.inputs)

    for item in [*items(schema.inputs), *schema.outputs]:
        assert item.tooltip and len(item.tooltip) > 20, (kind, item.id)


# ------------------------------------------------------------------------------------------------ sweep


@pytest.mark.parametrize(
    ("estimate", "lambda_sweeps", "negative"),
    [("two-way (paper)", LAMBDA_T, False), ("three-way", LAMBDA_P, True)],
    ids=["two-way", "three-way-lambda-p"],
)
def test_sweep_images_equal_the_guider_sampled_separately(setup, estimate, lambda_sweeps, negative):
    negative = setup["negative"] if negative else None
    omegas, lambdas = (0.3, 1.0), (1.5, 5.0)
    grid, images, labels = run_sweep(setup, estimate, "0.3, 1", "1.5, 5", lambda_sweeps, negative=negative,
                                     guidance_scale=6.0, personalization_scale=2.0)

    assert images.shape == (4, SIZE, SIZE, 3)
    symbol = "lambda" if estimate.startswith("two") else "lambda_p"
    assert labels.splitlines() == [f"omega {o:g}, {symbol} {lam:g}" for o in omegas for lam in lambdas]
    for index, (omega, lam) in enumerate((o, lam) for o in omegas for lam in lambdas):
        scales = (lam, 2.0) if lambda_sweeps == LAMBDA_T else (6.0, lam)
        expected = guider_image(setup, omega, estimate, *scales, negative=negative)
        assert torch.equal(images[index : index + 1], expected), (omega, lam)
    assert not torch.equal(images[0], images[3])

    layout = grid_layout(setup, grid, [f"omega {o:g}" for o in omegas], [f"{symbol} {lam:g}" for lam in lambdas])
    assert grid.shape[0] == 1 and (layout.rows, layout.cols) == (2, 2)
    for index in range(4):
        y, x = layout.cell(*divmod(index, 2))
        assert torch.equal(grid[0, y : y + SIZE, x : x + SIZE], images[index])
    assert_labels_drawn(grid[0], layout)


class ForwardRows:
    """The batch rows of every diffusion-model forward while in use."""

    def __init__(self, model):
        self.rows = []
        self.module = model.model.diffusion_model

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(lambda m, args: self.rows.append(args[0].shape[0]))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize(
    ("estimate", "lambda_sweeps", "negative", "batch"),
    [("two-way (paper)", LAMBDA_T, False, 1), ("three-way", LAMBDA_P, True, 2), ("three-way", LAMBDA_T, False, 1)],
    ids=["two-way", "three-way-lambda-p-batch-2", "three-way-lambda-t"],
)
def test_batched_sweep_equals_separate_runs(setup, estimate, lambda_sweeps, negative, batch):
    """With a sampler that draws no noise (euler) every combination rides in one batch, with its own omega and
    scale per row: the images equal separate guider runs up to floating-point rounding."""
    negative = setup["negative"] if negative else None
    omegas, lambdas = (0.3, 1.0), (1.0, 5.0)
    latent = {"samples": torch.zeros(batch, 4, SIZE // 8, SIZE // 8)}
    with ForwardRows(setup["model"]) as forwards:
        grid, images, labels = run_sweep(setup, estimate, "0.3, 1", "1, 5", lambda_sweeps, negative=negative,
                                         guidance_scale=6.0, personalization_scale=2.0, latent=latent, sampler_name="euler")
    evaluations = 3 if negative is not None or lambda_sweeps == LAMBDA_T and estimate == "three-way" else 2
    assert forwards.rows == [4 * batch * evaluations] * STEPS  # one forward per step for all four combinations
    assert images.shape == (4 * batch, SIZE, SIZE, 3)
    for index, (omega, lam) in enumerate((o, lam) for o in omegas for lam in lambdas):
        scales = (lam, 2.0) if lambda_sweeps == LAMBDA_T else (6.0, lam)
        expected = guider_image(setup, omega, estimate, *scales, negative=negative, sampler_name="euler", latent=latent)
        torch.testing.assert_close(images[index * batch : (index + 1) * batch], expected, rtol=0, atol=1e-4)
    # Far apart compared with that tolerance: a row sampled with another row's omega or scale would fail above.
    assert (images[0] - images[-1]).abs().max() > 0.05


def test_batched_sweep_of_a_full_pair_equals_separate_runs(setup, tiny_files):
    """A full fine-tune samples alone on its split route (weak weights swapped in); batched, each row gets its own
    omega through the dense correction instead. Both give the same images."""
    pair, model, _clip, vae = setup["nodes"].load_pair.LoadFinetunedPair.execute(
        tiny_files["base"], "fine-tuned checkpoint", "none", 1.0, tiny_files["finetuned"]).args
    full = {**setup, "pair": pair, "model": model, "vae": vae}
    with ForwardRows(model) as forwards:
        _grid, images, _labels = run_sweep(full, "two-way (paper)", "0, 0.6", "4", sampler_name="euler")
    assert forwards.rows == [4] * STEPS
    for index, omega in enumerate((0.0, 0.6)):
        expected = guider_image(full, omega, "two-way (paper)", 4.0, 1.0, sampler_name="euler")
        torch.testing.assert_close(images[index : index + 1], expected, rtol=0, atol=1e-4)
    assert (images[0] - images[1]).abs().max() > 0.05


def test_sweep_batches_only_what_it_can_keep_apart(setup):
    sweep = setup["nodes"].tuning.sweep
    model = setup["model"]
    latent = torch.zeros(1, 4, 8, 8)
    assert sweep.combinations_per_batch(model, comfy.samplers.sampler_object("euler"), latent, None, 6) == 6
    assert sweep.combinations_per_batch(model, comfy.samplers.sampler_object("dpmpp_2m"), latent, None, 6) == 6
    for name in ("euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde", "dpm_adaptive", "lcm"):
        assert sweep.combinations_per_batch(model, comfy.samplers.sampler_object(name), latent, None, 6) == 1, name
    with_cfg_function = model.clone()
    with_cfg_function.set_model_sampler_post_cfg_function(lambda args: args["denoised"])
    assert sweep.combinations_per_batch(with_cfg_function, comfy.samplers.sampler_object("euler"), latent, None, 6) == 1


def test_sweep_makes_one_grid_per_latent_batch_image(setup):
    latent = {"samples": torch.zeros(2, 4, SIZE // 8, SIZE // 8)}
    grid, images, labels = run_sweep(setup, "two-way (paper)", "0.5", "2, 4", latent=latent)
    assert images.shape == (4, SIZE, SIZE, 3)
    assert labels.splitlines() == ["omega 0.5, lambda 2"] * 2 + ["omega 0.5, lambda 4"] * 2
    assert grid.shape[0] == 2
    layout = grid_layout(setup, grid, ["omega 0.5"], ["lambda 2", "lambda 4"])
    for b in range(2):
        for col in range(2):
            y, x = layout.cell(0, col)
            assert torch.equal(grid[b, y : y + SIZE, x : x + SIZE], images[2 * col + b])


class ForwardCounter:
    def __init__(self, module):
        self.calls = []
        self.handle = module.register_forward_pre_hook(lambda m, args: self.calls.append(args[0].shape[0]))

    def close(self):
        self.handle.remove()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"omega_values": "0.3, 1.5"}, "omega_values must be between 0 and 1, got 1.5"),
        ({"omega_values": "0.3, high"}, "omega_values: 'high' is not a number"),
        ({"lambda_values": ""}, "lambda_values is empty"),
        ({"lambda_values": "1, 2, 3, 4, 5, 6, 7, 8, 9"}, "at most 8 per list"),
        ({"omega_values": "0.1, 0.2, 0.3, 0.4", "lambda_values": "1, 2, 3, 4", "latent": 5},
         "= 80 images; at most 64"),
        ({"negative": True}, "The two-way estimate has no negative prompt"),
    ],
    ids=["omega-range", "omega-text", "lambda-empty", "lambda-too-many", "too-many-images", "negative-two-way"],
)
def test_sweep_refuses_bad_input_before_sampling(setup, changes, message):
    GuidanceInputError = setup["guidance"].GuidanceInputError

    args = {"omega_values": "0.3, 0.7", "lambda_values": "2, 4", **changes}
    latent = {"samples": torch.zeros(args.pop("latent", 1), 4, SIZE // 8, SIZE // 8)}
    negative = setup["negative"] if args.pop("negative", False) else None
    counter = ForwardCounter(setup["pair"].finetuned.model.diffusion_model)
    try:
        with pytest.raises(GuidanceInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            run_sweep(setup, "two-way (paper)", args["omega_values"], args["lambda_values"], negative=negative,
                      latent=latent)
    finally:
        counter.close()
    assert counter.calls == []


def test_sweep_validation_reports_every_list_problem_at_once(setup):
    validate = setup["nodes"].tuning.sweep.Sweep.validate_inputs
    assert validate("0.3, 0.5", "5, 7.5") is True
    assert validate(None, None) is True  # linked: checked when it runs
    message = validate("0.3, abc, 1.5", "5, 500")
    for problem in ("omega_values: 'abc' is not a number", "omega_values must be between 0 and 1, got 1.5",
                    "lambda_values must be between 0 and 100, got 500.0"):
        assert message.count(problem) == 1, message
    assert validate("0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8", "1, 2, 3, 4, 5, 6, 7, 8, 9") == (
        "lambda_values has 9 values; a sweep takes at most 8 per list.")


def test_sweep_shows_lambda_sweeps_in_three_way_only(setup):
    """Sweeping the personalization scale needs the three-way estimate: only three-way shows the choice."""
    (estimate,) = [i for i in setup["nodes"].tuning.sweep.Sweep.define_schema().inputs if i.id == "estimate"]
    modes = {option.key: [i.id for i in option.inputs] for option in estimate.options}
    assert modes == {"two-way (paper)": [], "three-way": ["negative", "lambda_sweeps"]}


# ----------------------------------------------------------------------------------------- schedule preview


def read_table(text: str) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(text))]


@pytest.mark.parametrize("estimate", ["two-way (paper)", "three-way"])
def test_schedule_preview_plots_the_omega_and_evaluations_of_sampling(setup, estimate):
    nodes = setup["nodes"]
    weak = comfy_weak(setup, 0.1, schedule="cosine", omega_end=0.9, guidance_start=0.2, guidance_end=0.7)
    model_sampling = setup["model"].get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, "normal", 8)
    plot, table = nodes.tuning.schedule_preview.SchedulePreview.execute(
        setup["model"], weak, sigmas, estimate, 5.0, 2.0).args

    assert plot.shape == (1, 512, 768, 3) and plot.dtype == torch.float32
    rows = read_table(table)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for row, sigma in zip(rows, sigmas[:-1].tolist(), strict=True):
        assert row["sigma"] == pytest.approx(sigma, rel=1e-5)
        expected = cosine_omega(progress(model_sampling, sigma), 0.1, 0.9, 0.2, 0.7)
        assert row["omega"] == pytest.approx(expected, abs=1e-5)
        assert row["weight_ft_c"] + row["weight_ft_n"] + row["weight_w_null"] == pytest.approx(1.0)
    assert rows[0]["omega"] == 1.0 and rows[-1]["omega"] == 1.0  # outside [0.2, 0.7]

    # What sampling with the guider then does: one forward per step, with as many rows as evaluations.
    guider = nodes.guider.PersonalizationGuider.execute(setup["model"], weak, setup["positive"], setup["null"],
                                                        estimate, 5.0, 2.0).args[0]
    noise, sampler, _, latent = sampling_inputs(setup["model"], "euler")
    counter = ForwardCounter(setup["pair"].finetuned.model.diffusion_model)
    try:
        with torch.inference_mode():
            guider.sample(noise.generate_noise(latent), latent["samples"], sampler, sigmas, seed=SEED)
    finally:
        counter.close()
    assert counter.calls == [int(r["evaluations"]) for r in rows]

    # The plotted points: at the omega of each step, in the series' colour.
    steps = nodes.tuning.schedule_preview.guidance_per_step(
        weak.schedule, [r["progress"] for r in rows], 2.0 if estimate == "three-way" else 5.0, 5.0, True)
    drawn = nodes.tuning.schedule_preview.plot_steps(steps, "title")
    pixels = drawn.image.load()
    color = nodes.tuning.schedule_preview.OMEGA_COLOR
    points = drawn.points["omega"]
    assert all(pixels[x, y] == color for x, y in points)
    top, bottom = min(y for _, y in points), max(y for _, y in points)
    lo, hi = min(r["omega"] for r in rows), max(r["omega"] for r in rows)
    for (_, y), row in zip(points, rows, strict=True):  # y is affine in omega, higher omega higher up
        assert y == pytest.approx(bottom - (row["omega"] - lo) / (hi - lo) * (bottom - top), abs=1.0)


def progress(model_sampling, sigma: float) -> float:
    """p of a sigma, another way than the runtime's bisection: the fractional timestep t at which the model's
    log-sigma table, interpolated linearly (as ModelSamplingDiscrete.sigma does), reaches log(sigma); p = 1 - t/999."""
    import numpy as np

    log_sigmas = model_sampling.log_sigmas.double().numpy()
    t = np.interp(np.log(sigma), log_sigmas, np.arange(len(log_sigmas)))
    return 1.0 - float(t) / (len(log_sigmas) - 1)


def cosine_omega(p, start, end, p_start, p_end):
    """The cosine shape of docs/design.md ("Omega over the run"), written out: omega_start at p_start to omega_end at p_end, 1 outside."""
    import math

    if p < p_start or p > p_end:
        return 1.0
    t = (p - p_start) / (p_end - p_start)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def test_schedule_preview_refuses_a_negative_in_two_way_and_empty_sigmas(setup):
    GuidanceInputError = setup["guidance"].GuidanceInputError

    preview = setup["nodes"].tuning.schedule_preview.SchedulePreview.execute
    weak = comfy_weak(setup, 0.5)
    sigmas = torch.tensor([14.6, 0.0])
    with pytest.raises(GuidanceInputError, match="two-way estimate has no negative"):
        preview(setup["model"], weak, sigmas, "two-way (paper)", 5.0, 2.0, negative=setup["negative"])
    with pytest.raises(GuidanceInputError, match="hold no sampling step"):
        preview(setup["model"], weak, torch.tensor([0.0]), "two-way (paper)", 5.0, 2.0)


# --------------------------------------------------------------------------------------------------- presets


def test_shipped_presets_load_as_weak_models(setup, user_dir):
    parse_preset = setup["guidance"].parse_preset

    nodes = setup["nodes"]
    options = nodes.tuning.presets.LoadPreset.define_schema().inputs[1].options
    shipped = sorted(p.stem for p in (PACK_DIR / "presets").glob("*.json"))
    assert options[: len(shipped)] == shipped and {"sd15_lora", "sdxl_lora"} <= set(shipped)
    for name in shipped:
        preset = parse_preset((PACK_DIR / "presets" / f"{name}.json").read_bytes())
        weak, estimate, guidance_scale, personalization_scale = nodes.tuning.presets.LoadPreset.execute(setup["pair"], name).args
        assert weak.pair is setup["pair"] and weak.schedule == preset.omega_schedule()
        assert estimate == {"two-way": "two-way (paper)", "three-way": "three-way"}[preset.estimate.value]
        assert (guidance_scale, personalization_scale) == (preset.guidance_scale, preset.personalization_scale)


SAVED = {"name": "dog v2", "description": "  for the dog LoRA  ", "schedule": "linear", "omega": 0.25,
         "omega_end": 0.75, "guidance_start": 0.1, "guidance_end": 0.9, "estimate": "three-way",
         "guidance_scale": 6.5, "personalization_scale": 2.5, "overwrite": False}


def test_save_then_load_gives_back_the_values(setup, user_dir):
    GuidanceInputError = setup["guidance"].GuidanceInputError
    OmegaSchedule = setup["guidance"].OmegaSchedule

    nodes = setup["nodes"]
    save, load = nodes.tuning.presets.SavePreset, nodes.tuning.presets.LoadPreset
    save.execute(**SAVED)
    path = user_dir / "personalization_guidance" / "presets" / "dog v2.json"
    assert json.loads(path.read_text())["description"] == "for the dog LoRA"
    assert "dog v2" in load.define_schema().inputs[1].options
    fingerprint = load.fingerprint_inputs(None, "dog v2")

    weak, estimate, guidance_scale, personalization_scale = load.execute(setup["pair"], "dog v2").args
    assert weak.schedule == OmegaSchedule("linear", 0.25, 0.75, 0.1, 0.9)
    assert (estimate, guidance_scale, personalization_scale) == ("three-way", 6.5, 2.5)

    with pytest.raises(GuidanceInputError, match="A preset named 'dog v2' exists"):
        save.execute(**{**SAVED, "omega": 0.5})
    assert load.fingerprint_inputs(None, "dog v2") == fingerprint
    save.execute(**{**SAVED, "omega": 0.5, "overwrite": True})
    assert load.fingerprint_inputs(None, "dog v2") != fingerprint
    assert load.execute(setup["pair"], "dog v2").args[0].schedule.omega_start == 0.5
    assert [p.name for p in path.parent.iterdir()] == ["dog v2.json"]  # no temporary file left behind


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": "../escape"}, "Preset name '../escape' is not allowed"),
        ({"name": "a/b"}, "is not allowed"),
        ({"name": "sd15_lora"}, "'sd15_lora' is a shipped preset"),
        ({"guidance_start": 0.9, "guidance_end": 0.1}, "The guidance interval is empty"),
        ({"omega": 1.5}, "omega must be between 0 and 1, got 1.5"),
        ({"description": "x" * 1001}, "longer than 1000 characters"),
    ],
)
def test_save_refuses_bad_presets_and_writes_nothing(setup, user_dir, tmp_path, changes, message):
    GuidanceInputError = setup["guidance"].GuidanceInputError

    before = sorted(p for p in user_dir.rglob("*"))
    with pytest.raises(GuidanceInputError, match=message):
        setup["nodes"].tuning.presets.SavePreset.execute(**{**SAVED, "name": "refused", **changes})
    assert sorted(p for p in user_dir.rglob("*")) == before
    assert not (user_dir / "personalization_guidance" / "escape.json").exists()


def test_a_broken_user_preset_fails_with_its_file_and_reason(setup, user_dir):
    GuidanceInputError = setup["guidance"].GuidanceInputError

    folder = user_dir / "personalization_guidance" / "presets"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken.json").write_text('{"version": 1, "name": "broken", "omega": "__import__(\'os\')"}')
    try:
        assert "broken" in setup["nodes"].tuning.presets.LoadPreset.define_schema().inputs[1].options
        with pytest.raises(GuidanceInputError, match=r"broken.json: missing key\(s\)"):
            setup["nodes"].tuning.presets.LoadPreset.execute(setup["pair"], "broken")
        with pytest.raises(GuidanceInputError, match="There is no preset named 'gone'"):
            setup["nodes"].tuning.presets.LoadPreset.execute(setup["pair"], "gone")
    finally:
        (folder / "broken.json").unlink()


# ------------------------------------------------------------------------------------------ example workflows


@pytest.fixture(scope="module")
def executor(comfy_host):
    return workflow_api.prompt_executor()


SWEEP, PREVIEW, PRESETS = "Tuning, a sweep grid of omega and lambda", "Tuning, a schedule preview", "Tuning, presets"


def workflow_prompt(tiny_files, title: str, prefix: str, **extra) -> tuple[dict, dict]:
    workflow = json.loads((schemas.WORKFLOWS_DIR / f"{title}.json").read_text())
    overrides = {
        "PG_LoadFinetunedPair": {"base_checkpoint": tiny_files["base"], "personalization.lora_name": tiny_files["lora"]},
        "BasicScheduler": {"steps": STEPS},
        "EmptyLatentImage": {"width": SIZE, "height": SIZE, "batch_size": 1},
        "SaveImage": {"filename_prefix": prefix},
        **extra,
    }
    return workflow, workflow_api.to_api(workflow, overrides)


def execute(executor, prompt) -> dict:
    run = workflow_api.queue(executor, prompt)
    assert run.valid, (run.error, run.node_errors)
    assert run.success and not run.errors, run.errors
    return run.history["outputs"]


def output_images(outputs: dict, node: str) -> list:
    from PIL import Image

    found = []
    for item in outputs[node]["images"]:
        folder = folder_paths.get_output_directory() if item["type"] == "output" else folder_paths.get_temp_directory()
        with Image.open(Path(folder, item["subfolder"], item["filename"])) as image:
            found.append(image.copy())
    return found


def node_of(workflow: dict, kind: str) -> str:
    (found,) = [n["id"] for n in workflow["nodes"] if n["type"] == kind]
    return str(found)


def test_sweep_workflow_executes(setup, executor, tiny_files):
    workflow, prompt = workflow_prompt(tiny_files, SWEEP, "pg_tuning/sweep",
                                       PG_Sweep={"omega_values": "0.5, 1", "lambda_values": "3, 7.5"})
    outputs = execute(executor, prompt)
    (grid,) = output_images(outputs, node_of(workflow, "SaveImage"))
    singles = output_images(outputs, node_of(workflow, "PreviewImage"))
    assert len(singles) == 4 and all(image.size == (SIZE, SIZE) for image in singles)
    layout = grid_layout(setup, torch.zeros(1, grid.height, grid.width, 3), ["omega 0.5", "omega 1"],
                         ["lambda 3", "lambda 7.5"])
    assert grid.size == (layout.width, layout.height)


def test_sweep_workflow_with_bad_lists_fails_validation_once_per_list(setup, executor, tiny_files):
    workflow, prompt = workflow_prompt(tiny_files, SWEEP, "pg_tuning/never",
                                       PG_Sweep={"omega_values": "0.3, abc, 2", "lambda_values": "5, 500"})
    run = workflow_api.queue(executor, prompt)
    assert not run.valid and run.executed == []
    errors = run.node_errors[node_of(workflow, "PG_Sweep")]["errors"]
    # The message names every problem; ComfyUI shows it under each input the check reads, the two lists.
    assert sorted(e["extra_info"]["input_name"] for e in errors) == ["lambda_values", "omega_values"]
    for problem in ("'abc' is not a number", "omega_values must be between 0 and 1, got 2.0",
                    "lambda_values must be between 0 and 100, got 500.0"):
        assert all(e["details"].count(problem) == 1 for e in errors), errors


def test_schedule_preview_workflow_executes(setup, executor, tiny_files):
    workflow, prompt = workflow_prompt(tiny_files, PREVIEW, "pg_tuning/preview")
    outputs = execute(executor, prompt)
    (plot,) = output_images(outputs, node_of(workflow, "PreviewImage"))
    (image,) = output_images(outputs, node_of(workflow, "SaveImage"))
    assert plot.size == (768, 512) and image.size == (SIZE, SIZE)


def test_preset_workflow_executes_and_saves_a_preset(setup, executor, tiny_files, user_dir):
    parse_preset = setup["guidance"].parse_preset

    workflow, prompt = workflow_prompt(tiny_files, PRESETS, "pg_tuning/preset")
    outputs = execute(executor, prompt)
    (image,) = output_images(outputs, node_of(workflow, "SaveImage"))
    assert image.size == (SIZE, SIZE)
    saved = user_dir / "personalization_guidance" / "presets" / "my_sd15_subject.json"
    preset = parse_preset(saved.read_bytes())
    assert preset.omega == 0.4 and preset.name == "my_sd15_subject"


def test_preset_workflow_queued_again_executes_nothing(setup, tiny_files, user_dir):
    """What a running server does when the same workflow is queued twice: each queue is a freshly parsed prompt, and
    the second executes no node (the preset loader's fingerprint is its file's, so it stays cached)."""
    workflow, prompt = workflow_prompt(tiny_files, PRESETS, "pg_tuning/preset_twice")
    executor = workflow_api.prompt_executor()
    first = workflow_api.queue(executor, prompt)
    assert first.success and not first.errors, first.errors
    assert node_of(workflow, "PG_LoadPreset") in first.executed

    second = workflow_api.queue(executor, prompt)
    assert second.success and not second.errors, second.errors
    assert second.executed == []
    assert sorted(second.cached) == sorted(prompt)


def test_edited_preset_runs_again(setup, tiny_files, user_dir):
    """The other side of the fingerprint: a changed preset file is read again, and what depends on it reruns."""
    folder = user_dir / "personalization_guidance" / "presets"
    folder.mkdir(parents=True, exist_ok=True)
    preset = json.loads((PACK_DIR / "presets" / "sd15_lora.json").read_text())
    path = folder / "edited.json"
    path.write_text(json.dumps({**preset, "name": "edited"}))
    try:
        workflow, prompt = workflow_prompt(tiny_files, PRESETS, "pg_tuning/preset_edited",
                                           PG_LoadPreset={"preset": "edited"})
        executor = workflow_api.prompt_executor()
        assert workflow_api.queue(executor, prompt).success
        path.write_text(json.dumps({**preset, "name": "edited", "omega": 0.3}))
        again = workflow_api.queue(executor, prompt)
        assert again.success
        for kind in ("PG_LoadPreset", "PG_PersonalizationGuider", "SamplerCustomAdvanced", "SaveImage"):
            assert node_of(workflow, kind) in again.executed, kind
        assert node_of(workflow, "PG_LoadFinetunedPair") not in again.executed
    finally:
        path.unlink()


def test_saving_a_shipped_preset_name_stops_the_run_with_the_reason(setup, tiny_files, user_dir):
    """Refused when the preset saver runs, which ComfyUI does first (an output node with nothing to wait for): the
    run stops before anything loads, and the frontend shows the reason. (A queue-time refusal would only drop the
    saver from the run, with a red outline and no message, when the workflow has other outputs.)"""
    workflow, prompt = workflow_prompt(tiny_files, PRESETS, "pg_tuning/never", PG_SavePreset={"name": "sd15_lora"})
    run = workflow_api.queue(workflow_api.prompt_executor(), prompt)
    assert run.valid and not run.success
    assert run.executed == [node_of(workflow, "PG_SavePreset")]
    (error,) = run.errors
    assert "'sd15_lora' is a shipped preset" in error["exception_message"]
    assert error["exception_type"] == "personalization_guidance.GuidanceInputError"


def test_preset_outputs_wire_into_the_guider_widgets(setup, executor, tiny_files):
    # What the preset example's note suggests: the preset's scales linked to the guider's widgets, its estimate set.
    workflow, prompt = workflow_prompt(tiny_files, PRESETS, "pg_tuning/preset_linked",
                                       PG_LoadPreset={"preset": "sd15_dreambooth"})
    preset, guider = node_of(workflow, "PG_LoadPreset"), node_of(workflow, "PG_PersonalizationGuider")
    prompt[guider]["inputs"].update({"estimate": "three-way", "estimate.guidance_scale": [preset, 2],
                                     "estimate.personalization_scale": [preset, 3]})
    del prompt[node_of(workflow, "PG_SavePreset")]
    outputs = execute(executor, prompt)
    (image,) = output_images(outputs, node_of(workflow, "SaveImage"))
    assert image.size == (SIZE, SIZE)


# ------------------------------------------------------------------------------------ pictures of docs/tuning.md


def test_readme_pictures_render(setup, tmp_path):
    """Renders docs/tuning.md's sweep grid and schedule plot; PG_WRITE_DOCS=1 writes them into docs/."""
    from PIL import Image

    docs = PACK_DIR / "docs" if os.environ.get("PG_WRITE_DOCS") else tmp_path
    grid = run_sweep(setup, "two-way (paper)", "0.2, 0.5, 1", "1, 4, 8")[0]
    nodes = setup["nodes"]
    weak = comfy_weak(setup, 0.2, schedule="cosine", omega_end=1.0, guidance_start=0.0, guidance_end=0.8)
    sigmas = comfy.samplers.calculate_sigmas(setup["model"].get_model_object("model_sampling"), "normal", 20)
    plot = nodes.tuning.schedule_preview.SchedulePreview.execute(setup["model"], weak, sigmas, "three-way", 7.5, 3.0).args[0]
    for tensor, name in ((grid[0], "sweep_grid_tiny.png"), (plot[0], "schedule_preview.png")):
        pixels = (tensor * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(docs / name, optimize=True)
        assert (docs / name).stat().st_size < 200_000
