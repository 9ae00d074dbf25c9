"""Says whether the host tier ran: without COMFYUI_PATH every host test is left out and this one skips."""

import os

import pytest


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="host tier: set COMFYUI_PATH to a ComfyUI checkout (README, Testing)")
def test_host_tier_runs(comfy_host):
    assert comfy_host.nodes.NODES, "the pack registered no nodes"
