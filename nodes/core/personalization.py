"""The personalization input of the pair loaders: a LoRA and its strength, or a fine-tuned model file.

One DynamicCombo (``modes.py``): in LoRA mode the node shows ``lora_name`` and
``lora_strength``, in fine-tuned mode the fine-tuned file, so neither mode shows
a widget that it ignores and ComfyUI checks the shown file names against their
folders when the workflow is queued. Every loader of a base and its
personalization builds it with ``personalization_input`` and reads it with
``personalization_of``; ``check_not_the_base`` refuses a base given as its own
fine-tune before anything is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from enum import Enum

import comfy.utils
import folder_paths
from comfy_api.latest import io

from ...guidance import GuidanceInputError
from .modes import Mode, mode_input
from .pairs import load_lora_pair

PERSONALIZATION = "personalization"


class Personalization(str, Enum):
    LORA = "LoRA"
    FINETUNED = "fine-tuned checkpoint"


def personalization_input(
    finetuned_folder: str,
    finetuned_id: str = "finetuned_checkpoint",
    finetuned_label: str = "fine-tuned checkpoint",
    lora_folder: str = "loras",
    finetuned_extra: Sequence[io.Input] = (),
) -> io.DynamicCombo.Input:
    """LoRA mode: a LoRA from ``lora_folder`` and its strength. Fine-tuned mode: ``finetuned_id`` from ``finetuned_folder``,
    and ``finetuned_extra`` (the full pair's options).

    The option keys stay "LoRA" and "fine-tuned checkpoint" for every loader, so that workflows read the same.
    """
    return mode_input(
        PERSONALIZATION,
        {
            Personalization.LORA: [
                io.Combo.Input(
                    "lora_name",
                    options=folder_paths.get_filename_list(lora_folder),
                    tooltip="The personalization LoRA, trained on the base.",
                ),
                io.Float.Input(
                    "lora_strength",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.01,
                    tooltip="Strength s of the LoRA on the model (and CLIP): the fine-tuned model. The weak model "
                    "uses omega * s. 0 turns the LoRA off, and with it personalization guidance (plain CFG).",
                ),
            ],
            Personalization.FINETUNED: [
                io.Combo.Input(
                    finetuned_id,
                    options=folder_paths.get_filename_list(finetuned_folder),
                    tooltip=f"The {finetuned_label}: a full (DreamBooth) fine-tune of the base, of the same "
                    "architecture. Not the base itself: that pair has no personalization.",
                ),
                *finetuned_extra,
            ],
        },
        tooltip="What personalizes the base: a LoRA file (LoRA; shows lora_name and lora_strength) or a "
        f"{finetuned_label} (shows {finetuned_id}).",
    )


def personalization_of(value: dict | str, **flat) -> Mode[Personalization]:
    """The mode and its inputs, from ComfyUI's value of the input, or from a mode name and keyword inputs."""
    return Mode.of(Personalization, PERSONALIZATION, value, **flat)


def check_not_the_base(folder: str, base: str, finetuned: str) -> None:
    """Refuse a fine-tuned file that is the base file itself: the pair would have no personalization (a zero delta)."""
    same = finetuned == base
    if not same:
        base_path = folder_paths.get_full_path(folder, base)
        finetuned_path = folder_paths.get_full_path(folder, finetuned)
        same = bool(base_path and finetuned_path) and os.path.samefile(base_path, finetuned_path)
    if same:
        raise GuidanceInputError(
            f"The fine-tuned file is the base itself ({finetuned}): the pair would have no personalization and "
            "guidance would be plain CFG. Choose the fine-tune in the personalization's file list."
        )


def lora_pair(chosen: Mode[Personalization], model, clip=None):
    """The LoRA mode's pair: the chosen LoRA file on ``model`` (and ``clip``, when there is one) at the chosen
    strength. Returns (pair, fine-tuned CLIP or None)."""
    name = chosen["lora_name"]
    lora = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", name), safe_load=True)
    return load_lora_pair(model, clip, lora, chosen["lora_strength"], name)
