"""guidance.deltas: weight deltas and the exact weak-model correction (docs/design.md, "Conventions").

Torch-only tier: no ComfyUI import. The central property: for every supported layer,
``add_weak_correction`` with ``coefficient = omega - 1`` turns the fine-tuned output on
the chosen rows into the output of a copy of the layer whose weights were set by hand to
``theta_pre + omega * delta`` (= ``W_ft + (omega - 1) * dW``), and leaves the other rows
bit-identical.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from guidance import (
    DenseDelta,
    GuidanceInputError,
    LowRankDelta,
    add_weak_correction,
    check_finite,
    check_layer,
    check_same_architecture,
    low_rank_factors,
    prepare_correction,
    tensor_delta,
    unet_state_dict,
    weak_parameter,
    weight_delta,
)

FAST = settings(max_examples=50, deadline=None, database=None)


@pytest.fixture(autouse=True, scope="module")
def _one_thread_no_grad():
    """Tiny tensors: one intra-op thread is faster, and immune to OpenMP spin-waits when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        yield
    torch.set_num_threads(threads)

seeds = st.integers(min_value=0, max_value=2**31 - 1)
omegas = st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(min_value=0.0, max_value=1.0))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g, dtype=dtype)


@st.composite
def row_subsets(draw, batch: int):
    """Row indices of a batch, possibly empty, in any order, no repeats."""
    chosen = draw(st.lists(st.integers(0, batch - 1), unique=True, max_size=batch))
    return torch.tensor(chosen, dtype=torch.long)


# ---------------------------------------------------------------------------- unet_state_dict


def test_unet_state_dict_strips_checkpoint_prefix_and_drops_other_keys():
    a, b, vae, clip = (torch.full((2,), float(i)) for i in range(4))
    sd = {
        "model.diffusion_model.input_blocks.0.weight": a,
        "model.diffusion_model.out.bias": b,
        "first_stage_model.decoder.weight": vae,
        "cond_stage_model.transformer.weight": clip,
    }
    got = unet_state_dict(sd)
    assert set(got) == {"input_blocks.0.weight", "out.bias"}
    assert got["input_blocks.0.weight"] is a and got["out.bias"] is b


def test_unet_state_dict_strips_short_prefix():
    a = torch.zeros(1)
    got = unet_state_dict({"diffusion_model.x.weight": a, "vae.y": torch.ones(1)})
    assert got == {"x.weight": a}


def test_unet_state_dict_keeps_bare_unet_dicts():
    sd = {"input_blocks.0.weight": torch.zeros(1), "out.bias": torch.ones(1)}
    got = unet_state_dict(sd)
    assert got == sd and got is not sd


# ---------------------------------------------------------------------------- weight_delta


def _pair(seed: int):
    g = gen(seed)
    base = {"a.weight": randn(g, 4, 3), "a.bias": randn(g, 4), "b.weight": randn(g, 2, 2, 3, 3)}
    ft = {k: v + randn(g, *v.shape) for k, v in base.items()}
    return base, ft


@FAST
@given(seed=seeds)
def test_weight_delta_is_ft_minus_base_in_fp32_from_mixed_dtypes(seed):
    base32, ft = _pair(seed)
    base16 = {k: v.half() for k, v in base32.items()}  # fp16 base, fp32 fine-tune
    delta = weight_delta(base16, ft)
    assert set(delta) == set(ft)
    for k, d in delta.items():
        assert d.dtype == torch.float32
        assert d.shape == ft[k].shape
        # Reference in float64 (fp16 -> fp64 is exact), rounded once to fp32.
        ref = (ft[k].double() - base16[k].double()).float()
        torch.testing.assert_close(d, ref, rtol=2e-7, atol=1e-7)


def test_weight_delta_keeps_changes_that_fp16_would_lose():
    base = {"w": torch.ones(3, dtype=torch.float16)}
    ft = {"w": torch.tensor([1.0, 1.0 + 1e-4, 1.0 - 2e-4], dtype=torch.float32)}
    assert torch.equal(ft["w"].half(), base["w"])  # in fp16 the fine-tune equals the base...
    delta = weight_delta(base, ft)
    assert delta["w"].dtype == torch.float32  # ...but the delta is formed in fp32
    torch.testing.assert_close(delta["w"], torch.tensor([0.0, 1e-4, -2e-4]), rtol=1e-3, atol=1e-9)


def test_weight_delta_drops_all_zero_and_non_float_tensors():
    base, ft = _pair(0)
    base["frozen.weight"] = torch.arange(6.0).reshape(2, 3)
    ft["frozen.weight"] = base["frozen.weight"].clone()
    ft["a.bias"] = base["a.bias"].clone()
    base["steps"] = torch.tensor([1, 2], dtype=torch.int64)
    ft["steps"] = torch.tensor([5, 7], dtype=torch.int64)
    delta = weight_delta(base, ft)
    assert set(delta) == {"a.weight", "b.weight"}
    # One element changed is enough to keep a tensor.
    ft["frozen.weight"][1, 2] += 0.5
    delta = weight_delta(base, ft)
    assert "frozen.weight" in delta and int(torch.count_nonzero(delta["frozen.weight"])) == 1


def test_weight_delta_aligns_checkpoint_and_bare_dicts():
    base, ft = _pair(1)
    ckpt = {f"model.diffusion_model.{k}": v for k, v in base.items()}
    ckpt["first_stage_model.decoder.weight"] = torch.zeros(3)
    delta = weight_delta(ckpt, ft)
    assert set(delta) == set(base)
    for k in base:
        torch.testing.assert_close(delta[k], ft[k] - base[k])


def test_weight_delta_names_missing_and_extra_keys():
    base, ft = _pair(2)
    del ft["a.bias"]
    ft["c.weight"] = torch.zeros(2)
    with pytest.raises(GuidanceInputError) as err:
        weight_delta(base, ft)
    msg = str(err.value)
    assert "a.bias" in msg and "c.weight" in msg
    assert "only in the base: a.bias" in msg and "only in the fine-tune: c.weight" in msg


def test_weight_delta_names_mismatched_shapes():
    base, ft = _pair(3)
    ft["b.weight"] = torch.zeros(2, 2, 1, 1)
    with pytest.raises(GuidanceInputError) as err:
        weight_delta(base, ft)
    msg = str(err.value)
    assert "b.weight" in msg and "(2, 2, 3, 3)" in msg and "(2, 2, 1, 1)" in msg
    assert "a.weight" not in msg


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("side", ["base", "ft"])
def test_weight_delta_raises_on_non_finite_naming_the_tensor(bad, side):
    base, ft = _pair(4)
    target = base if side == "base" else ft
    target["b.weight"] = target["b.weight"].clone()
    target["b.weight"][0, 1, 2, 0] = bad
    with pytest.raises(GuidanceInputError) as err:
        weight_delta(base, ft)
    msg = str(err.value)
    assert "b.weight" in msg and "NaN or Inf" in msg
    # Says which model holds it (not only that the delta is bad).
    assert ("base model" in msg) if side == "base" else ("fine-tuned model" in msg)


def test_weight_delta_raises_when_the_difference_overflows():
    big = torch.finfo(torch.float32).max
    base = {"w": torch.tensor([-big])}
    ft = {"w": torch.tensor([big])}
    with pytest.raises(GuidanceInputError, match="w"):
        weight_delta(base, ft)


def test_check_finite_ignores_integer_tensors_and_lists_names():
    check_finite({"i": torch.tensor([1, 2]), "f": torch.ones(2)}, "X")
    with pytest.raises(GuidanceInputError) as err:
        check_finite({"ok": torch.ones(2), "n1": torch.tensor([math.nan]), "n2": torch.tensor([math.inf])}, "The thing")
    msg = str(err.value)
    assert msg.startswith("The thing") and "2 tensor" in msg and "n1" in msg and "n2" in msg and "ok" not in msg


# ---------------------------------------------------------------------------- check_same_architecture


def test_check_same_architecture_accepts_equal():
    shapes = {"a": (2, 3), "b": torch.Size([4])}
    check_same_architecture(shapes, {"a": torch.Size([2, 3]), "b": (4,)})


def test_check_same_architecture_names_first_unmatched_sorted_and_counts():
    base = {f"k{i:02d}": (1,) for i in range(10)}
    ft = {"k00": (1,)}
    with pytest.raises(GuidanceInputError) as err:
        check_same_architecture(base, ft)
    msg = str(err.value)
    assert "9 tensors unmatched" in msg
    for i in range(1, 6):
        assert f"k{i:02d}" in msg
    for i in range(6, 10):
        assert f"k{i:02d}" not in msg  # only the first few are listed


def test_check_same_architecture_names_shape_mismatch():
    base = {"a": (2, 3), "b": (4,), "c": (5,)}
    ft = {"a": (2, 3), "b": (4, 1), "c": (6,)}
    with pytest.raises(GuidanceInputError) as err:
        check_same_architecture(base, ft)
    msg = str(err.value)
    assert "2 tensors differ in shape" in msg
    assert "b (4,) vs (4, 1)" in msg and "c (5,) vs (6,)" in msg and "a (" not in msg


# ---------------------------------------------------------------------------- layers used by the exactness property


def _linear(g):
    return nn.Linear(6, 5), (3, 4, 6)  # (batch, tokens, features): a batched-token input


def _linear_nobias(g):
    return nn.Linear(6, 5, bias=False), (3, 6)


def _conv1d(g):
    return nn.Conv1d(3, 4, 3, stride=2, padding=1), (3, 3, 9)


def _conv2d(g):
    return nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 3, 7, 6)


def _conv2d_dilated_reflect(g):
    return nn.Conv2d(2, 3, 3, stride=1, padding=2, dilation=2, padding_mode="reflect"), (3, 2, 6, 6)


def _conv2d_grouped(g):
    return nn.Conv2d(4, 6, 3, padding=1, groups=2), (3, 4, 5, 5)


def _conv3d(g):
    return nn.Conv3d(2, 3, 3, stride=(1, 2, 2), padding=1), (3, 2, 3, 5, 5)


def _groupnorm(g):
    return nn.GroupNorm(2, 6), (3, 6, 4, 4)


def _layernorm(g):
    return nn.LayerNorm(6), (3, 5, 6)


def _layernorm_2d(g):
    return nn.LayerNorm((4, 5)), (3, 2, 4, 5)


def _rmsnorm(g):
    return nn.RMSNorm(6, eps=1e-5), (3, 5, 6)


def _rmsnorm_machine_eps(g):
    return nn.RMSNorm((4, 6)), (3, 2, 4, 6)  # eps None: the input dtype's machine epsilon


def _embedding(g):
    return nn.Embedding(11, 6, padding_idx=2), (3, 5)  # token ids (batch, tokens)


DENSE_LAYERS = {
    "linear": _linear,
    "linear_nobias": _linear_nobias,
    "conv1d": _conv1d,
    "conv2d": _conv2d,
    "conv2d_dilated_reflect": _conv2d_dilated_reflect,
    "conv2d_grouped": _conv2d_grouped,
    "conv3d": _conv3d,
    "groupnorm": _groupnorm,
    "layernorm": _layernorm,
    "layernorm_2d": _layernorm_2d,
    "rmsnorm": _rmsnorm,
    "rmsnorm_machine_eps": _rmsnorm_machine_eps,
    "embedding": _embedding,
}


def _make(factory, seed):
    """A layer with random fine-tuned parameters (norm affines far from the 1/0 init) and an input."""
    g = gen(seed)
    layer, x_shape = factory(g)
    with torch.no_grad():  # every parameter from the seeded generator: examples replay exactly
        for p in layer.parameters():
            p.copy_(randn(g, *p.shape))
    if isinstance(layer, nn.Embedding):
        x = torch.randint(0, layer.num_embeddings, x_shape, generator=g)
    else:
        x = randn(g, *x_shape) * 2 + 0.5
    return g, layer, x


def _by_hand(layer, weight=None, bias=None):
    """A copy of ``layer`` with its parameters overwritten by hand."""
    ref = copy.deepcopy(layer)
    with torch.no_grad():
        if weight is not None:
            ref.weight.copy_(weight)
        if bias is not None:
            ref.bias.copy_(bias)
    return ref


def _assert_weak_rows(layer, x, delta, rows, omega, ref_layer):
    out = layer(x)
    out_before = out.clone()
    check_layer("layer", layer, delta)
    got = add_weak_correction(layer, x, out, delta, rows, omega - 1.0)
    assert got.shape == out.shape and got.dtype == out.dtype
    assert torch.equal(out, out_before)  # the fine-tuned output is not modified in place
    weak = ref_layer(x)
    mask = torch.zeros(x.shape[0], dtype=torch.bool)
    mask[rows] = True
    # fp32 tolerance: the two sides round sums of many products differently; scale with the output.
    tol = 1e-5 * (1.0 + float(weak.abs().max()))
    torch.testing.assert_close(got[mask], weak[mask], rtol=1e-5, atol=tol)
    assert torch.equal(got[~mask], out[~mask])  # other rows: exactly the fine-tuned output


# ---------------------------------------------------------------------------- the exactness property


@pytest.mark.parametrize("name", list(DENSE_LAYERS))
@FAST
@given(seed=seeds, omega=omegas, rows=row_subsets(3), with_bias=st.booleans())
def test_dense_delta_equals_hand_interpolated_weights(name, seed, omega, rows, with_bias):
    g, layer, x = _make(DENSE_LAYERS[name], seed)
    w_ft = layer.weight.detach().clone()
    b_ft = None if getattr(layer, "bias", None) is None else layer.bias.detach().clone()
    # theta_pre: a random base; the delta is what fine-tuning added.
    w_pre = randn(g, *w_ft.shape)
    dw = w_ft - w_pre
    db = None
    if b_ft is not None and with_bias:
        db = b_ft - randn(g, *b_ft.shape)
    # theta_pre + omega * delta, materialized by hand (bias delta None: bias unchanged).
    ref = _by_hand(layer, w_pre + omega * dw, None if db is None else (b_ft - db) + omega * db)
    _assert_weak_rows(layer, x, DenseDelta(dw, db), rows, omega, ref)


@pytest.mark.parametrize("name", ["linear", "conv2d", "conv3d", "groupnorm", "layernorm"])
@FAST
@given(seed=seeds, omega=omegas, rows=row_subsets(3))
def test_bias_only_dense_delta(name, seed, omega, rows):
    g, layer, x = _make(DENSE_LAYERS[name], seed)
    db = randn(g, *layer.bias.shape)
    ref = _by_hand(layer, bias=layer.bias.detach() + (omega - 1.0) * db)
    _assert_weak_rows(layer, x, DenseDelta(None, db), rows, omega, ref)


def test_bias_only_dense_delta_layernorm_multi_dim():
    # Not property-based: an expected failure would make hypothesis shrink and write patch files.
    seed, omega, rows = 0, 0.25, torch.tensor([2, 0])
    g, layer, x = _make(_layernorm_2d, seed)
    db = randn(g, *layer.bias.shape)
    ref = _by_hand(layer, bias=layer.bias.detach() + (omega - 1.0) * db)
    _assert_weak_rows(layer, x, DenseDelta(None, db), rows, omega, ref)


@pytest.mark.parametrize("name", ["linear", "groupnorm", "layernorm"])
@FAST
@given(seed=seeds, omega=omegas, rows=row_subsets(3))
def test_weight_only_dense_delta_leaves_bias(name, seed, omega, rows):
    g, layer, x = _make(DENSE_LAYERS[name], seed)
    dw = randn(g, *layer.weight.shape)
    ref = _by_hand(layer, weight=layer.weight.detach() + (omega - 1.0) * dw)
    _assert_weak_rows(layer, x, DenseDelta(dw, None), rows, omega, ref)


def test_empty_dense_delta_is_no_change():
    _, layer, x = _make(_linear, 0)
    out = layer(x)
    check_layer("layer", layer, DenseDelta())
    got = add_weak_correction(layer, x, out, DenseDelta(), torch.tensor([0, 2]), -0.5)
    assert torch.equal(got, out)


def _lora_linear(g, rank):
    layer = nn.Linear(6, 5)
    x = randn(g, 3, 4, 6)
    return layer, x, randn(g, 5, rank), randn(g, rank, 6)


def _lora_conv2d(g, rank):
    layer = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    x = randn(g, 3, 3, 7, 6)
    return layer, x, randn(g, 4, rank, 1, 1), randn(g, rank, 3, 3, 3)


def _lora_conv2d_flat(g, rank):
    # LoRA files often store 2-D up/down for convs too: up (out, r), down (r, in * kh * kw).
    layer = nn.Conv2d(3, 4, (3, 2), stride=(1, 2), padding=(1, 0))
    x = randn(g, 3, 3, 6, 7)
    return layer, x, randn(g, 4, rank), randn(g, rank, 3 * 3 * 2)


def _lora_conv2d_dilated_reflect(g, rank):
    layer = nn.Conv2d(2, 3, 3, stride=2, padding=2, dilation=2, padding_mode="reflect")
    x = randn(g, 3, 2, 7, 7)
    return layer, x, randn(g, 3, rank, 1, 1), randn(g, rank, 2, 3, 3)


def _lora_conv1d(g, rank):
    layer = nn.Conv1d(3, 4, 3, padding=1)
    x = randn(g, 3, 3, 8)
    return layer, x, randn(g, 4, rank, 1), randn(g, rank, 3, 3)


LORA_LAYERS = {
    "linear": _lora_linear,
    "conv2d": _lora_conv2d,
    "conv2d_flat": _lora_conv2d_flat,
    "conv2d_dilated_reflect": _lora_conv2d_dilated_reflect,
    "conv1d": _lora_conv1d,
}


def _random_lora_layer(name, g, rank):
    """A layer of LORA_LAYERS with random parameters drawn from ``g``, its input and LoRA factors."""
    layer, x, up, down = LORA_LAYERS[name](g, rank)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(randn(g, *p.shape))
    return layer, x, up, down


@pytest.mark.parametrize("name", list(LORA_LAYERS))
@FAST
@given(
    seed=seeds,
    omega=omegas,
    rows=row_subsets(3),
    rank=st.integers(1, 3),
    scale=st.floats(min_value=0.0, max_value=2.0),
)
def test_low_rank_delta_equals_hand_materialized_weight(name, seed, omega, rows, rank, scale):
    g = gen(seed)
    layer, x, up, down = _random_lora_layer(name, g, rank)
    w_pre = layer.weight.detach().clone()
    lora = (up.flatten(1) @ down.flatten(1)).reshape(w_pre.shape)
    with torch.no_grad():  # theta_ft = theta_pre + s * lora
        layer.weight.copy_(w_pre + scale * lora)
    # The weak model is the same LoRA at strength omega * s (docs/design.md, "Conventions").
    ref = _by_hand(layer, weight=w_pre + (omega * scale) * lora)
    _assert_weak_rows(layer, x, LowRankDelta(up, down, scale), rows, omega, ref)


@FAST
@given(seed=seeds, omega=omegas)
def test_low_rank_delta_matches_the_same_dense_delta(seed, omega):
    g = gen(seed)
    layer, x, up, down = _lora_conv2d(g, 2)
    out = layer(x)
    rows = torch.tensor([1, 2])
    dense = DenseDelta((up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape) * 0.7)
    got_lr = add_weak_correction(layer, x, out, LowRankDelta(up, down, 0.7), rows, omega - 1)
    got_dense = add_weak_correction(layer, x, out, dense, rows, omega - 1)
    torch.testing.assert_close(got_lr, got_dense, rtol=1e-5, atol=1e-5 * (1.0 + float(got_dense.abs().max())))


@st.composite
def row_slices(draw, batch: int):
    start = draw(st.integers(0, batch - 1))
    return slice(start, draw(st.integers(start + 1, batch)))


@pytest.mark.parametrize("name", list(LORA_LAYERS))
@FAST
@given(seed=seeds, omega=omegas, rows=row_slices(3), rank=st.integers(1, 3), scale=st.floats(0.0, 2.0))
def test_prepared_low_rank_correction_equals_hand_materialized_weight(name, seed, omega, rows, rank, scale):
    """The fused in-place route of the sampling loop gives what the weak weights give, on a chunk of rows."""
    g = gen(seed)
    layer, x, up, down = _random_lora_layer(name, g, rank)
    lora = (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape)
    ref = _by_hand(layer, weight=layer.weight.detach() + (omega - 1.0) * scale * lora)
    out = layer(x)
    before = out.clone()
    prepare_correction(layer, LowRankDelta(up, down, scale), x.device, x.dtype).add(x, out, rows, omega - 1.0)
    weak = ref(x)
    tol = 1e-5 * (1.0 + float(weak.abs().max()))
    torch.testing.assert_close(out[rows], weak[rows], rtol=1e-5, atol=tol)
    mask = torch.ones(x.shape[0], dtype=torch.bool)
    mask[rows] = False
    assert torch.equal(out[mask], before[mask])


def test_prepared_low_rank_correction_on_a_non_contiguous_output():
    g = gen(3)
    layer, x, up, down = _lora_linear(g, 2)
    out = layer(x).transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    expected = add_weak_correction(layer, x, out.clone(), LowRankDelta(up, down, 0.5), slice(1, 3), -0.25)
    prepare_correction(layer, LowRankDelta(up, down, 0.5), x.device, x.dtype).add(x, out, slice(1, 3), -0.25)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["lora-linear", "lora-conv2d", "dense-linear", "dense-groupnorm"])
@FAST
@given(seed=seeds, omega=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=2))
def test_per_row_coefficients_give_each_row_its_own_weak_model(kind, seed, omega):
    """A 1-D coefficient gives row i the weak model of omega[i] (PG Sweep's batched combinations)."""
    g = gen(seed)
    if kind.startswith("lora"):
        layer, x, up, down = _random_lora_layer(kind[5:], g, 2)
        delta = LowRankDelta(up, down, 0.5)
        dw = 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape)
    else:
        g, layer, x = _make(DENSE_LAYERS[kind[6:]], seed)
        dw = randn(g, *layer.weight.shape)
        delta = DenseDelta(dw)
    rows = slice(1, 3)
    coefficient = torch.tensor(omega) - 1.0
    prepared = layer(x)
    prepare_correction(layer, delta, x.device, x.dtype).add(x, prepared, rows, coefficient)
    generic = add_weak_correction(layer, x, layer(x), delta, rows, coefficient)
    for i, o in zip(range(1, 3), omega, strict=True):
        weak = _by_hand(layer, weight=layer.weight.detach() + (o - 1.0) * dw)(x)
        tol = 1e-5 * (1.0 + float(weak.abs().max()))
        torch.testing.assert_close(prepared[i], weak[i], rtol=1e-5, atol=tol)
        torch.testing.assert_close(generic[i], weak[i], rtol=1e-5, atol=tol)
    assert torch.equal(prepared[0], layer(x)[0])


@pytest.mark.parametrize("name", ["linear", "conv2d", "groupnorm", "layernorm"])
@FAST
@given(seed=seeds, omega=omegas, rows=row_slices(3))
def test_prepared_dense_correction_equals_add_weak_correction(name, seed, omega, rows):
    g, layer, x = _make(DENSE_LAYERS[name], seed)
    delta = DenseDelta(randn(g, *layer.weight.shape), randn(g, *layer.bias.shape))
    expected = add_weak_correction(layer, x, layer(x), delta, rows, omega - 1.0)
    out = layer(x)
    prepare_correction(layer, delta, x.device, x.dtype).add(x, out, rows, omega - 1.0)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("name", ["linear", "conv2d_grouped", "conv3d", "groupnorm", "layernorm_2d"])
@FAST
@given(seed=seeds, omega=omegas)
def test_weak_parameters_make_the_weak_layer(name, seed, omega):
    """theta_ft + (omega - 1) * delta, put in place of the fine-tuned parameters, is theta_pre + omega * delta."""
    g, layer, x = _make(DENSE_LAYERS[name], seed)
    w_pre, b_pre = randn(g, *layer.weight.shape), randn(g, *layer.bias.shape)
    dw, db = layer.weight.detach() - w_pre, layer.bias.detach() - b_pre
    ref = _by_hand(layer, w_pre + omega * dw, b_pre + omega * db)
    out = torch.empty_like(layer.weight)
    got = weak_parameter(layer.weight.detach(), dw, omega - 1.0, out=out)
    assert got.data_ptr() == out.data_ptr()
    weak = _by_hand(layer, got, weak_parameter(layer.bias.detach(), db, omega - 1.0))
    tol = 1e-5 * (1.0 + float(ref(x).abs().max()))
    torch.testing.assert_close(weak(x), ref(x), rtol=1e-5, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weak_parameter_keeps_the_model_dtype(dtype):
    g = gen(7)
    w, d = randn(g, 5, 6), randn(g, 5, 6)
    got = weak_parameter(w.to(dtype), d, -0.5)  # an fp32 delta against a half-precision model
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), w - 0.5 * d, rtol=0, atol=8 * torch.finfo(dtype).eps * float(w.abs().max() + d.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_layers_keep_their_dtype(dtype):
    g, layer32, x32 = _make(_linear, 5)
    dw, db = randn(g, *layer32.weight.shape), randn(g, *layer32.bias.shape)
    omega = 0.3
    ref = _by_hand(layer32, layer32.weight.detach() + (omega - 1) * dw, layer32.bias.detach() + (omega - 1) * db)
    layer, x = copy.deepcopy(layer32).to(dtype), x32.to(dtype)
    rows = torch.tensor([0, 2])
    got = add_weak_correction(layer, x, layer(x), DenseDelta(dw.to(dtype), db.to(dtype)), rows, omega - 1)
    assert got.dtype == dtype
    tol = 64 * torch.finfo(dtype).eps * float(ref(x32).detach().abs().max())
    torch.testing.assert_close(got[rows].float(), ref(x32)[rows], rtol=0, atol=tol)
    assert torch.equal(got[1], layer(x)[1])


# ---------------------------------------------------------------------------- check_layer


def test_check_layer_rejects_modules_that_are_no_layer_kind():
    deconv = nn.ConvTranspose2d(4, 3, 2)
    with pytest.raises(GuidanceInputError) as err:
        check_layer("upsampler", deconv, DenseDelta(torch.zeros(4, 3, 2, 2)))
    msg = str(err.value)
    assert "upsampler" in msg and "ConvTranspose2d" in msg and "layer kind" in msg


@pytest.mark.parametrize(
    "layer, delta, needle",
    [
        (nn.Linear(6, 5), DenseDelta(torch.zeros(6, 5)), r"weight delta .* \(6, 5\), the layer has \(5, 6\)"),
        (nn.Linear(6, 5), DenseDelta(None, torch.zeros(6)), r"bias delta .* \(6,\), the layer has \(5,\)"),
        (nn.Linear(6, 5, bias=False), DenseDelta(None, torch.zeros(5)), r"bias delta .* the layer has None"),
        (nn.Conv2d(3, 4, 3), DenseDelta(torch.zeros(4, 3, 1, 1)), r"weight delta .* \(4, 3, 1, 1\)"),
        (nn.GroupNorm(2, 6), DenseDelta(torch.zeros(4)), r"weight delta"),
        (nn.LayerNorm(6, elementwise_affine=False), DenseDelta(torch.zeros(6)), r"the layer has None"),
        (nn.GroupNorm(2, 6), LowRankDelta(torch.zeros(6, 1), torch.zeros(1, 1), 1.0), r"low-rank"),
        (nn.LayerNorm(6), LowRankDelta(torch.zeros(6, 1), torch.zeros(1, 1), 1.0), r"low-rank"),
        (nn.Conv2d(4, 6, 3, groups=2), LowRankDelta(torch.zeros(6, 1), torch.zeros(1, 2, 3, 3), 1.0), r"low-rank"),
        (nn.Linear(6, 5), LowRankDelta(torch.zeros(5, 2), torch.zeros(2, 7), 1.0), r"does not fit .*\(5, 6\)"),
        (nn.Linear(6, 5), LowRankDelta(torch.zeros(5, 3), torch.zeros(2, 6), 1.0), r"does not fit"),
        (nn.Conv2d(3, 4, 3), LowRankDelta(torch.zeros(4, 2, 1, 1), torch.zeros(2, 3, 1, 1), 1.0), r"does not fit"),
    ],
)
def test_check_layer_rejects_mismatched_deltas(layer, delta, needle):
    with pytest.raises(GuidanceInputError, match=needle) as err:
        check_layer("down_blocks.1.proj", layer, delta)
    assert "down_blocks.1.proj" in str(err.value)


def test_check_layer_rejects_low_rank_with_coincident_numel():
    layer = nn.Linear(6, 5)
    with pytest.raises(GuidanceInputError):
        check_layer("proj", layer, LowRankDelta(torch.zeros(10, 2), torch.zeros(2, 3), 1.0))


def test_check_layer_accepts_what_the_exactness_tests_use():
    check_layer("a", nn.Linear(6, 5), DenseDelta(torch.zeros(5, 6), torch.zeros(5)))
    check_layer("b", nn.Conv2d(4, 6, 3, groups=2), DenseDelta(torch.zeros(6, 2, 3, 3)))
    check_layer("c", nn.GroupNorm(2, 6), DenseDelta(None, torch.zeros(6)))
    check_layer("d", nn.Conv2d(3, 4, 3), LowRankDelta(torch.zeros(4, 2, 1, 1), torch.zeros(2, 3, 3, 3), 1.0))
    check_layer("e", nn.Conv2d(3, 4, 3), LowRankDelta(torch.zeros(4, 2), torch.zeros(2, 27), 1.0))
    check_layer("f", nn.Conv3d(2, 3, 3), LowRankDelta(torch.zeros(3, 1), torch.zeros(1, 2, 3, 3, 3), 1.0))


def test_error_messages_are_plain_sentences():
    """User-facing: each message names the layer and ends with a period (ComfyUI shows it verbatim)."""
    with pytest.raises(GuidanceInputError) as err:
        check_layer("mid.attn", nn.ConvTranspose1d(2, 2, 1), DenseDelta())
    assert re.search(r"mid\.attn .*\.$", str(err.value))


# ---------------------------------------------------------------------------- tensor_delta (streaming formation)


@pytest.mark.parametrize("stored", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("inputs", [torch.float32, torch.float16, torch.float8_e4m3fn])
def test_tensor_delta_is_formed_in_fp32_and_stored_once(stored, inputs, monkeypatch):
    """Chunks of a long tensor each formed in fp32 (the difference of two fp16 values is exact there) and rounded once."""
    import guidance.deltas as deltas

    monkeypatch.setattr(deltas, "_CHUNK", 7)  # many chunks, the last one short
    g = gen(3)
    base = randn(g, 5, 9).to(inputs)
    ft = (base.float() + 0.1 * randn(g, 5, 9)).to(inputs)
    got = deltas.tensor_delta("w", base, ft, stored)
    assert got.dtype == stored and got.shape == base.shape
    torch.testing.assert_close(got, (ft.float() - base.float()).to(stored), rtol=0, atol=0)


def test_tensor_delta_of_an_unchanged_tensor_is_none():
    t = torch.arange(12.0).reshape(3, 4)
    assert tensor_delta("w", t, t.clone(), torch.float16) is None


@pytest.mark.parametrize("side", ["base", "fine-tuned"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_tensor_delta_names_the_tensor_and_the_side_that_is_not_finite(side, bad):
    base, ft = torch.zeros(4, 3), torch.ones(4, 3)
    (base if side == "base" else ft)[2, 1] = bad
    with pytest.raises(GuidanceInputError, match=f"The {side} model holds NaN or Inf in blocks.3.proj.weight"):
        tensor_delta("blocks.3.proj.weight", base, ft, torch.float16)


def test_tensor_delta_overflow_is_an_error():
    base = torch.full((2,), -3e38)
    with pytest.raises(GuidanceInputError, match="overflows"):
        tensor_delta("w", base, -base)


# ---------------------------------------------------------------------------- low_rank_factors


def test_low_rank_factors_are_the_truncated_svd():
    g = gen(5)
    delta = randn(g, 12, 4) @ randn(g, 4, 20)  # rank 4
    exact = low_rank_factors(delta, rank=4, energy=1.0)
    assert exact.down.shape == (4, 20) and exact.up.shape == (12, 4, *()) and exact.kept == pytest.approx(1.0)
    torch.testing.assert_close(exact.up.flatten(1) @ exact.down.flatten(1), delta, rtol=1e-4, atol=1e-4)
    two = low_rank_factors(delta, rank=2, energy=1.0)
    s = torch.linalg.svdvals(delta).double()
    assert two.kept == pytest.approx(float((s[:2] ** 2).sum() / (s**2).sum()), rel=1e-6)
    error = torch.linalg.norm(delta - two.up.flatten(1) @ two.down.flatten(1))
    assert float(error) == pytest.approx(float((s[2:] ** 2).sum().sqrt()), rel=1e-4)  # Eckart-Young


def test_low_rank_factors_energy_threshold_and_conv_shapes():
    g = gen(6)
    delta = randn(g, 8, 3, 3, 3)  # a conv weight delta: out 8, in 3 x 3 x 3
    lr = low_rank_factors(delta, rank=0, energy=0.5)
    s2 = torch.linalg.svdvals(delta.reshape(8, -1)).double() ** 2
    fewest = int((torch.cumsum(s2, 0) / s2.sum() < 0.5).sum()) + 1
    assert lr.down.shape == (fewest, 3, 3, 3) and lr.up.shape == (8, fewest, 1, 1) and lr.kept >= 0.5
    assert low_rank_factors(delta, rank=0, energy=1.0) is None  # all 8 singular values: no smaller than the delta
