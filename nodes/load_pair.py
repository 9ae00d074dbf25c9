"""Load Fine-tuned Pair: a base checkpoint and its personalization, a LoRA or a fine-tuned checkpoint."""

from __future__ import annotations

from enum import Enum

import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io

from .core.pairs import load_lora_pair, pair_from_models
from .inputs import low_rank_inputs, low_rank_spec
from .sockets import CATEGORY, FinetunedPairSocket

NONE = "none"


class Personalization(str, Enum):
    LORA = "LoRA"
    CHECKPOINT = "fine-tuned checkpoint"


def _checkpoint(name: str):
    path = folder_paths.get_full_path_or_raise("checkpoints", name)
    return comfy.sd.load_checkpoint_guess_config(
        path, output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings")
    )[:3]


class LoadFinetunedPair(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PG_LoadFinetunedPair",
            display_name="Load Fine-tuned Pair",
            category=CATEGORY,
            description=(
                "Loads a base checkpoint and its personalization (a LoRA, or a DreamBooth-style fine-tuned "
                "checkpoint) as a pair for personalization guidance, plus the fine-tuned MODEL, CLIP and VAE."
            ),
            inputs=[
                io.Combo.Input(
                    "base_checkpoint",
                    options=folder_paths.get_filename_list("checkpoints"),
                    tooltip="The pre-trained checkpoint the personalization was trained from.",
                ),
                io.Combo.Input(
                    "personalization",
                    options=Personalization,
                    default=Personalization.LORA,
                    tooltip="LoRA: a LoRA file applied to the base. Fine-tuned checkpoint: a full fine-tune "
                    "(DreamBooth) of the base.",
                ),
                io.Combo.Input(
                    "lora_name",
                    options=[NONE] + folder_paths.get_filename_list("loras"),
                    default=NONE,
                    tooltip="The personalization LoRA (when personalization is LoRA).",
                ),
                io.Float.Input(
                    "lora_strength",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.01,
                    tooltip="Strength s of the LoRA on the model and CLIP: the fine-tuned model. The weak model "
                    "uses omega * s. 0 turns the LoRA off.",
                ),
                io.Combo.Input(
                    "finetuned_checkpoint",
                    options=[NONE] + folder_paths.get_filename_list("checkpoints"),
                    default=NONE,
                    tooltip="The fine-tuned checkpoint (when personalization is fine-tuned checkpoint). Its CLIP "
                    "and VAE are the ones output.",
                ),
            ],
            outputs=[
                FinetunedPairSocket.Output("pair", tooltip="Base and fine-tuned weights, for the Weak Model Interpolator."),
                io.Model.Output("finetuned_model", tooltip="The fine-tuned MODEL: sample with this one."),
                io.Clip.Output("clip", tooltip="The fine-tuned CLIP: encode the prompt and the empty null prompt."),
                io.Vae.Output("vae", tooltip="The VAE of the checkpoint the fine-tuned model came from."),
            ],
        )

    @classmethod
    def validate_inputs(cls, personalization: str, lora_name: str, finetuned_checkpoint: str) -> bool | str:
        # Naming inputs here turns off ComfyUI's own option checks for them, so this checks them all.
        if personalization not in [p.value for p in Personalization]:
            return f"Unknown personalization {personalization!r}."
        if lora_name != NONE and lora_name not in folder_paths.get_filename_list("loras"):
            return f"LoRA not found in the loras folder: {lora_name}"
        if finetuned_checkpoint != NONE and finetuned_checkpoint not in folder_paths.get_filename_list("checkpoints"):
            return f"Checkpoint not found in the checkpoints folder: {finetuned_checkpoint}"
        if personalization == Personalization.LORA.value and lora_name == NONE:
            return "Personalization is LoRA: choose a lora_name."
        if personalization == Personalization.CHECKPOINT.value and finetuned_checkpoint == NONE:
            return "Personalization is a fine-tuned checkpoint: choose a finetuned_checkpoint."
        return True

    @classmethod
    def execute(
        cls,
        base_checkpoint: str,
        personalization: str,
        lora_name: str,
        lora_strength: float,
        finetuned_checkpoint: str,
    ) -> io.NodeOutput:
        if Personalization(personalization) == Personalization.LORA:
            model, clip, vae = _checkpoint(base_checkpoint)
            lora = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", lora_name), safe_load=True)
            pair, ft_clip = load_lora_pair(model, clip, lora, lora_strength, lora_name)
            return io.NodeOutput(pair, pair.finetuned, ft_clip, vae)
        base_model = _checkpoint(base_checkpoint)[0]
        ft_model, ft_clip, ft_vae = _checkpoint(finetuned_checkpoint)
        return io.NodeOutput(pair_from_models(base_model, ft_model), ft_model, ft_clip, ft_vae)


class PairFromModels(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PG_PairFromModels",
            display_name="Fine-tuned Pair from Models",
            category=CATEGORY,
            description=(
                "Forms a pair from MODELs that other loaders produced: the base, and the fine-tuned model (the "
                "base with a LoRA applied, or a separately loaded fine-tune of it)."
            ),
            inputs=[
                io.Model.Input("base_model", tooltip="The pre-trained MODEL."),
                io.Model.Input(
                    "finetuned_model",
                    tooltip="The personalized MODEL: base_model after a LoRA loader, or a fine-tuned checkpoint of "
                    "the same architecture.",
                ),
                *low_rank_inputs(),
            ],
            outputs=[
                FinetunedPairSocket.Output("pair", tooltip="Base and fine-tuned weights, for the Weak Model Interpolator."),
                io.Model.Output("finetuned_model", tooltip="The fine-tuned MODEL, passed through."),
            ],
        )

    @classmethod
    def execute(cls, base_model, finetuned_model, full_delta: str = "exact", rank: int = 128,
                energy: float = 1.0) -> io.NodeOutput:
        return io.NodeOutput(pair_from_models(base_model, finetuned_model, low_rank_spec(full_delta, rank, energy)),
                             finetuned_model)
