"""The personalization of a pair, as the loaders take it: a LoRA file and its strength, or a fine-tuned model file
with its ``full_delta`` option (exact, or low rank with a rank and an energy).

One DynamicCombo (``modes.py``): in LoRA mode the node shows ``lora_name`` and
``lora_strength``, in fine-tuned mode the fine-tuned file and ``full_delta``, so neither
mode shows a widget that it ignores and ComfyUI checks the shown file names against their
folders when the workflow is queued. Every loader of a base and its personalization builds
the input with ``personalization_input`` and forms its pair with ``load_pair``, giving it
the function that loads one of its files; ``full_delta_input`` and ``low_rank_spec`` serve
PG Pair from Models too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any

import comfy.utils
import folder_paths
from comfy_api.latest import io

from ...guidance import GuidanceInputError
from .full_pairs import pair_from_models
from .lora_pairs import load_lora_pair
from .modes import Mode, mode_input
from .pairs import DEFAULT_RANK, FinetunedPair, LowRankSpec

PERSONALIZATION = "personalization"


class Personalization(str, Enum):
    LORA = "LoRA"
    FINETUNED = "fine-tuned checkpoint"


def personalization_input(
    finetuned_folder: str,
    finetuned_id: str = "finetuned_checkpoint",
    finetuned_label: str = "fine-tuned checkpoint",
    lora_folder: str = "loras",
) -> io.DynamicCombo.Input:
    """LoRA mode: a LoRA from ``lora_folder`` and its strength. Fine-tuned mode: ``finetuned_id`` from
    ``finetuned_folder``, and the full pair's ``full_delta`` option.

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
                    "uses omega * s (LoRA, LoCon, LoHa, LoKr, DoRA, GLoRA, .diff). OFT and BOFT, which ComfyUI applies "
                    "non-linearly in s, get the weight interpolation base + omega * (fine-tuned - base): for OFT "
                    "the adapter at s * sqrt(omega). 0 leaves nothing to personalize and is refused.",
                ),
            ],
            Personalization.FINETUNED: [
                io.Combo.Input(
                    finetuned_id,
                    options=folder_paths.get_filename_list(finetuned_folder),
                    tooltip=f"The {finetuned_label}: a full (DreamBooth) fine-tune of the base, of the same "
                    "architecture. Not the base itself: that pair has no personalization.",
                ),
                full_delta_input(),
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


def load_pair(chosen: Mode[Personalization], base: str, folder: str, finetuned_id: str,
              load: Callable[[str], tuple]) -> tuple[FinetunedPair, tuple]:
    """The pair of a loader's personalization, and what else its fine-tuned file gives (CLIP, VAE).

    ``load(name)`` loads one file of ``folder`` as the node loads it and returns ``(MODEL, *others)``: a checkpoint
    loader gives (MODEL, CLIP, VAE), a diffusion-model loader (MODEL,). In LoRA mode the LoRA goes on the base (and
    its CLIP, when there is one); the others are the base's, with the fine-tuned CLIP. In fine-tuned mode the pair
    is formed from both files (a base given as its own fine-tune is refused before either loads); the others are
    the fine-tuned file's.
    """
    if chosen.key == Personalization.LORA:
        model, *others = load(base)
        pair, ft_clip = lora_pair(chosen, model, others[0] if others else None)
        return pair, (ft_clip, *others[1:]) if others else ()
    finetuned = chosen[finetuned_id]
    check_not_the_base(folder, base, finetuned)
    base_model = load(base)[0]
    ft_model, *others = load(finetuned)
    low_rank = low_rank_spec(chosen["full_delta"], rank=chosen.get("rank"), energy=chosen.get("energy"))
    return pair_from_models(base_model, ft_model, low_rank), tuple(others)


class FullDelta(str, Enum):
    """How a full pair keeps theta_ft - theta_pre."""

    EXACT = "exact"
    LOW_RANK = "low rank"


FULL_DELTA = "full_delta"


def full_delta_input() -> io.DynamicCombo.Input:
    """A full pair's delta kept exactly, or as a truncated SVD per Linear/Conv weight (less memory, approximate)."""
    return mode_input(
        FULL_DELTA,
        {
            FullDelta.EXACT: [],
            FullDelta.LOW_RANK: [
                io.Int.Input(
                    "rank",
                    default=DEFAULT_RANK,
                    min=0,
                    max=4096,
                    tooltip="At most this many singular values per layer (0: no cap, energy alone decides). Higher "
                    "is closer to exact, and larger.",
                ),
                io.Float.Input(
                    "energy",
                    default=1.0,
                    min=0.5,
                    max=1.0,
                    step=0.001,
                    tooltip="Keep the fewest singular values that hold this fraction of each layer's delta (its "
                    "squared norm). 1 keeps all of them up to the rank.",
                ),
            ],
        },
        tooltip="Full fine-tunes only (a LoRA is low-rank already). exact: the whole weight delta, as large as the "
        "model (two weight sets while sampling). low rank (shows rank and energy): each Linear/Conv weight delta "
        "kept as its truncated SVD, a fraction of the memory; an approximation, whose error the log reports.",
    )


def low_rank_spec(full_delta: Mapping[str, Any] | str | None, **flat) -> LowRankSpec | None:
    """The low-rank option as pair formation takes it (None: exact), from ComfyUI's value of ``full_delta`` or from
    a name with ``rank`` and ``energy`` as keywords."""
    chosen = Mode.of(FullDelta, FULL_DELTA, full_delta or FullDelta.EXACT, **flat)
    if chosen.key == FullDelta.EXACT:
        return None
    return LowRankSpec(rank=chosen.get("rank", DEFAULT_RANK), energy=chosen.get("energy", 1.0))
