"""The pack's ComfyUI nodes (V3 schema): thin adapters, one concept per file.

- ``load_pair.py``: the pair loaders for checkpoints (a base and its personalization; two MODELs);
  ``load_diffusion_pair.py``: the pair loader for diffusion-model files.
- ``weak_model.py``: the weak model (omega and its schedule); ``guider.py`` and ``model_patch.py``: the
  guidance as a GUIDER and as a MODEL patch for KSampler.
- ``inputs.py`` and ``sockets.py``: the inputs and socket types the sampling nodes share.
- ``tuning/``: the tuning tools (sweep, schedule preview, presets) and their helpers.
- ``core/``: the ComfyUI glue the nodes share (pairs, personalization input, the sampling runtime).
"""

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from .core.user_errors import log_user_errors_as_one_line
from .guider import PersonalizationGuider
from .load_diffusion_pair import LoadDiffusionModelPair
from .load_pair import LoadFinetunedPair, PairFromModels
from .model_patch import PersonalizationGuidanceModel
from .tuning.presets import LoadPreset, SavePreset
from .tuning.schedule_preview import SchedulePreview
from .tuning.sweep import Sweep
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
