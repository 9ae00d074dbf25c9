"""The GPU checks (benchmarks/gpu_check.sh): ComfyUI named by COMFYUI_PATH, on the GPU when there is one.

Not part of the test suite (``tests/``): CI has no GPU. On a GPU, and with
``PG_DYNAMIC_VRAM=1``, ComfyUI's dynamic VRAM is switched on the way its ``main.py``
switches it on (comfy-aimdo, ``ModelPatcherDynamic`` as the core patcher), so that
models loaded by ComfyUI's loaders stream their weights as they do for users.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

PACK_DIR = Path(__file__).resolve().parents[2]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
if not COMFYUI_PATH:
    raise pytest.UsageError("set COMFYUI_PATH to a ComfyUI checkout (0.33 or newer for dynamic VRAM)")
sys.path.insert(0, COMFYUI_PATH)
sys.path.insert(1, str(PACK_DIR / "tests" / "host"))

import torch  # noqa: E402
from comfy.cli_args import args  # noqa: E402

args.cpu = not torch.cuda.is_available()
DYNAMIC = False
if torch.cuda.is_available() and os.environ.get("PG_DYNAMIC_VRAM") == "1":
    import comfy_aimdo.control  # noqa: E402  (ComfyUI 0.33+: its dynamic VRAM)

    comfy_aimdo.control.init()  # before comfy.model_management, as main.py does

    import comfy.memory_management  # noqa: E402
    import comfy.model_management  # noqa: E402
    import comfy.model_patcher  # noqa: E402

    devices = comfy.model_management.get_all_torch_devices()
    try:
        ready = comfy_aimdo.control.init_devices((d.index, 0) for d in devices)
    except TypeError:  # an older comfy-aimdo
        ready = comfy_aimdo.control.init_devices(d.index for d in devices)
    if not ready:
        raise pytest.UsageError("comfy-aimdo did not start: dynamic VRAM cannot be checked on this machine")
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    DYNAMIC = True


@pytest.fixture(scope="session")
def comfy_host(tmp_path_factory):
    import folder_paths
    import utils.extra_config  # noqa: F401

    root = tmp_path_factory.mktemp("comfy")
    for folder in ("checkpoints", "loras", "diffusion_models", "embeddings"):
        (root / folder).mkdir()
        folder_paths.folder_names_and_paths[folder] = ([str(root / folder)], folder_paths.supported_pt_extensions)
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    assert asyncio.run(nodes.load_custom_node(str(PACK_DIR))), "the pack failed to load"
    pack = sys.modules[str(PACK_DIR).replace(".", "_x_")]
    pack.models_root = root
    return pack
