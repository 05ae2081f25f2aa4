"""Shared test fixtures: where ComfyUI is, and where slow-built fixtures are cached (outside the repo)."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def find_comfyui():
    """COMFYUI_PATH, else ~/comfy/ComfyUI (comfy-cli's workspace), else a ComfyUI checkout above the repo."""
    candidates = [os.environ.get("COMFYUI_PATH"), Path.home() / "comfy" / "ComfyUI", *REPO.parents]
    for candidate in candidates:
        if candidate and (Path(candidate) / "comfy" / "model_sampling.py").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def comfyui_path():
    """The ComfyUI checkout, on sys.path; skips the test with a one-line reason where there is none."""
    path = find_comfyui()
    if path is None:
        pytest.skip("no ComfyUI checkout: set COMFYUI_PATH or export ComfyUI to ~/comfy/ComfyUI")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    return path


@pytest.fixture(scope="session")
def cache_dir():
    """Where tests cache slow-built fixtures: $SCOTT_TEST_CACHE, default ~/.cache/comfyui-scott-tests."""
    path = Path(os.environ.get("SCOTT_TEST_CACHE", Path.home() / ".cache" / "comfyui-scott-tests"))
    path.mkdir(parents=True, exist_ok=True)
    return path
