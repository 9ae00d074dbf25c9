"""ComfyUI glue shared by the nodes; everything numeric is delegated to the pack's ``guidance`` package.

- What the nodes import: ``vocabulary.py`` (Estimate, Route, WeakModel, RowScales, GuidanceConfig),
  ``personalization.py`` (the loaders' personalization input and the one function that forms their pair),
  ``modes.py`` (DynamicCombo inputs), ``schema.py``, ``user_errors.py``.
- Pairs: ``pairs.py`` (FinetunedPair and what forming shares), ``full_pairs.py`` (two separate models),
  ``lora_pairs.py`` (the base with a LoRA or another adapter).
- The sampling engine: ``runtime.py`` (ComfyUI's wrappers, the estimate, ``attach``), ``routing.py`` (handler
  choice and rerouting), ``handlers.py`` (per-module handlers), ``rows.py`` (which rows are weak),
  ``weak_weights.py`` (where a full pair's weak weights live).
- ``host.py``: the one module that asks ComfyUI how each layer gets its weights (differences between versions).
"""
