"""The tests' ComfyUI (comfy_harness.Comfy: the node pack loaded as ComfyUI loads it, prompts validated and run by
its executor, in-process, on the CPU) and its fixture files. Skips without a checkout."""

import shutil

import pytest
import scott_fixtures
import sdxl_fixtures
from comfy_harness import Comfy, import_comfyui


@pytest.fixture(scope="session")
def comfy_modules(comfyui_path):
    """ComfyUI importable in this process, on the CPU, with latent previews."""
    return import_comfyui(comfyui_path)


@pytest.fixture(scope="session")
def fixture_paths(comfy_modules, cache_dir):
    """The SD1.5 and SDXL fixture files, built on a cold cache (about 10 s + 20 s) and reused after."""
    return {**scott_fixtures.build_all(cache_dir), **sdxl_fixtures.build_sdxl(cache_dir)}


@pytest.fixture(scope="session")
def comfy(comfy_modules, fixture_paths, tmp_path_factory):
    """ComfyUI with the SCott pack loaded; fails if the pack's four nodes are not registered."""
    instance = Comfy(fixture_paths, tmp_path_factory.mktemp("comfy"))
    assert instance.pack_loaded, "nodes.load_custom_node could not load the repository as a node pack"
    yield instance
    shutil.rmtree(instance.output_dir, ignore_errors=True)
