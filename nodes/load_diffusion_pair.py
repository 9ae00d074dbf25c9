"""Load Fine-tuned Diffusion Model Pair: a base diffusion-model file and its LoRA or fine-tuned file.

Diffusion transformers (Flux.2, Qwen-Image, Wan, ...) ship as separate diffusion-model,
text-encoder and VAE files. This loader takes the diffusion models from ComfyUI's
``diffusion_models`` folder, loaded by ComfyUI's own UNETLoader with the weight dtype it
offers; the text encoder and VAE come from their own loaders.
"""

from __future__ import annotations

import comfy.utils
import folder_paths
import nodes as comfy_nodes  # ComfyUI's nodes.py (UNETLoader), not this pack's package
from comfy_api.latest import io

from .core.pairs import load_lora_pair, pair_from_models
from .inputs import low_rank_inputs, low_rank_spec
from .load_pair import NONE, Personalization
from .sockets import CATEGORY, FinetunedPairSocket

FOLDER = "diffusion_models"


def _weight_dtypes() -> list[str]:
    """UNETLoader's weight dtype choices, read from it so that they stay the same."""
    return list(comfy_nodes.UNETLoader.INPUT_TYPES()["required"]["weight_dtype"][0])


class LoadDiffusionModelPair(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PG_LoadDiffusionModelPair",
            display_name="Load Fine-tuned Diffusion Model Pair",
            category=CATEGORY,
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
                               "memory). Both models of the pair are loaded with it."),
                io.Combo.Input("personalization", options=Personalization, default=Personalization.LORA,
                               tooltip="LoRA: a LoRA file applied to the base. Fine-tuned model: a full fine-tune "
                               "(DreamBooth) of the base, in the diffusion_models folder."),
                io.Combo.Input("lora_name", options=[NONE] + folder_paths.get_filename_list("loras"), default=NONE,
                               tooltip="The personalization LoRA (when personalization is LoRA)."),
                io.Float.Input("lora_strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength s of the LoRA: the fine-tuned model. The weak model uses omega * s. "
                               "0 turns the LoRA off."),
                io.Combo.Input("finetuned_model", options=[NONE] + folder_paths.get_filename_list(FOLDER), default=NONE,
                               tooltip="The fine-tuned diffusion model (when personalization is a fine-tuned model)."),
                *low_rank_inputs(),
            ],
            outputs=[
                FinetunedPairSocket.Output("pair", tooltip="Base and fine-tuned weights, for the Weak Model Interpolator."),
                io.Model.Output("finetuned_model", tooltip="The fine-tuned MODEL: sample with this one."),
            ],
        )

    @classmethod
    def validate_inputs(cls, personalization: str, lora_name: str, finetuned_model: str) -> bool | str:
        # Naming inputs here turns off ComfyUI's own option checks for them, so this checks them all.
        if personalization not in [p.value for p in Personalization]:
            return f"Unknown personalization {personalization!r}."
        if lora_name != NONE and lora_name not in folder_paths.get_filename_list("loras"):
            return f"LoRA not found in the loras folder: {lora_name}"
        if finetuned_model != NONE and finetuned_model not in folder_paths.get_filename_list(FOLDER):
            return f"Diffusion model not found in the {FOLDER} folder: {finetuned_model}"
        if personalization == Personalization.LORA.value and lora_name == NONE:
            return "Personalization is LoRA: choose a lora_name."
        if personalization == Personalization.CHECKPOINT.value and finetuned_model == NONE:
            return "Personalization is a fine-tuned model: choose a finetuned_model."
        return True

    @classmethod
    def execute(cls, base_model: str, weight_dtype: str, personalization: str, lora_name: str, lora_strength: float,
                finetuned_model: str, full_delta: str, rank: int, energy: float) -> io.NodeOutput:
        base = comfy_nodes.UNETLoader().load_unet(base_model, weight_dtype)[0]
        if Personalization(personalization) == Personalization.LORA:
            lora = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", lora_name), safe_load=True)
            pair, _ = load_lora_pair(base, None, lora, lora_strength, lora_name)
            return io.NodeOutput(pair, pair.finetuned)
        finetuned = comfy_nodes.UNETLoader().load_unet(finetuned_model, weight_dtype)[0]
        return io.NodeOutput(pair_from_models(base, finetuned, low_rank_spec(full_delta, rank, energy)), finetuned)
