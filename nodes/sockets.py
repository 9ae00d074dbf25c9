"""The pack's own socket types. Prefixed so that they cannot clash with another pack's."""

from comfy_api.latest import io

from .core.schema import CATEGORY, TUNING_CATEGORY  # noqa: F401  (the nodes import them from here)

FinetunedPairSocket = io.Custom("PG_FINETUNED_PAIR")
WeakModelSocket = io.Custom("PG_WEAK_MODEL")
