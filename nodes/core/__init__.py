"""ComfyUI glue shared by the nodes: weight pairs and the sampling runtime.

Everything numeric is delegated to the pack's ``guidance`` package.
"""
