"""Personalization Schedule Preview (PG_SchedulePreview): omega and the estimate's weights at every step of the chosen sigmas, before sampling."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ...guidance import (
    BlockSpec,
    GuidanceInputError,
    OmegaShape,
    StepGuidance,
    block_omega,
    check_scale,
    guidance_per_step,
    omega_at_sigma,
    progress_of_sigma,
)
from ..core.schema import node_schema
from ..core.vocabulary import Estimate
from ..inputs import estimate_input, estimate_of, guidance_scale_input, personalization_scale_input, weak_model_input
from ..sockets import TUNING_CATEGORY
from .plot import Panel, Series, line_plot

OMEGA_COLOR = (31, 119, 180)
WEIGHT_COLORS = {"D_ft(c)": (214, 39, 40), "D_ft(n)": (44, 160, 44), "D_w(null)": (148, 103, 189)}
TABLE_HEADER = "step,sigma,progress,omega,evaluations,weight_ft_c,weight_ft_n,weight_w_null"
# Omega per block: one line per block setting's group (the first few), in these colours after the run's omega.
BLOCK_COLORS = ((255, 127, 14), (23, 190, 207), (188, 189, 34), (227, 119, 194), (140, 86, 75), (127, 127, 127))


def block_groups(blocks: BlockSpec | None) -> list[tuple[str, float]]:
    """(label, factor) of each block the weak model's per_block setting names: one line each in the preview."""
    return [] if blocks is None else blocks.groups()


def step_table(sigmas: list[float], steps: list[StepGuidance], groups: list[tuple[str, float]] = ()) -> str:
    """CSV, one line per step: what the plot shows, as numbers; with omega per block, omega_b of each block last
    (columns ``omega[<block>]``)."""
    lines = [TABLE_HEADER + "".join(f",omega[{label}]" for label, _ in groups)]
    for i, (sigma, step) in enumerate(zip(sigmas, steps, strict=True), start=1):
        w = step.weights
        lines.append(f"{i},{sigma:.6g},{step.progress:.6f},{step.omega:.6f},{step.evaluations.count},"
                     f"{w.ft_positive:.6g},{w.ft_negative:.6g},{w.weak_null:.6g}"
                     + "".join(f",{block_omega(step.omega, f):.6f}" for _, f in groups))
    return "\n".join(lines) + "\n"


def plot_steps(steps: list[StepGuidance], title: str, groups: list[tuple[str, float]] = ()):
    """The preview: omega per step on top (and each block's omega_b = 1 - f (1 - omega)), the weights on the three
    evaluations below."""
    ticks = [f"{i}\np {s.progress:.2f}" for i, s in enumerate(steps, start=1)]
    series = [Series("omega" if not groups else "omega (factor 1)", tuple(s.omega for s in steps), OMEGA_COLOR)]
    series += [Series(f"{label} (x{f:g})", tuple(block_omega(s.omega, f) for s in steps), color)
               for (label, f), color in zip(groups, BLOCK_COLORS, strict=False)]
    omega = Panel("omega(p) of the weak model (1: plain CFG, no unlearning)" if not groups else
                  "omega per block", tuple(series), y_range=(-0.05, 1.05))
    weights = Panel(
        "weight of each prediction in the estimate (they sum to 1; 0: not evaluated)",
        tuple(Series(label, tuple(getattr(s.weights, field) for s in steps), WEIGHT_COLORS[label])
              for label, field in (("D_ft(c)", "ft_positive"), ("D_ft(n)", "ft_negative"), ("D_w(null)", "weak_null"))),
    )
    return line_plot(title, ticks, "sampling step (p: sampling progress, 0 = first step, 1 = end)", [omega, weights])


def image_tensor(image) -> torch.Tensor:
    """A Pillow RGB image as a ComfyUI IMAGE batch of one: [1, H, W, 3] floats in [0, 1]."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return (data.reshape(1, image.height, image.width, 3).to(torch.float32) / 255.0).contiguous()


class SchedulePreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="PG_SchedulePreview",
            display_name="Personalization Schedule Preview",
            category=TUNING_CATEGORY,
            search_aliases=["schedule preview", "plot", "omega schedule", "weights per step", "tuning"],
            description=(
                "Plots, for every step of the sigmas, omega(p) of the weak model and the weights the estimate puts "
                "on D_ft(c), D_ft(n) and D_w(null): what the Personalization Guider (or the KSampler patch) will do, "
                "before sampling. With omega per block, one omega line per block (the first six). Wire it as the "
                "guider is wired. Also outputs the numbers as CSV."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The MODEL you sample with: its noise schedule turns each sigma into sampling progress p.",
                ),
                weak_model_input(),
                io.Sigmas.Input("sigmas", tooltip="The sigmas you sample with (e.g. from BasicScheduler): one point per step."),
                estimate_input(
                    two_way=[guidance_scale_input()],
                    three_way=[
                        io.Conditioning.Input(
                            "negative",
                            optional=True,
                            tooltip="Connect the guider's negative prompt, if it has one. Only whether one is "
                            "connected matters: without one, n is the null prompt, and steps with omega 1 skip the "
                            "weak model.",
                        ),
                        guidance_scale_input(),
                        personalization_scale_input(),
                    ],
                    shown="Set it as on the guider. Two-way shows guidance_scale (lambda); three-way the negative "
                    "socket, guidance_scale (lambda_t) and personalization_scale (lambda_p).",
                ),
            ],
            outputs=[
                io.Image.Output("plot", tooltip="omega per step, and the weight of each prediction per step."),
                io.String.Output("table", tooltip="The plotted numbers as CSV, one line per step."),
            ],
        )

    @classmethod
    def execute(
        cls,
        model,
        weak_model,
        sigmas: torch.Tensor,
        estimate: dict | str,
        guidance_scale: float | None = None,
        personalization_scale: float | None = None,
        negative=None,
    ) -> io.NodeOutput:
        """``estimate`` as ComfyUI passes it; Python callers may pass the estimate's name and its inputs as arguments."""
        chosen = estimate_of(estimate, guidance_scale=guidance_scale, personalization_scale=personalization_scale,
                             negative=negative)
        estimate, guidance_scale, negative = chosen.key, chosen["guidance_scale"], chosen.get("negative")
        check_scale("guidance_scale", guidance_scale)
        three_way = estimate == Estimate.THREE_WAY
        if negative is not None and not three_way:
            raise GuidanceInputError(
                "The two-way estimate has no negative prompt: set estimate to three-way, or disconnect negative."
            )
        lambda_p = check_scale("personalization_scale", chosen["personalization_scale"]) if three_way else guidance_scale
        values = [float(s) for s in sigmas.flatten()]
        if len(values) < 2:
            raise GuidanceInputError("The sigmas hold no sampling step: connect at least two sigmas (steps >= 1).")
        model_sampling = model.get_model_object("model_sampling")
        evaluated = values[:-1]  # the last sigma is where sampling ends, not a step
        progress = [progress_of_sigma(model_sampling.percent_to_sigma, s) for s in evaluated]
        # Whether a step is inside the guidance interval is decided on its sigma, as sampling decides it.
        omegas = [omega_at_sigma(weak_model.schedule, s, model_sampling.percent_to_sigma, lambda _, p=p: p)
                  for s, p in zip(evaluated, progress, strict=True)]
        steps = guidance_per_step(weak_model.schedule, progress, lambda_p, guidance_scale,
                                  negative_is_null=negative is None, omegas=omegas)

        schedule = weak_model.schedule
        shape = f"{schedule.shape.value} omega {schedule.omega_start:g}"
        if schedule.shape != OmegaShape.CONSTANT:
            shape += f" to {schedule.omega_end:g}"
        if (schedule.p_start, schedule.p_end) != (0.0, 1.0):
            shape += f" for p in [{schedule.p_start:g}, {schedule.p_end:g}]"
        scales = f"lambda_t {guidance_scale:g}, lambda_p {lambda_p:g}" if three_way else f"lambda {guidance_scale:g}"
        counts = sorted({s.evaluations.count for s in steps})
        groups = block_groups(weak_model.blocks)
        if groups:
            label = weak_model.blocks.label()
            shape += f"; per block: {label if len(label) <= 90 else label[:87] + '...'}"
        title = (f"{estimate.value}: {scales}; {len(steps)} steps, {' or '.join(map(str, counts))} model "
                 f"evaluations per step\nweak model: {shape}")
        plot = plot_steps(steps, title, groups)
        return io.NodeOutput(image_tensor(plot.image), step_table(evaluated, steps, groups))
