"""Personalization Weak Model (the weak model interpolator): omega, and its schedule over the run."""

from __future__ import annotations

from comfy_api.latest import io

from ..guidance import OmegaSchedule, OmegaShape, check_unit_interval
from .core.modes import Mode, mode_input
from .core.schema import node_schema
from .core.vocabulary import WeakModel
from .sockets import CATEGORY, FinetunedPairSocket, WeakModelSocket

SCHEDULE = "schedule"


def _unit_interval(tooltip: str, default: float = 0.5, id: str = "omega") -> io.Float.Input:
    """A widget for a value in [0, 1]: omega, or sampling progress."""
    return io.Float.Input(id, default=default, min=0.0, max=1.0, step=0.01, tooltip=tooltip)


def schedule_input() -> io.DynamicCombo.Input:
    """The schedule and its omega values: constant shows omega alone, linear and cosine also omega_end."""
    omega = _unit_interval("How much of the personalization the weak model keeps (for linear and cosine: at the start of the "
                   "guidance interval). 1 makes the weak model the fine-tuned model (plain CFG, no personalization "
                   "guidance); 0 makes it the base model.")
    ramp = [omega, _unit_interval("omega at the end of the guidance interval: omega moves from omega to omega_end. 1 ends on "
                          "plain CFG.", default=1.0, id="omega_end")]
    return mode_input(
        SCHEDULE,
        {OmegaShape.CONSTANT: [omega], OmegaShape.LINEAR: ramp, OmegaShape.COSINE: ramp},
        tooltip="How omega moves inside the guidance interval: constant (one omega), or linear / cosine (an eased "
        "ramp) from omega to omega_end.",
    )


def interval_inputs() -> list[io.Float.Input]:
    """guidance_start and guidance_end: sampling progress, 0 = first step, 1 = the end."""
    return [
        _unit_interval("Sampling progress (0 = first step, 1 = last) where the weak model starts to differ from the "
               "fine-tuned model. Before it, plain CFG. 0 guides from the first step.", default=0.0,
               id="guidance_start"),
        _unit_interval("Sampling progress where personalization guidance stops; after it, plain CFG. 1 guides to the last "
               "step. Not before guidance_start.", default=1.0, id="guidance_end"),
    ]


def interval_problem(guidance_start: float | None, guidance_end: float | None) -> str | None:
    """What is wrong with the guidance interval's widgets, for ``validate_inputs`` (None: nothing, or linked)."""
    # Naming the two inputs in validate_inputs turns off ComfyUI's own range check for them: done here.
    for name, value in (("guidance_start", guidance_start), ("guidance_end", guidance_end)):
        if value is not None and not 0.0 <= value <= 1.0:
            return f"{name} must be between 0 and 1, got {value!r}."
    if guidance_start is not None and guidance_end is not None and guidance_start > guidance_end:
        return (f"The guidance interval is empty: guidance_start ({guidance_start:g}) must not be after "
                f"guidance_end ({guidance_end:g}).")
    return None


def schedule_of(schedule: dict | str, guidance_start: float, guidance_end: float, **flat) -> OmegaSchedule:
    """The OmegaSchedule of the widgets: ComfyUI's value of ``schedule``, or a shape name with omega/omega_end."""
    chosen = Mode.of(OmegaShape, SCHEDULE, schedule, **flat)
    omega = chosen["omega"]
    end = omega if chosen.key == OmegaShape.CONSTANT else chosen["omega_end"]
    for name, value in (("omega", omega), ("omega_end", end),
                        ("guidance_start", guidance_start), ("guidance_end", guidance_end)):
        check_unit_interval(name, value)  # named as the widgets are
    return OmegaSchedule(chosen.key, omega, end, guidance_start, guidance_end)


class WeakModelInterpolator(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="PG_WeakModelInterpolator",
            display_name="Personalization Weak Model",
            category=CATEGORY,
            search_aliases=["weak model interpolator", "omega", "unlearning", "interpolate weights", "schedule"],
            description=(
                "The weak model theta_pre + omega * (theta_ft - theta_pre): omega = 1 is the fine-tuned model, "
                "omega = 0 the base. For a LoRA pair it is the LoRA at strength omega * s. Nothing is loaded or "
                "copied: the guidance applies it while sampling. omega may move over the run (linear, cosine) inside "
                "a guidance interval."
            ),
            inputs=[
                FinetunedPairSocket.Input(
                    "pair", tooltip="From the Personalization Pair Loader or Pair from Models: base and fine-tuned weights."
                ),
                schedule_input(),
                *interval_inputs(),
            ],
            outputs=[WeakModelSocket.Output("weak_model", tooltip="For the Personalization Guider or the KSampler patch.")],
        )

    @classmethod
    def validate_inputs(cls, guidance_start: float, guidance_end: float, *, schedule=None) -> bool | str:
        # See core/modes.py on the keyword-only parameter: it takes the schedule that ComfyUI passes regardless.
        return interval_problem(guidance_start, guidance_end) or True

    @classmethod
    def execute(
        cls,
        pair,
        schedule: dict | str,
        omega: float | None = None,
        omega_end: float | None = None,
        guidance_start: float = 0.0,
        guidance_end: float = 1.0,
    ) -> io.NodeOutput:
        """``schedule`` as ComfyUI passes it; Python callers may pass the shape's name and ``omega``/``omega_end``."""
        weak = schedule_of(schedule, guidance_start, guidance_end, omega=omega, omega_end=omega_end)
        return io.NodeOutput(WeakModel(pair, weak))
