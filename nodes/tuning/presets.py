"""Personalization Preset Loader and Saver: named omega schedules and scales, as small JSON files.

Load turns a preset into what the guider needs: a weak model of the pair with the
preset's omega schedule, and the estimate and scales for the guider (the scales
can be linked to the guider's scale widgets). Save writes the values on its widgets as a preset in ComfyUI's user
folder. Files are parsed and validated (``guidance.presets``), never evaluated.
"""

from __future__ import annotations

from comfy_api.latest import io

from ...guidance import Preset
from ..core.schema import node_schema
from ..core.vocabulary import Estimate, WeakModel
from ..inputs import estimate_input, estimate_of, guidance_scale_input, personalization_scale_input
from ..sockets import TUNING_CATEGORY, FinetunedPairSocket, WeakModelSocket
from ..weak_model import interval_inputs, schedule_input, schedule_of
from . import preset_store

DEFAULT_PRESET = "sd15_lora"


class LoadPreset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        names = list(preset_store.available())  # read again whenever ComfyUI asks for the node definitions
        return node_schema(
            node_id="PG_LoadPreset",
            display_name="Personalization Preset Loader",
            category=TUNING_CATEGORY,
            search_aliases=["load preset", "preset", "settings", "omega schedule", "tuning"],
            description=(
                "A named preset as a weak model (the pair with the preset's omega schedule, as the Personalization "
                "Weak Model makes it) and the estimate and scales for the Personalization Guider. Lists the pack's "
                "starting points (sd15_lora, sdxl_lora, sd15_dreambooth) and your saved presets."
            ),
            inputs=[
                FinetunedPairSocket.Input("pair", tooltip="From the Personalization Pair Loader: the weak model is made "
                                          "from it."),
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
                                tooltip="The preset's estimate: set the guider's estimate to it (the estimate widget "
                                "chooses which scales the guider shows, so it takes no link)."),
                io.Float.Output("guidance_scale", tooltip="lambda (lambda_t in three-way): connect to the guider's "
                                "guidance_scale or the KSampler's cfg."),
                io.Float.Output("personalization_scale", tooltip="lambda_p (three-way): connect to the guider's "
                                "personalization_scale."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, pair, preset: str) -> str:
        # ComfyUI passes every input here, the linked pair as None; only the preset file's contents matter.
        return preset_store.fingerprint(preset)

    @classmethod
    def execute(cls, pair, preset: str) -> io.NodeOutput:
        settings = preset_store.read(preset)
        estimate = preset_store.ESTIMATE_OF_PRESET[settings.estimate]
        return io.NodeOutput(WeakModel(pair, settings.omega_schedule()), estimate.value,
                             settings.guidance_scale, settings.personalization_scale)


class SavePreset(io.ComfyNode):
    """Checks its values when it runs, not when the workflow is queued.

    A node that fails ComfyUI's queue-time validation is dropped from the run when
    other outputs of the workflow are valid, and the frontend then shows only a red
    outline. This output node has no linked inputs, so ComfyUI runs it before any
    other node: a refused preset stops the run at once, with its reason in the
    error dialog.
    """

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="PG_SavePreset",
            display_name="Personalization Preset Saver",
            category=TUNING_CATEGORY,
            search_aliases=["save preset", "preset", "settings", "tuning"],
            description=(
                "Saves the values on its widgets as a named preset: ComfyUI/user/personalization_guidance/presets/"
                "<name>.json, which the Personalization Preset Loader lists. The schedule widgets are the "
                "Personalization Weak Model's, the estimate and scales the Personalization Guider's."
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
                    tooltip="What the preset is for (kept in the file; optional; at most 1000 characters).",
                ),
                schedule_input(),
                *interval_inputs(),
                estimate_input(
                    two_way=[guidance_scale_input()],
                    three_way=[guidance_scale_input(), personalization_scale_input()],
                    shown="Two-way shows guidance_scale (lambda); three-way guidance_scale (lambda_t) and "
                    "personalization_scale (lambda_p).",
                ),
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
    def execute(
        cls,
        name: str,
        description: str,
        schedule: dict | str,
        guidance_start: float,
        guidance_end: float,
        estimate: dict | str,
        overwrite: bool,
        omega: float | None = None,
        omega_end: float | None = None,
        guidance_scale: float | None = None,
        personalization_scale: float | None = None,
    ) -> io.NodeOutput:
        """``schedule`` and ``estimate`` as ComfyUI passes them; Python callers may pass their names and the values
        they show as arguments."""
        weak = schedule_of(schedule, guidance_start, guidance_end, omega=omega, omega_end=omega_end)
        chosen = estimate_of(estimate, guidance_scale=guidance_scale, personalization_scale=personalization_scale)
        lambda_t = chosen["guidance_scale"]
        preset = Preset(
            name=name.strip(),
            description=description.strip(),
            schedule=weak.shape,
            omega=weak.omega_start,
            omega_end=weak.omega_end,
            guidance_start=guidance_start,
            guidance_end=guidance_end,
            estimate=preset_store.PRESET_OF_ESTIMATE[chosen.key],
            guidance_scale=lambda_t,
            # Two-way has one scale; a preset file holds both, and equal scales are the two-way estimate.
            personalization_scale=chosen["personalization_scale"] if chosen.key == Estimate.THREE_WAY else lambda_t,
        )
        preset_store.write(preset, overwrite)
        return io.NodeOutput()
