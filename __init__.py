"""ComfyUI entry point of the personalization-guidance node pack. See README.md.

The nodes are imported when ComfyUI asks for them, not at import: importing this
package has no side effects and needs no ComfyUI (the torch-only tests rely on that).
"""


async def comfy_entrypoint():
    from .nodes import comfy_entrypoint as nodes_entrypoint

    return await nodes_entrypoint()
