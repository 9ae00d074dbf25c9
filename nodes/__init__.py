"""The pack's ComfyUI nodes (V3 schema). Each file is one node; ``core/`` holds what they share."""

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .core.user_errors import log_user_errors_as_one_line
from .guider import PersonalizationGuider
from .load_diffusion_pair import LoadDiffusionModelPair
from .load_pair import LoadFinetunedPair, PairFromModels
from .model_patch import PersonalizationGuidanceModel
from .presets import LoadPreset, SavePreset
from .schedule_preview import SchedulePreview
from .sweep import Sweep
from .weak_model import WeakModelInterpolator

NODES: list[type[io.ComfyNode]] = [
    LoadFinetunedPair,
    LoadDiffusionModelPair,
    PairFromModels,
    WeakModelInterpolator,
    PersonalizationGuider,
    PersonalizationGuidanceModel,
    Sweep,
    SchedulePreview,
    LoadPreset,
    SavePreset,
]


class PersonalizationGuidanceExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # Here rather than in on_load, which ComfyUI v0.8.0 does not call.
        log_user_errors_as_one_line()
        return NODES


async def comfy_entrypoint() -> PersonalizationGuidanceExtension:
    return PersonalizationGuidanceExtension()
