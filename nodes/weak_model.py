"""Weak Model Interpolator: omega, and its schedule over the run."""

from __future__ import annotations

from comfy_api.latest import io

from ..guidance import OmegaSchedule, OmegaShape, check_unit_interval
from .core.runtime import WeakModel
from .sockets import CATEGORY, FinetunedPairSocket, WeakModelSocket


class WeakModelInterpolator(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PG_WeakModelInterpolator",
            display_name="Weak Model Interpolator",
            category=CATEGORY,
            description=(
                "The weak model theta_pre + omega * (theta_ft - theta_pre): omega = 1 is the fine-tuned model, "
                "omega = 0 the base. For a LoRA pair it is the LoRA at strength omega * s. Nothing is loaded or "
                "copied: the guidance applies it while sampling."
            ),
            inputs=[
                FinetunedPairSocket.Input(
                    "pair", tooltip="From Load Fine-tuned Pair or Fine-tuned Pair from Models: base and fine-tuned weights."
                ),
                io.Combo.Input(
                    "schedule",
                    options=OmegaShape,
                    default=OmegaShape.CONSTANT,
                    tooltip="How omega moves inside the guidance interval: constant (omega), or linear / cosine "
                    "from omega to omega_end.",
                ),
                io.Float.Input(
                    "omega",
                    default=0.5,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="How much of the personalization the weak model keeps. 1 makes the weak model the "
                    "fine-tuned model (plain CFG, no personalization guidance); 0 makes it the base model.",
                ),
                io.Float.Input(
                    "omega_end",
                    default=0.5,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="omega at the end of the guidance interval, for the linear and cosine schedules "
                    "(ignored by constant).",
                ),
                io.Float.Input(
                    "guidance_start",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Sampling progress (0 = first step, 1 = last) where the weak model starts to differ "
                    "from the fine-tuned model. Before it, plain CFG. 0 guides from the first step.",
                ),
                io.Float.Input(
                    "guidance_end",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Sampling progress where personalization guidance stops; after it, plain CFG. "
                    "1 guides to the last step.",
                ),
            ],
            outputs=[WeakModelSocket.Output("weak_model", tooltip="For the Personalization Guider or the KSampler patch.")],
        )

    @classmethod
    def validate_inputs(cls, guidance_start: float, guidance_end: float) -> bool | str:
        # Naming inputs here turns off ComfyUI's own range checks for them, so this checks them too.
        for name, value in (("guidance_start", guidance_start), ("guidance_end", guidance_end)):
            if not 0.0 <= value <= 1.0:
                return f"{name} must be between 0 and 1, got {value!r}."
        if guidance_start > guidance_end:
            return f"guidance_start ({guidance_start:g}) must not be after guidance_end ({guidance_end:g})."
        return True

    @classmethod
    def execute(cls, pair, schedule: str, omega: float, omega_end: float, guidance_start: float, guidance_end: float) -> io.NodeOutput:
        for name, value in (("omega", omega), ("omega_end", omega_end),
                            ("guidance_start", guidance_start), ("guidance_end", guidance_end)):
            check_unit_interval(name, value)  # named as the widgets are
        shape = OmegaShape(schedule)
        end = omega if shape == OmegaShape.CONSTANT else omega_end
        return io.NodeOutput(WeakModel(pair, OmegaSchedule(shape, omega, end, guidance_start, guidance_end)))
