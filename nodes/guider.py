"""Personalization Guider: a GUIDER for SamplerCustomAdvanced."""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..guidance import GuidanceInputError, check_scale
from .core.runtime import Estimate, GuidanceConfig, RowScales, attach
from .inputs import estimate_input, model_input, personalization_scale_input, weak_model_input
from .sockets import CATEGORY


class PersonalizationGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PG_PersonalizationGuider",
            display_name="Personalization Guider",
            category=CATEGORY,
            description=(
                "Personalization guidance (arXiv 2508.00319): the weak model on the null prompt guides the "
                "fine-tuned model, at the cost of CFG. Use in place of CFGGuider with SamplerCustomAdvanced."
            ),
            inputs=[
                model_input(),
                weak_model_input(),
                io.Conditioning.Input("positive", tooltip="The prompt c, encoded with the pair's CLIP."),
                io.Conditioning.Input(
                    "null_conditioning",
                    tooltip="The empty prompt \"\" encoded with the pair's CLIP (a CLIPTextEncode with no text). "
                    "Not a negative prompt: the weak model sees this.",
                ),
                io.Conditioning.Input(
                    "negative",
                    optional=True,
                    tooltip="Three-way only: the negative prompt n. Leave unconnected to use the null prompt.",
                ),
                estimate_input(),
                io.Float.Input(
                    "guidance_scale",
                    default=7.5,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="lambda (two-way) or the text scale lambda_t (three-way), like CFG's scale. 1 samples "
                    "the fine-tuned model on the prompt alone, with one evaluation per step.",
                ),
                personalization_scale_input(),
            ],
            outputs=[io.Guider.Output("guider", tooltip="For SamplerCustomAdvanced's guider input.")],
        )

    @classmethod
    def execute(
        cls,
        model,
        weak_model,
        positive,
        null_conditioning,
        estimate: str,
        guidance_scale: float,
        personalization_scale: float,
        negative=None,
    ) -> io.NodeOutput:
        return io.NodeOutput(make_guider(model, weak_model, positive, null_conditioning, estimate, guidance_scale,
                                         personalization_scale, negative))


def make_guider(model, weak_model, positive, null_conditioning, estimate: str, guidance_scale: float,
                personalization_scale: float, negative=None, rows: RowScales | None = None) -> comfy.samplers.CFGGuider:
    """The guider's GUIDER; ``rows`` gives each row of the latent batch its own omega and scales (PG Sweep)."""
    estimate = Estimate(estimate)
    check_scale("guidance_scale", guidance_scale)
    if negative is not None and estimate == Estimate.TWO_WAY:
        raise GuidanceInputError(
            "The two-way estimate has no negative prompt: set estimate to three-way, or disconnect negative."
        )
    config = GuidanceConfig(
        weak=weak_model,
        estimate=estimate,
        lambda_p=personalization_scale,
        null=null_conditioning if negative is not None else None,
        rows=rows,
    )
    guider = comfy.samplers.CFGGuider(attach(model, config))
    guider.set_conds(positive, negative if negative is not None else null_conditioning)
    guider.set_cfg(guidance_scale)
    return guider
