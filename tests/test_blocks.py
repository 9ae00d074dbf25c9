"""Omega per block (guidance/blocks.py): presets resolved from module paths of each family, the free form, errors,
and the rule omega_b = 1 - f (1 - omega)."""

from __future__ import annotations

import math

import pytest
import torch

from guidance import BlockPreset, BlockSpec, GuidanceInputError, block_factors, block_omega, weak_parameter
from guidance.blocks import parse_block_setting, top_level_blocks

# Changed module paths as pairs hold them (relative to the diffusion model), a few per block.
UNET = ["time_embed.0", "input_blocks.0.0", "input_blocks.1.1.proj_in", "input_blocks.11.0.out_layers.3",
        "middle_block.0.in_layers.2", "middle_block.1.transformer_blocks.0.attn1.to_q", "output_blocks.0.0.skip_connection",
        "output_blocks.11.1.proj_out", "out.2"]
FLUX = ["img_in", "double_blocks.0.img_attn.qkv", "double_blocks.18.txt_mlp.0", "single_blocks.0.linear1",
        "single_blocks.37.linear2", "final_layer.linear"]
HIDREAM = ["x_embedder.proj", "double_stream_blocks.0.block.attn1.to_q", "single_stream_blocks.3.block.ff_i.shared_experts.w1",
           "final_layer.linear"]
WAN = ["patch_embedding", *[f"blocks.{i}.self_attn.q" for i in range(30)], "head.head"]
QWEN = ["img_in", *[f"transformer_blocks.{i}.attn.to_q" for i in range(60)], "proj_out"]
LUMINA = ["x_embedder", "noise_refiner.0.attention.qkv", "context_refiner.0.attention.qkv",
          *[f"layers.{i}.attention.qkv" for i in range(30)], "final_layer.linear"]
SD3 = ["x_embedder.proj", *[f"joint_blocks.{i}.x_block.attn.qkv" for i in range(24)], "final_layer.linear"]


def test_off_and_none_give_no_factors():
    assert block_factors(None, UNET) == {}
    assert block_factors(BlockSpec(), UNET) == {}
    assert BlockSpec().is_off and BlockSpec().label() == "off"


def test_unet_preset():
    factors = block_factors(BlockSpec(BlockPreset.UNET, (0.2, 0.5, 0.9)), UNET)
    assert factors == {"time_embed.0": 1.0, "input_blocks.0.0": 0.2, "input_blocks.1.1.proj_in": 0.2,
                       "input_blocks.11.0.out_layers.3": 0.2, "middle_block.0.in_layers.2": 0.5,
                       "middle_block.1.transformer_blocks.0.attn1.to_q": 0.5, "output_blocks.0.0.skip_connection": 0.9,
                       "output_blocks.11.1.proj_out": 0.9, "out.2": 1.0}


@pytest.mark.parametrize("paths,double,single", [
    (FLUX, ["double_blocks.0.img_attn.qkv", "double_blocks.18.txt_mlp.0"], ["single_blocks.0.linear1", "single_blocks.37.linear2"]),
    (HIDREAM, ["double_stream_blocks.0.block.attn1.to_q"], ["single_stream_blocks.3.block.ff_i.shared_experts.w1"]),
])
def test_double_single_stream_preset(paths, double, single):
    factors = block_factors(BlockSpec(BlockPreset.STREAMS, (0.25, 0.75)), paths)
    assert {p for p, f in factors.items() if f == 0.25} == set(double)
    assert {p for p, f in factors.items() if f == 0.75} == set(single)
    assert all(factors[p] == 1.0 for p in paths if p not in double + single)  # embedders and final layers


@pytest.mark.parametrize("paths,stack,count", [(WAN, "blocks", 30), (QWEN, "transformer_blocks", 60),
                                               (LUMINA, "layers", 30), (SD3, "joint_blocks", 24)])
def test_depth_thirds_of_one_stack(paths, stack, count):
    factors = block_factors(BlockSpec(BlockPreset.DEPTH, (0.1, 0.4, 0.7)), paths)
    thirds = [factors[p] for p in paths if p.startswith(stack + ".")]
    assert thirds == [0.1] * (count // 3) + [0.4] * (count // 3) + [0.7] * (count // 3)
    assert all(f == 1.0 for p, f in factors.items() if not p.startswith(stack + "."))  # refiners, embedders


def test_depth_concatenates_stacks_in_run_order():
    # Flux: 19 double then 38 single blocks, 57 in all: thirds of 19.
    paths = [f"double_blocks.{i}.img_mod.lin" for i in range(19)] + [f"single_blocks.{i}.linear1" for i in range(38)]
    factors = block_factors(BlockSpec(BlockPreset.DEPTH, (0.0, 0.5, 1.0)), paths)
    assert [factors[p] for p in paths] == [0.0] * 19 + [0.5] * 19 + [1.0] * 19
    # A UNet: input blocks, the middle block (one block), output blocks.
    unet = [f"input_blocks.{i}.0.in_layers.2" for i in range(4)] + ["middle_block.0.in_layers.2", "middle_block.2.x"] \
        + [f"output_blocks.{i}.0.in_layers.2" for i in range(4)]
    factors = block_factors(BlockSpec(BlockPreset.DEPTH, (0.0, 0.5, 1.0)), unet)
    assert [factors[p] for p in unet] == [0.0] * 3 + [0.5] * 4 + [1.0] * 3  # 9 blocks: 3 per third


def test_depth_counts_the_blocks_of_the_whole_model():
    """A LoRA on the last block only: its depth is the model's, not that of the changed layers alone."""
    model = [f"blocks.{i}.ffn.0.weight" for i in range(30)]
    assert block_factors(BlockSpec(BlockPreset.DEPTH, (0.0, 0.5, 0.9)), ["blocks.29.ffn.0"], model) == {"blocks.29.ffn.0": 0.9}
    assert block_factors(BlockSpec(BlockPreset.DEPTH, (0.0, 0.5, 0.9)), ["blocks.29.ffn.0"]) == {"blocks.29.ffn.0": 0.5}


@pytest.mark.parametrize("preset,factors,paths,named", [
    (BlockPreset.STREAMS, (0.5, 0.5), UNET, "input_blocks (0-11), middle_block (0-1), output_blocks (0-11)"),
    (BlockPreset.UNET, (0.5, 0.5, 0.5), FLUX, "double_blocks (0-18), single_blocks (0-37), final_layer, img_in"),
    (BlockPreset.DEPTH, (0.5, 0.5, 0.5), ["img_in", "txt_in"], "img_in, txt_in"),
])
def test_a_preset_that_matches_no_changed_layer_is_refused_with_the_models_blocks(preset, factors, paths, named):
    with pytest.raises(GuidanceInputError) as error:
        block_factors(BlockSpec(preset, factors), paths)
    assert preset.value in str(error.value) and named in str(error.value)


def test_free_form_last_match_wins_and_a_glob_covers_the_modules_below_it():
    spec = BlockSpec(BlockPreset.FREE, text="# identity in the double blocks\n* = 0.5\ndouble_blocks = 0.2\n\n"
                                            "double_blocks.18.* = 1  # keep the last one\nfinal_layer.linear = 0")
    factors = block_factors(spec, FLUX)
    assert factors == {"img_in": 0.5, "double_blocks.0.img_attn.qkv": 0.2, "double_blocks.18.txt_mlp.0": 1.0,
                       "single_blocks.0.linear1": 0.5, "single_blocks.37.linear2": 0.5, "final_layer.linear": 0.0}
    assert spec.groups() == [("*", 0.5), ("double_blocks", 0.2), ("double_blocks.18.*", 1.0), ("final_layer.linear", 0.0)]
    # Entries may share a line, separated by ';'.
    assert BlockSpec(BlockPreset.FREE, text="double_blocks = 0.2; single_blocks = 0.7").groups() == [
        ("double_blocks", 0.2), ("single_blocks", 0.7)]


@pytest.mark.parametrize("text,message", [
    ("", "holds no entry"),
    ("# nothing\n\n", "holds no entry"),
    ("* = 0.5\ndouble_blocks 0.5", "line 2 ('double_blocks 0.5')"),
    ("double_blocks = half", "line 1 ('double_blocks = half'): 'half' is not a number"),
    ("* = 0.5\n\ndouble_blocks = 1.5", "line 3 ('double_blocks = 1.5'): the factor 1.5 is not between 0 and 1"),
    ("double_blocks = nan", "not between 0 and 1"),
    ("= 0.5", "line 1"),
    ("double blocks = 0.5", "line 1"),
])
def test_free_form_syntax_errors_name_the_line(text, message):
    with pytest.raises(GuidanceInputError) as error:
        BlockSpec(BlockPreset.FREE, text=text)
    assert message in str(error.value)


def test_a_free_form_line_that_matches_no_changed_layer_is_refused():
    with pytest.raises(GuidanceInputError) as error:
        block_factors(BlockSpec(BlockPreset.FREE, text="* = 0.5\ndoubel_blocks.* = 0"), FLUX)
    assert "line 2 (doubel_blocks.* = 0)" in str(error.value) and "double_blocks (0-18)" in str(error.value)


@pytest.mark.parametrize("preset,factors,message", [
    (BlockPreset.UNET, (0.5, 0.5), "takes 3 factor(s)"),
    (BlockPreset.STREAMS, (0.5, 1.2), "single_blocks must be between 0 and 1"),
    (BlockPreset.DEPTH, (0.5, -0.1, 1.0), "middle must be between 0 and 1"),
    (BlockPreset.OFF, (0.5,), "takes 0 factor(s)"),
    ("thirds", (), "is not one of"),
])
def test_factors_are_validated(preset, factors, message):
    with pytest.raises(GuidanceInputError) as error:
        BlockSpec(preset, factors)
    assert message in str(error.value)


def test_one_line_settings_for_the_sweep():
    assert parse_block_setting("off") == BlockSpec()
    assert parse_block_setting("UNet: 1, 0.5, 0") == BlockSpec(BlockPreset.UNET, (1.0, 0.5, 0.0))
    assert parse_block_setting("stream: 0.5 1") == BlockSpec(BlockPreset.STREAMS, (0.5, 1.0))
    assert parse_block_setting("depth: 0, 0.5, 1").label() == "early 0, middle 0.5, late 1"
    free = parse_block_setting("double_blocks = 0.5; single_blocks = 1")
    assert free.preset == BlockPreset.FREE and free.label() == "double_blocks = 0.5; single_blocks = 1"
    with pytest.raises(GuidanceInputError, match="takes 3 factor"):
        parse_block_setting("unet: 1, 0.5")
    with pytest.raises(GuidanceInputError, match="not a number"):
        parse_block_setting("depth: 1, x, 0")


@pytest.mark.parametrize("omega", [0.0, 0.3, 0.75, 1.0])
@pytest.mark.parametrize("factor", [0.0, 0.4, 1.0])
def test_the_block_rule(omega, factor):
    """omega_b = 1 - f (1 - omega): f = 1 is the run's omega, f = 0 the fine-tuned model; the weak parameter
    theta_pre + omega_b delta is theta_ft + f (omega - 1) delta."""
    omega_b = block_omega(omega, factor)
    assert 0.0 <= omega_b <= 1.0
    if factor == 1.0:
        assert omega_b == omega
    if factor == 0.0 or omega == 1.0:
        assert omega_b == 1.0
    gen = torch.Generator().manual_seed(0)
    base, delta = torch.randn(8, 4, generator=gen, dtype=torch.float64), torch.randn(8, 4, generator=gen, dtype=torch.float64)
    finetuned = base + delta
    torch.testing.assert_close(weak_parameter(finetuned, delta, factor * (omega - 1.0)), base + omega_b * delta)
    assert math.isclose(omega_b - 1.0, factor * (omega - 1.0), abs_tol=1e-15)


def test_factor_one_everywhere_is_the_global_omega():
    factors = block_factors(BlockSpec(BlockPreset.UNET, (1.0, 1.0, 1.0)), UNET)
    assert set(factors.values()) == {1.0}
    assert all(block_omega(0.37, f) == 0.37 for f in factors.values())


def test_top_level_blocks_lists_stacks_first_with_their_index_ranges():
    assert top_level_blocks(["out.2", "input_blocks.0.0", "input_blocks.11.1", "time_embed.0", "middle_block.1.x"]) == \
        "input_blocks (0-11), middle_block, out, time_embed"
    text = top_level_blocks(WAN)
    assert text.startswith("blocks (0-29)") and "head" in text and "patch_embedding" in text


def test_sweep_block_settings_lines():
    from guidance import GuidanceInputError as Error
    from guidance.sweep import parse_block_settings, sweep_combinations

    settings = parse_block_settings("off\nunet: 1, 0.5, 0\n# a comment\n\ndouble_blocks = 0.5; single_blocks = 1\n")
    assert [s.preset for s in settings] == [BlockPreset.OFF, BlockPreset.UNET, BlockPreset.FREE]
    with pytest.raises(Error, match=r"setting 2 \('unet: 1, 2, 0'\)"):
        parse_block_settings("off\nunet: 1, 2, 0")
    with pytest.raises(Error, match="twice"):
        parse_block_settings("unet: 1, 0.5, 0\nUNet: 1, 0.5, 0")
    with pytest.raises(Error, match="at most 8"):
        parse_block_settings("\n".join(f"depth: {i / 10}, 1, 1" for i in range(9)))
    with pytest.raises(Error, match="x 3 per-block settings = 72 images"):
        sweep_combinations((0.2, 0.5, 0.8), (1, 2, 3, 4, 5, 6, 7, 8), 1, 3)


def test_the_per_block_example_workflow():
    from test_example_workflows import by_type, example, origin_of, widgets

    workflow = example("LoRA pair, omega per block")
    (weak,) = by_type(workflow, "PG_WeakModelInterpolator")
    values = widgets(weak)
    assert values["per_block"] == BlockPreset.UNET.value
    spec = BlockSpec(BlockPreset.UNET, tuple(values[f"per_block.{n}"] for n in ("input_blocks", "middle_block",
                                                                                 "output_blocks")))
    assert not spec.is_off and set(spec.factors) != {1.0}
    (guider,) = by_type(workflow, "PG_PersonalizationGuider")
    assert origin_of(workflow, guider, "weak_model") is weak
    # Every other example leaves per_block off (the first option: existing workflows sample as before).
    from test_example_workflows import WORKFLOWS, load
    for path in WORKFLOWS:
        if path.stem != "LoRA pair, omega per block (UNet)":
            for node in by_type(load(path), "PG_WeakModelInterpolator"):
                assert widgets(node)["per_block"] == "off", path.stem
