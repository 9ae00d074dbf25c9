"""The pair loaders: a base checkpoint and its personalization (a LoRA or a fine-tuned checkpoint), or two MODELs."""

from __future__ import annotations

import comfy.sd
import folder_paths
from comfy_api.latest import io

from .core.full_pairs import pair_from_models
from .core.personalization import full_delta_input, load_pair, low_rank_spec, personalization_input, personalization_of
from .core.schema import node_schema
from .sockets import CATEGORY, FinetunedPairSocket


def _checkpoint(name: str):
    path = folder_paths.get_full_path_or_raise("checkpoints", name)
    return comfy.sd.load_checkpoint_guess_config(
        path, output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings")
    )[:3]


class LoadFinetunedPair(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="PG_LoadFinetunedPair",
            display_name="Personalization Pair Loader",
            category=CATEGORY,
            search_aliases=["load fine-tuned pair", "load checkpoint", "load LoRA", "base model", "pair loader"],
            description=(
                "Loads a base checkpoint and its personalization (a LoRA, or a DreamBooth-style fine-tuned "
                "checkpoint of it) as a pair for personalization guidance, and the fine-tuned MODEL, CLIP and VAE "
                "to sample with."
            ),
            inputs=[
                io.Combo.Input(
                    "base_checkpoint",
                    options=folder_paths.get_filename_list("checkpoints"),
                    tooltip="The pre-trained checkpoint the personalization was trained from.",
                ),
                personalization_input("checkpoints"),
            ],
            outputs=[
                FinetunedPairSocket.Output("pair", tooltip="Base and fine-tuned weights, for the Personalization Weak Model (or a preset)."),
                io.Model.Output("finetuned_model", tooltip="The fine-tuned MODEL: sample with this one."),
                io.Clip.Output("clip", tooltip="The fine-tuned CLIP: encode the prompt and the empty null prompt."),
                io.Vae.Output("vae", tooltip="The VAE of the checkpoint the fine-tuned model came from."),
            ],
        )

    @classmethod
    def execute(
        cls,
        base_checkpoint: str,
        personalization: dict | str,
        lora_name: str | None = None,
        lora_strength: float = 1.0,
        finetuned_checkpoint: str | None = None,
        full_delta: str = "exact",
        rank: int = 128,
        energy: float = 1.0,
    ) -> io.NodeOutput:
        """``personalization`` as ComfyUI passes it (see ``personalization_of``); Python callers may pass the mode's
        name and its inputs as keywords."""
        chosen = personalization_of(personalization, lora_name=lora_name, lora_strength=lora_strength,
                                    finetuned_checkpoint=finetuned_checkpoint, full_delta=full_delta, rank=rank,
                                    energy=energy)
        pair, (clip, vae) = load_pair(chosen, base_checkpoint, "checkpoints", "finetuned_checkpoint", _checkpoint)
        return io.NodeOutput(pair, pair.finetuned, clip, vae)


class PairFromModels(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="PG_PairFromModels",
            display_name="Personalization Pair from Models",
            category=CATEGORY,
            search_aliases=["fine-tuned pair from models", "pair from models", "base model", "LoRA loader"],
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
                full_delta_input(),
            ],
            outputs=[
                FinetunedPairSocket.Output("pair", tooltip="Base and fine-tuned weights, for the Personalization Weak Model (or a preset)."),
                io.Model.Output("finetuned_model", tooltip="The fine-tuned MODEL, passed through."),
            ],
        )

    @classmethod
    def execute(cls, base_model, finetuned_model, full_delta: dict | str = "exact", rank: int = 128,
                energy: float = 1.0) -> io.NodeOutput:
        """``full_delta`` as ComfyUI passes it, or its name with ``rank`` and ``energy`` (Python callers)."""
        low_rank = low_rank_spec(full_delta, rank=rank, energy=energy)
        return io.NodeOutput(pair_from_models(base_model, finetuned_model, low_rank), finetuned_model)
