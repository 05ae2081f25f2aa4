"""Shared test fixtures: where ComfyUI is, and where slow-built fixtures are cached (outside the repo)."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# tests/nodes holds the ComfyUI harness the tests and benchmarks share (plain modules, no packages to shadow).
if str(REPO / "tests" / "nodes") not in sys.path:
    sys.path.append(str(REPO / "tests" / "nodes"))
from comfy_harness import find_comfyui, fixture_cache_dir  # noqa: E402


@pytest.fixture(scope="session")
def comfyui_path():
    """The ComfyUI checkout, on sys.path; skips the test with a one-line reason where there is none."""
    path = find_comfyui()
    if path is None:
        pytest.skip("no ComfyUI checkout: set COMFYUI_PATH or install one with comfy-cli (see README, Test)")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    return path


@pytest.fixture(scope="session")
def cache_dir():
    """Where tests cache slow-built fixtures: $SCOTT_TEST_CACHE, default ~/.cache/comfyui-scott-tests."""
    return fixture_cache_dir()
