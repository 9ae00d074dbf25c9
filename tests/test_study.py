"""The personalization study runs end to end (reduced), its scorers measure the world exactly, and its statistics are right.

These tests check the pipeline and the arithmetic, not which method wins: see study/RESULTS.md for that.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import sys

import pytest
import torch

from guidance import OmegaSchedule, OmegaShape
from study import aggregate, claims, experiment, lora, metrics, report, run, stats, world
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
    text = (out / "RESULTS.md").read_text()
    for claim in claims.claims(results):
        assert claim.text in text


def test_quick_run_metrics_are_finite_and_in_range(quick_run):
    _, results = quick_run
    assert len(results["replicates"]) == QUICK.replicates
    assert len({rep["seed"] for rep in results["replicates"]}) == QUICK.replicates
    methods = set()
    for rep in results["replicates"]:
        assert set(rep["models"]) == {"full fine-tune", "LoRA"}
        for model in rep["models"].values():
            for row in model["settings"]:
                methods.add(row["method"])
                for key in aggregate.METRICS:
                    assert math.isfinite(row[key]) and 0.0 <= row[key] <= 1.0, (row["label"], key)
                assert row["fidelity"] <= row["pattern_fidelity"] + 1e-6
                assert set(row["success_by_context"]) == set(world.BACKGROUNDS)
                assert all(0.0 <= v <= 1.0 for v in row["success_by_context"].values())
                assert row["evaluations_per_step"] in (1, 2, 3)
        for scores in rep["text_following"].values():
            assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert methods == {m.value for m in Method}


def test_replicates_differ_and_a_replicate_reruns_bit_identically(quick_run):
    _, results = quick_run
    first, second = (json.dumps(rep["models"]) for rep in results["replicates"][:2])
    assert first != second  # their own pre-training, fine-tunes and noise
    with torch.random.fork_rng(devices=[]):
        threads = torch.get_num_threads()
        torch.set_num_threads(QUICK.threads)
        try:
            again, _ = run.run_replicate(QUICK.replicate(0), None)
        finally:
            torch.set_num_threads(threads)
    again = json.loads(json.dumps(again))
    for key in ("models", "text_following", "seed"):
        assert again[key] == results["replicates"][0][key], key


def test_a_run_compared_with_itself_agrees_and_a_perturbed_one_is_counted(quick_run):
    _, results = quick_run
    assert all(ok for _, _, ok in claims.agreement(results, results))
    same = report.spread(results, results)
    assert same["differ"] == 0 and same["values"] > 100
    other = copy.deepcopy(results)
    rows = other["replicates"][1]["models"]["LoRA"]["settings"]
    rows[0]["fidelity"] += 0.125
    rows[1]["success"] = 1.0 - rows[1]["success"]
    moved = report.spread(results, other)
    assert moved["differ"] == 2
    assert moved["success_max_gap"] == pytest.approx(abs(1.0 - 2 * results["replicates"][1]["models"]["LoRA"]
                                                         ["settings"][1]["success"]))
    text = report.markdown(results, other)
    assert "2 of" in text and "per-replicate scores differ" in text


def test_report_only_cli_with_compare(quick_run, monkeypatch, tmp_path):
    out, results = quick_run
    (tmp_path / "results.json").write_text((out / "results.json").read_text())
    monkeypatch.setattr(sys, "argv", ["study.run", "--report-only", "--out", str(tmp_path),
                                      "--compare", str(out / "results.json")])
    run.cli()
    text = (tmp_path / "RESULTS.md").read_text()
    n = len(claims.claims(results))
    assert f"agree in {n} of {n} cases" in text


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


def test_t_quantiles_match_closed_forms():
    p = 0.975
    assert stats.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-6)  # Cauchy
    assert stats.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-6)
    assert stats.t_quantile(p, 2000) == pytest.approx(statistics.NormalDist().inv_cdf(p), rel=1e-3)
    quantiles = [stats.t_quantile(p, df) for df in range(1, 12)]
    assert quantiles == sorted(quantiles, reverse=True)  # heavier tails with fewer degrees of freedom
    with pytest.raises(ValueError):
        stats.t_quantile(0.4, 3)


def test_estimate_is_the_t_interval_and_its_verdict_follows_the_sign():
    e = stats.estimate([2.0, 3.0, 4.0, 5.0])
    sd = statistics.stdev([2.0, 3.0, 4.0, 5.0])
    assert e.mean == 3.5 and e.n == 4
    assert e.half_width == pytest.approx(stats.t_quantile(0.975, 3) * sd / 2)
    assert e.verdict == stats.Verdict.HIGHER
    assert stats.estimate([-2.0, -2.5, -3.0]).verdict == stats.Verdict.LOWER
    assert stats.estimate([-1.0, 2.0, 0.5]).verdict == stats.Verdict.WITHIN
    single = stats.estimate([0.3])
    assert single.lo is None and single.verdict == stats.Verdict.UNKNOWN


def _synthetic(success: dict[str, list[float]]) -> aggregate.Table:
    """A table of CFG settings with the given success per replicate (other scores 0)."""
    tab = {}
    for label, values in success.items():
        row = {"method": Method.CFG.value, "label": label}
        scores = {m: [0.0] * len(values) for m in aggregate.METRICS} | {"success": values}
        tab[label] = aggregate.Setting(label, row, scores, {})
    return tab


def test_best_setting_is_chosen_without_the_replicate_it_is_scored_on():
    # "lucky" wins on the means only through replicate 0; "steady" is better on the other replicates' means there.
    tab = _synthetic({"lucky": [0.9, 0.1, 0.1], "steady": [0.3, 0.3, 0.3], "zero": [0.0, 0.0, 0.0]})
    assert aggregate.best(tab, (Method.CFG.value,)) == "lucky"
    assert aggregate.best(tab, (Method.CFG.value,), leave_out=0) == "steady"
    zero = {"zero": tab.pop("zero")}
    zero["zero"].row["method"] = Method.AUTOGUIDANCE.value
    tab |= zero
    tuned = aggregate.tuned_difference(tab, (Method.CFG.value,), (Method.AUTOGUIDANCE.value,))
    assert tuned.chosen_a == ["steady", "lucky", "lucky"]
    assert tuned.difference.mean == pytest.approx((0.3 + 0.1 + 0.1) / 3)


def test_claims_disagree_when_a_verdict_flips(quick_run):
    _, results = quick_run

    def with_failure(new: float, training: float) -> dict:
        out = copy.deepcopy(results)
        for rep in out["replicates"]:
            for model in rep["models"].values():
                for row in model["settings"]:
                    if row["method"] == Method.FINETUNED.value:
                        row["alignment"], row["alignment_training_context"] = new, training
        return out

    lost, kept = with_failure(0.0, 1.0), with_failure(1.0, 0.0)
    verdicts = {c.id: c.verdict for c in claims.claims(lost)}
    assert verdicts["the failure"] == stats.Verdict.LOWER.value
    assert [c.id for c, _, ok in claims.agreement(lost, kept) if not ok] == ["the failure"]


def test_a_one_sided_claim_says_only_whether_it_is_lower():
    def pg_vs_cfg(differences: list[float]) -> claims.Comparison:
        return claims.Comparison("PG vs CFG, success", "PG minus CFG", stats.estimate(differences), "PG higher",
                                 "PG lower", points=True, one_sided=True)

    higher, within, lower = pg_vs_cfg([0.05, 0.06, 0.07]), pg_vs_cfg([-0.05, 0.02, 0.1]), pg_vs_cfg([-0.05, -0.06, -0.07])
    assert higher.difference.verdict == stats.Verdict.HIGHER
    assert higher.verdict == within.verdict == claims.NOT_SHOWN_LOWER  # a gain in one run and none in another agree
    assert lower.verdict == stats.Verdict.LOWER.value
    assert "PG higher" not in higher.sentence() and "PG lower: not shown" in higher.sentence()
    assert "PG vs CFG, success" in claims.ONE_SIDED


def test_machine_load_is_recorded_and_reported(quick_run):
    _, results = quick_run
    m = results["machine"]
    assert m["cpus"] >= 1 and len(m["load_start"]) == len(m["load_end"]) == 3 and m["cpu_s"] > 0
    assert "CPU seconds in all" in report.markdown(results)
    older = {k: v for k, v in results.items() if k != "machine"}  # runs before the load was recorded
    assert "load was not recorded" in report.markdown(older)
