"""The personalization study runs end to end (reduced), and its scorers measure the world exactly.

These tests check the pipeline, not which method wins: see study/RESULTS.md for that.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from guidance import OmegaSchedule, OmegaShape
from study import experiment, lora, metrics, run, world
from study.config import QUICK
from study.guiders import Counter, FullPair, LoraPair, Method, Setting, denoiser
from study.model import Denoiser


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    results = run.main(quick=True, out_dir=out, cache=False)
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)  # torch state left as found
    return out, results


def test_quick_run_writes_every_output(quick_run):
    out, results = quick_run
    for name in ("results.json", "RESULTS.md", "frontier.png", "samples_full.png", "samples_lora.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))


def test_quick_run_metrics_are_finite_and_in_range(quick_run):
    _, results = quick_run
    assert set(results["models"]) == {"full fine-tune", "LoRA"}
    methods = set()
    for model in results["models"].values():
        for row in model["settings"]:
            methods.add(row["method"])
            for key in ("fidelity", "pattern_fidelity", "alignment", "success", "diversity",
                        "fidelity_training_context", "alignment_training_context"):
                assert math.isfinite(row[key]) and 0.0 <= row[key] <= 1.0, (row["label"], key)
            assert row["fidelity"] <= row["pattern_fidelity"] + 1e-6
            assert set(row["success_by_context"]) == set(world.BACKGROUNDS)
            assert all(0.0 <= v <= 1.0 for v in row["success_by_context"].values())
            assert row["evaluations_per_step"] in (1, 2, 3)
    assert methods == {m.value for m in Method}
    for scores in results["text_following"].values():
        assert all(0.0 <= v <= 1.0 for v in scores.values())


def test_evaluation_counts_follow_the_spec():
    model = Denoiser(world.VOCAB_SIZES, width=8)
    pair = FullPair(model, model)
    tokens = torch.tensor([world.encode("sks", "square", "", "beach")])
    x = torch.randn(1, 3, world.RES, world.RES)
    cases = [
        (Setting(Method.FINETUNED), 1),
        (Setting(Method.CFG, 3.0), 2),
        (Setting(Method.TWO_WAY, 3.0, OmegaSchedule.constant(0.5)), 2),
        (Setting(Method.TWO_WAY, 1.0, OmegaSchedule.constant(0.5)), 1),
        (Setting(Method.THREE_WAY, 3.0, OmegaSchedule.constant(0.5), 2.0), 3),
        (Setting(Method.THREE_WAY, 3.0, OmegaSchedule.constant(0.5), 1.0), 2),
    ]
    for setting, expected in cases:
        counter = Counter()
        denoiser(setting, pair, tokens, counter)(x, 1.0, 0.5)
        assert counter.evaluations == expected, setting.label


def test_weak_model_interpolates_weights():
    torch.manual_seed(0)
    base, ft = Denoiser(world.VOCAB_SIZES, width=8), Denoiser(world.VOCAB_SIZES, width=8)
    pair = FullPair(base, ft)
    by_hand = Denoiser(world.VOCAB_SIZES, width=8)
    by_hand.load_state_dict({k: 0.7 * v + 0.3 * ft.state_dict()[k] for k, v in base.state_dict().items()})
    x, sigma, tokens = torch.randn(2, 3, 16, 16), torch.tensor(0.7), torch.tensor([[1, 1, 0, 2], [0, 0, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(pair.weak(x, sigma, tokens, 0.3), by_hand(x, sigma, tokens))
        torch.testing.assert_close(pair.weak(x, sigma, tokens, 0.0), base(x, sigma, tokens))


def test_lora_weak_model_is_the_lora_at_omega_times_strength():
    torch.manual_seed(0)
    model = Denoiser(world.VOCAB_SIZES, width=8)
    lora.add_lora(model.net, rank=2, alpha=2)
    for m in model.modules():
        if isinstance(m, lora.LoRA):
            torch.nn.init.normal_(m.up.weight, std=0.1)
    x, sigma, tokens = torch.randn(2, 3, 16, 16), torch.tensor(1.3), torch.tensor([[1, 1, 0, 2], [0, 0, 0, 0]])
    pair = LoraPair(model, strength=0.5)
    with torch.no_grad():
        weak = pair.weak(x, sigma, tokens, 0.4)
        ft = pair.ft(x, sigma, tokens)
        lora.set_strength(model, 0.4 * 0.5)
        torch.testing.assert_close(weak, model(x, sigma, tokens))  # the adapters themselves, at omega * s
        lora.set_strength(model, 0.5)
        torch.testing.assert_close(ft, model(x, sigma, tokens))


def test_scorers_are_exact_on_rendered_pictures():
    g = torch.Generator().manual_seed(0)
    images, tokens = world.sample_pretraining(200, g, drop_slot=0.0, drop_prompt=0.0)
    images = metrics.to_unit(images)
    assert metrics.prompt_accuracy(images, tokens).all()
    assert metrics.subject_fidelity(images).max() < QUICK.success_threshold  # never the subject
    photos = metrics.to_unit(world.subject_images(10, "beach", g))
    assert torch.all(metrics.subject_fidelity(photos) == 1.0)
    # Extra magenta outside the subject lowers fidelity, not pattern fidelity.
    painted = photos.clone()
    painted[:, :, :2, :] = torch.tensor([0.85, 0.20, 0.75]).view(1, 3, 1, 1)
    assert torch.all(metrics.subject_fidelity(painted) < 1.0)
    assert torch.all(metrics.pattern_fidelity(painted) == 1.0)
    beach = world.encode(background="beach")[3]
    assert torch.all(metrics.context_alignment(photos, torch.full((10,), beach)) == 1.0)
    assert torch.all(metrics.context_alignment(photos, torch.full((10,), beach + 1)) == 0.0)
    assert metrics.diversity(photos[:1].expand(3, -1, -1, -1)) == 0.0


def test_settings_cover_every_method_and_a_schedule():
    grid = experiment.settings(QUICK)
    assert {s.method for s in grid} == set(Method)
    assert any(s.schedule.shape != OmegaShape.CONSTANT for s in grid)
