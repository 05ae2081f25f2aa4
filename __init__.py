"""ComfyUI entry point of the SCott node pack (V3 schema): comfy_entrypoint returns the extension.

The import is deferred so that importing this file outside ComfyUI (pytest does, from the repo root) needs no
ComfyUI modules."""


async def comfy_entrypoint():
    from .nodes import comfy_entrypoint as entrypoint

    return await entrypoint()
