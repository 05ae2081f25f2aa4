"""SCott ComfyUI nodes (V3): LoRA loader, sampler, scheduler, KSampler: thin shells over scott_core."""

from comfy_api.latest import ComfyExtension, io

from .loader import ScottLoraLoader
from .sampler import ScottKSampler, ScottSampler, ScottScheduler

NODES = [ScottLoraLoader, ScottSampler, ScottScheduler, ScottKSampler]


class ScottExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> ScottExtension:
    return ScottExtension()
