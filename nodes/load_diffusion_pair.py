"""The diffusion-model pair loader: a base diffusion-model file and its LoRA or fine-tuned file.

Diffusion transformers (Flux.2, Qwen-Image, Wan, ...) ship as separate diffusion-model,
text-encoder and VAE files. This loader takes the diffusion models from ComfyUI's
``diffusion_models`` folder, loaded by ComfyUI's own UNETLoader with the weight dtype it
offers; the text encoder and VAE come from their own loaders.
"""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

import nodes as comfy_nodes  # ComfyUI's nodes.py (UNETLoader), not this pack's package

from .core.personalization import load_pair, personalization_input, personalization_of
from .core.schema import node_schema
from .sockets import CATEGORY, FinetunedPairSocket

FOLDER = "diffusion_models"
FINETUNED = "finetuned_model"


def _weight_dtypes() -> list[str]:
    """UNETLoader's weight dtype choices, read from it so that they stay the same."""
    return list(comfy_nodes.UNETLoader.INPUT_TYPES()["required"]["weight_dtype"][0])


class LoadDiffusionModelPair(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="PG_LoadDiffusionModelPair",
            display_name="Personalization Diffusion Model Pair Loader",
            category=CATEGORY,
            search_aliases=["load diffusion model pair", "load diffusion model", "UNET loader", "Flux", "Qwen-Image",
                            "Wan", "Z-Image", "video"],
            description=(
                "Loads a base diffusion model (diffusion_models folder, as Load Diffusion Model does) and its "
                "personalization, a LoRA or a fine-tuned diffusion model, as a pair for personalization guidance. "
                "For Flux.2, Qwen-Image, Wan, Z-Image and the other models that ship without text encoder and VAE."
            ),
            inputs=[
                io.Combo.Input("base_model", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="The pre-trained diffusion model the personalization was trained from."),
                io.Combo.Input("weight_dtype", options=_weight_dtypes(), default="default",
                               tooltip="As Load Diffusion Model: the dtype the weights are kept in (fp8 halves the "
                               "memory). Both models of the pair are loaded with it; default keeps the file's."),
                personalization_input(FOLDER, finetuned_id=FINETUNED, finetuned_label="fine-tuned diffusion model"),
            ],
            outputs=[
                FinetunedPairSocket.Output("pair", tooltip="Base and fine-tuned weights, for the Personalization Weak "
                                           "Model (or a preset)."),
                io.Model.Output("finetuned_model", tooltip="The fine-tuned MODEL: sample with this one."),
            ],
        )

    @classmethod
    def execute(
        cls,
        base_model: str,
        weight_dtype: str,
        personalization: dict | str,
        lora_name: str | None = None,
        lora_strength: float = 1.0,
        finetuned_model: str | None = None,
        full_delta: str = "exact",
        rank: int = 128,
        energy: float = 1.0,
    ) -> io.NodeOutput:
        """``personalization`` as ComfyUI passes it (see ``personalization_of``); Python callers may pass the mode's
        name and its inputs as keywords."""
        chosen = personalization_of(personalization, lora_name=lora_name, lora_strength=lora_strength,
                                    finetuned_model=finetuned_model, full_delta=full_delta, rank=rank, energy=energy)
        pair, _ = load_pair(chosen, base_model, FOLDER, FINETUNED,
                            lambda name: comfy_nodes.UNETLoader().load_unet(name, weight_dtype))
        return io.NodeOutput(pair, pair.finetuned)
