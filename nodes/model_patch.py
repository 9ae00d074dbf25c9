"""Personalization Guidance (KSampler): the same guidance as a MODEL patch, for KSampler and anything taking a MODEL."""

from __future__ import annotations

from comfy_api.latest import io

from ..guidance import GuidanceInputError
from .core.runtime import Estimate, GuidanceConfig, attach
from .inputs import estimate_input, model_input, personalization_scale_input, weak_model_input
from .sockets import CATEGORY


class PersonalizationGuidanceModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PG_PersonalizationGuidanceModel",
            display_name="Personalization Guidance (KSampler)",
            category=CATEGORY,
            description=(
                "Patches the fine-tuned MODEL so that KSampler, detailers and upscalers sample with personalization "
                "guidance. The sampler's cfg is lambda. Two-way: connect the empty prompt \"\" to the sampler's "
                "negative. Three-way: the sampler's negative is n, and null_conditioning is the empty prompt."
            ),
            inputs=[
                model_input(),
                weak_model_input(),
                estimate_input(),
                personalization_scale_input(),
                io.Conditioning.Input(
                    "null_conditioning",
                    optional=True,
                    tooltip="The empty prompt \"\" encoded with the pair's CLIP. Needed for three-way; for two-way, "
                    "leave it unconnected and connect the empty prompt to the sampler's negative instead.",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The fine-tuned MODEL with personalization guidance; sample with it.")],
        )

    @classmethod
    def execute(cls, model, weak_model, estimate: str, personalization_scale: float, null_conditioning=None) -> io.NodeOutput:
        estimate = Estimate(estimate)
        if estimate == Estimate.THREE_WAY and null_conditioning is None:
            raise GuidanceInputError(
                "Three-way personalization guidance needs null_conditioning: connect a CLIPTextEncode of the empty "
                "prompt. (The sampler's negative is the negative prompt n.)"
            )
        config = GuidanceConfig(weak=weak_model, estimate=estimate, lambda_p=personalization_scale, null=null_conditioning)
        return io.NodeOutput(attach(model, config))
