"""A reproducible personalization study on CPU: ``python -m study.run``.

A synthetic text-to-image world (``world``) with exact scorers (``metrics``), a
small conditional diffusion model (``model``) pre-trained on it and personalized
DreamBooth-style, fully and with a LoRA (``train``, ``lora``), and every guidance
method sampled on the same noise (``guiders``, ``sample``, ``experiment``) through
the same ``guidance`` functions that the ComfyUI nodes use. Results:
``RESULTS.md``, ``results.json`` and ``frontier.png`` in this folder.
"""

import os

# On 2 shared cores, OpenMP threads that spin while they wait make torch many times
# slower whenever another process holds a core; waiting passively costs little. This
# takes effect only if torch is not loaded yet (``python -m study.run``); an explicit
# OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
