"""Personalization Guider: a GUIDER for SamplerCustomAdvanced."""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..guidance import GuidanceInputError, check_scale
from .core.runtime import attach
from .core.schema import node_schema
from .core.vocabulary import Estimate, GuidanceConfig, RowScales
from .inputs import estimate_of, guider_estimate_input, model_input, weak_model_input
from .sockets import CATEGORY


class PersonalizationGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="PG_PersonalizationGuider",
            display_name="Personalization Guider",
            category=CATEGORY,
            search_aliases=["guider", "CFG guider", "SamplerCustomAdvanced", "weak model guidance", "two-way",
                            "three-way", "lambda"],
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
                guider_estimate_input(),
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
        estimate: dict | str,
        guidance_scale: float | None = None,
        personalization_scale: float | None = None,
        negative=None,
    ) -> io.NodeOutput:
        """``estimate`` as ComfyUI passes it (the estimate with its scales and negative); Python callers may pass the
        estimate's name, the scales and ``negative`` as arguments."""
        chosen = estimate_of(estimate, guidance_scale=guidance_scale, personalization_scale=personalization_scale,
                             negative=negative)
        return io.NodeOutput(make_guider(model, weak_model, positive, null_conditioning, chosen.key,
                                         chosen["guidance_scale"], chosen.get("personalization_scale", 1.0),
                                         chosen.get("negative")))


def make_guider(model, weak_model, positive, null_conditioning, estimate: str, guidance_scale: float,
                personalization_scale: float, negative=None, rows: RowScales | None = None) -> comfy.samplers.CFGGuider:
    """The guider's GUIDER; ``rows`` gives each row of the latent batch its own omega and scales (Personalization Sweep)."""
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
