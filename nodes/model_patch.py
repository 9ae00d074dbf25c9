"""Personalization Guidance (KSampler): the same guidance as a MODEL patch, for KSampler and anything taking a MODEL."""

from __future__ import annotations

from comfy_api.latest import io

from ..guidance import GuidanceInputError
from .core.runtime import attach
from .core.schema import node_schema
from .core.vocabulary import Estimate, GuidanceConfig
from .inputs import estimate_input, estimate_of, model_input, personalization_scale_input, weak_model_input
from .sockets import CATEGORY


class PersonalizationGuidanceModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="PG_PersonalizationGuidanceModel",
            display_name="Personalization Guidance (KSampler)",
            category=CATEGORY,
            search_aliases=["KSampler", "model patch", "CFG", "detailer", "upscaler", "two-way", "three-way"],
            description=(
                "Patches the fine-tuned MODEL so that KSampler, detailers and upscalers sample with personalization "
                "guidance. The sampler's cfg is lambda. Two-way: connect the empty prompt \"\" to the sampler's "
                "negative. Three-way: the sampler's negative is n, and null_conditioning is the empty prompt."
            ),
            inputs=[
                model_input(),
                weak_model_input(),
                estimate_input(
                    two_way=[],
                    three_way=[
                        io.Conditioning.Input(
                            "null_conditioning",
                            tooltip="The empty prompt \"\" encoded with the pair's CLIP (a CLIPTextEncode with no "
                            "text): the weak model sees it. The sampler's negative is the negative prompt n.",
                        ),
                        personalization_scale_input(),
                    ],
                    shown="The sampler's cfg is lambda (lambda_t in three-way). Two-way takes nothing more: connect "
                    "the empty prompt to the sampler's negative. Three-way shows the null_conditioning socket and "
                    "personalization_scale (lambda_p); the sampler's negative is n.",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The fine-tuned MODEL with personalization guidance; sample with it.")],
        )

    @classmethod
    def execute(cls, model, weak_model, estimate: dict | str, personalization_scale: float | None = None,
                null_conditioning=None) -> io.NodeOutput:
        """``estimate`` as ComfyUI passes it; Python callers may pass the estimate's name and its inputs as arguments."""
        chosen = estimate_of(estimate, personalization_scale=personalization_scale, null_conditioning=null_conditioning)
        null = chosen.get("null_conditioning")
        if chosen.key == Estimate.THREE_WAY and null is None:  # only a Python caller can leave it out
            raise GuidanceInputError(
                "Three-way personalization guidance needs null_conditioning: connect a CLIPTextEncode of the empty "
                "prompt. (The sampler's negative is the negative prompt n.)"
            )
        config = GuidanceConfig(weak=weak_model, estimate=chosen.key, lambda_p=chosen.get("personalization_scale", 1.0),
                                null=null if chosen.key == Estimate.THREE_WAY else None)
        return io.NodeOutput(attach(model, config))
