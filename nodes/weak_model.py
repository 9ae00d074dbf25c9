"""Personalization Weak Model (the weak model interpolator): omega, its schedule over the run, and omega per block."""

from __future__ import annotations

from comfy_api.latest import io

from ..guidance import BlockPreset, BlockSpec, GuidanceInputError, OmegaSchedule, OmegaShape, check_unit_interval
from ..guidance.blocks import FACTOR_NAMES
from .core.modes import Mode, mode_input
from .core.schema import node_schema
from .core.vocabulary import WeakModel
from .sockets import CATEGORY, FinetunedPairSocket, WeakModelSocket

SCHEDULE = "schedule"
PER_BLOCK = "per_block"
# What each factor widget scales, for its tooltip.
_BLOCK_TIPS = {
    "input_blocks": "the UNet's input (down) blocks",
    "middle_block": "the UNet's middle block",
    "output_blocks": "the UNet's output (up) blocks",
    "double_blocks": "the double-stream blocks (double_blocks; HiDream: double_stream_blocks)",
    "single_blocks": "the single-stream blocks (single_blocks; HiDream: single_stream_blocks)",
    "early": "the first third of the model's blocks (its main stacks in the order it runs them)",
    "middle": "the middle third of the model's blocks",
    "late": "the last third of the model's blocks",
}
FREE_FORM_DEFAULT = "# glob = factor, one per line; the last matching line wins; layers no line matches: 1\n* = 1\n"


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
    """guidance_start and guidance_end: sampling progress on the model's full noise scale, 0 = pure noise, 1 = the
    end (as ComfyUI's timestep ranges read it: at denoise < 1 the first step is already past 0)."""
    scale = ("Read on the model's full noise scale, as ComfyUI's timestep ranges are: at denoise 1 the first step is "
             "at 0; at denoise 0.6 (img2img) the first step is at about 0.4, so an interval that ends before "
             "it guides no step (the log warns).")
    return [
        _unit_interval("Sampling progress (0 = pure noise, 1 = the end) where the weak model starts to differ from the "
               f"fine-tuned model. Before it, plain CFG. 0 guides from the first step. {scale}", default=0.0,
               id="guidance_start"),
        _unit_interval("Sampling progress where personalization guidance stops; after it, plain CFG. 1 guides to the last "
               f"step. Not before guidance_start. {scale}", default=1.0, id="guidance_end"),
    ]


def _factor(name: str) -> io.Float.Input:
    return io.Float.Input(name, default=1.0, min=0.0, max=1.0, step=0.05, tooltip=(
        f"How much of the unlearning reaches {_BLOCK_TIPS[name]}: their omega is 1 - factor * (1 - omega). 1: the "
        "run's omega (1 everywhere = per_block off); 0: these blocks keep the subject (the weak model is the "
        "fine-tuned model there: the guidance does not push on them)."))


def per_block_input() -> io.DynamicCombo.Input:
    """Omega per block: off, a preset with one factor per block, or the free form (docs/design.md, "Omega per block")."""
    options = {BlockPreset.OFF: []}
    options.update({preset: [_factor(name) for name in names] for preset, names in FACTOR_NAMES.items()})
    options[BlockPreset.FREE] = [io.String.Input(
        "factors", default=FREE_FORM_DEFAULT, multiline=True,
        tooltip="One 'glob = factor' per line (or separated by ';'), matched against each changed layer's path in the "
        "diffusion model (e.g. double_blocks.* = 0.5, output_blocks.1 = 0, *attn* = 0.3); a glob also matches "
        "everything below the module it names; the last matching line wins; layers no line matches take 1. Factors "
        "as on the presets: 1 = the run's omega, 0 = the layer keeps the subject. '#' starts a comment.")]
    return mode_input(
        PER_BLOCK, options,
        tooltip="Omega per block: scale how much each block of the model forgets the subject, e.g. push the guidance "
        "on identity while leaving composition to the prompt. A block's omega is 1 - factor * (1 - omega): 1 = the "
        "run's omega, 0 = the block keeps the subject. off (the default) = one omega for every layer. Presets: the "
        "UNet's input / middle / output blocks (SD1.5, SDXL); double / single stream blocks (Flux, Flux.2, Chroma, "
        "HunyuanVideo, HiDream); thirds of depth (any model with a stack of blocks); or the free form.",
    )


def blocks_of(per_block: dict | str | None) -> BlockSpec | None:
    """The BlockSpec of the per_block widgets (ComfyUI's dict, or "off"); None when off."""
    if per_block is None:
        return None
    chosen = Mode.of(BlockPreset, PER_BLOCK, per_block)
    if chosen.key == BlockPreset.OFF:
        return None
    if chosen.key == BlockPreset.FREE:
        return BlockSpec(BlockPreset.FREE, text=chosen.get("factors", ""))
    names = FACTOR_NAMES[chosen.key]
    missing = [name for name in names if chosen.get(name) is None]
    if missing:
        raise GuidanceInputError(f"per_block {chosen.key.value!r} needs {', '.join(names)}; missing {', '.join(missing)}.")
    return BlockSpec(chosen.key, tuple(float(chosen[name]) for name in names))


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
                "a guidance interval, and per block (per_block)."
            ),
            inputs=[
                FinetunedPairSocket.Input(
                    "pair", tooltip="From the Personalization Pair Loader or Pair from Models: base and fine-tuned weights."
                ),
                schedule_input(),
                *interval_inputs(),
                per_block_input(),
            ],
            outputs=[WeakModelSocket.Output("weak_model", tooltip="For the Personalization Guider or the KSampler patch.")],
        )

    @classmethod
    def validate_inputs(cls, guidance_start: float, guidance_end: float, *, schedule=None, per_block=None) -> bool | str:
        # See core/modes.py on the keyword-only parameters: they take the combos that ComfyUI passes regardless. Their
        # children arrive as None here, so the free form is checked when the node runs (its message names the line);
        # ComfyUI checks the factors' range itself.
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
        per_block: dict | str = BlockPreset.OFF.value,
    ) -> io.NodeOutput:
        """``schedule`` and ``per_block`` as ComfyUI passes them; Python callers may pass the shape's name and
        ``omega``/``omega_end``, and ``per_block`` as "off" or as ComfyUI's dict (``{"per_block": "free form",
        "factors": "..."}``)."""
        weak = schedule_of(schedule, guidance_start, guidance_end, omega=omega, omega_end=omega_end)
        model = WeakModel(pair, weak, blocks_of(per_block))
        _ = model.factors  # a per-block setting that fits no changed layer of the pair is refused here
        return io.NodeOutput(model)
