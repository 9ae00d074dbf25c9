"""PG Load Preset and PG Save Preset: named omega schedules and scales, as small JSON files.

Load turns a preset into what the guider needs: a weak model of the pair with the
preset's omega schedule, and the estimate and scales to wire into the guider's
widgets. Save writes the values on its widgets as a preset in ComfyUI's user
folder. Files are parsed and validated (``guidance.presets``), never evaluated.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..guidance import GuidanceInputError, Preset, check_preset_name
from .core import preset_store
from .core.runtime import Estimate, WeakModel
from .inputs import estimate_input, personalization_scale_input
from .sockets import FinetunedPairSocket, WeakModelSocket
from .tuning_inputs import TUNING_CATEGORY, guidance_scale_input, schedule_inputs

DEFAULT_PRESET = "sd15_lora"


class LoadPreset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        names = list(preset_store.available())  # read again whenever ComfyUI asks for the node definitions
        return io.Schema(
            node_id="PG_LoadPreset",
            display_name="PG Load Preset",
            category=TUNING_CATEGORY,
            description=(
                "A named preset as a weak model (the pair with the preset's omega schedule, as the Weak Model "
                "Interpolator makes it) and the estimate and scales for the Personalization Guider. Lists the pack's "
                "starting points (sd15_lora, sdxl_lora, sd15_dreambooth) and your saved presets."
            ),
            inputs=[
                FinetunedPairSocket.Input("pair", tooltip="From Load Fine-tuned Pair: the weak model is made from it."),
                io.Combo.Input(
                    "preset",
                    options=names,
                    default=DEFAULT_PRESET if DEFAULT_PRESET in names else None,
                    tooltip="The pack's starting points, then yours (ComfyUI/user/personalization_guidance/presets). "
                    "A newly saved preset appears after refreshing the node definitions (press R).",
                ),
            ],
            outputs=[
                WeakModelSocket.Output("weak_model", tooltip="For the Personalization Guider or the KSampler patch."),
                io.Combo.Output("estimate", options=[e.value for e in Estimate],
                                tooltip="The preset's estimate: connect to the guider's estimate."),
                io.Float.Output("guidance_scale", tooltip="lambda (lambda_t in three-way): connect to the guider's "
                                "guidance_scale or the KSampler's cfg."),
                io.Float.Output("personalization_scale", tooltip="lambda_p (three-way): connect to the guider's "
                                "personalization_scale."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, preset: str) -> str:
        return preset_store.fingerprint(preset)

    @classmethod
    def execute(cls, pair, preset: str) -> io.NodeOutput:
        settings = preset_store.read(preset)
        estimate = preset_store.ESTIMATE_OF_PRESET[settings.estimate]
        return io.NodeOutput(WeakModel(pair, settings.omega_schedule()), estimate.value,
                             settings.guidance_scale, settings.personalization_scale)


class SavePreset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PG_SavePreset",
            display_name="PG Save Preset",
            category=TUNING_CATEGORY,
            description=(
                "Saves the values on its widgets as a named preset: ComfyUI/user/personalization_guidance/presets/"
                "<name>.json, which PG Load Preset lists. The schedule widgets are the Weak Model Interpolator's, the "
                "estimate and scales the Personalization Guider's."
            ),
            inputs=[
                io.String.Input(
                    "name",
                    default="my_preset",
                    tooltip="The preset's name and file name: 1 to 64 letters, digits, spaces, '-' or '_'. The pack's "
                    "own presets' names are taken.",
                ),
                io.String.Input(
                    "description",
                    default="",
                    multiline=True,
                    tooltip="What the preset is for (kept in the file; optional).",
                ),
                *schedule_inputs(),
                estimate_input(),
                guidance_scale_input(),
                personalization_scale_input(),
                io.Boolean.Input(
                    "overwrite",
                    default=False,
                    tooltip="Off refuses to replace a saved preset of the same name; on replaces it.",
                ),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, name: str, guidance_start: float, guidance_end: float) -> bool | str:
        # Naming guidance_start and guidance_end here turns off ComfyUI's range check for them: Preset does it.
        if name is not None:
            try:
                check_preset_name(name.strip())
            except GuidanceInputError as error:
                return str(error)
            if name.strip() in preset_store.shipped():
                return f"{name.strip()!r} is a shipped preset, which stays as it is: save under another name."
        if guidance_start is not None and guidance_end is not None and guidance_start > guidance_end:
            return f"guidance_start ({guidance_start:g}) must not be after guidance_end ({guidance_end:g})."
        return True

    @classmethod
    def execute(
        cls,
        name: str,
        description: str,
        schedule: str,
        omega: float,
        omega_end: float,
        guidance_start: float,
        guidance_end: float,
        estimate: str,
        guidance_scale: float,
        personalization_scale: float,
        overwrite: bool,
    ) -> io.NodeOutput:
        preset = Preset(
            name=name.strip(),
            description=description.strip(),
            schedule=schedule,
            omega=omega,
            omega_end=omega_end,
            guidance_start=guidance_start,
            guidance_end=guidance_end,
            estimate=preset_store.PRESET_OF_ESTIMATE[Estimate(estimate)],
            guidance_scale=guidance_scale,
            personalization_scale=personalization_scale,
        )
        preset_store.write(preset, overwrite)
        return io.NodeOutput()
