"""The pack's own socket types. Prefixed so that they cannot clash with another pack's."""

from comfy_api.latest import io

FinetunedPairSocket = io.Custom("PG_FINETUNED_PAIR")
WeakModelSocket = io.Custom("PG_WEAK_MODEL")

CATEGORY = "sampling/personalization guidance"
