"""The tests find ComfyUI where comfy-cli put it: COMFYUI_PATH first, then comfy-cli's configured default
workspace, its recent one, then its default ~/comfy/ComfyUI (Linux layout; HOME pointed at a temporary folder)."""

import comfy_harness
import pytest


def fake_comfyui(path):
    (path / "comfy").mkdir(parents=True)
    (path / "comfy" / "model_sampling.py").write_text("")
    return path


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setattr(comfy_harness.platform, "system", lambda: "Linux")
    return tmp_path


def write_config(home, **keys):
    config = home / ".config" / "comfy-cli" / "config.ini"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("[DEFAULT]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()))


def test_comfy_cli_default_workspace_is_found(home):
    default = fake_comfyui(home / "comfy" / "ComfyUI")
    assert comfy_harness.find_comfyui() == default


def test_configured_workspace_comes_before_the_default_and_comfyui_path_before_both(home, monkeypatch):
    fake_comfyui(home / "comfy" / "ComfyUI")
    recent = fake_comfyui(home / "recent" / "ComfyUI")
    write_config(home, recent_workspace=recent)
    assert comfy_harness.find_comfyui() == recent
    configured = fake_comfyui(home / "elsewhere" / "ComfyUI")
    write_config(home, default_workspace=configured, recent_workspace=recent)
    assert comfy_harness.find_comfyui() == configured
    explicit = fake_comfyui(home / "explicit")
    monkeypatch.setenv("COMFYUI_PATH", str(explicit))
    assert comfy_harness.find_comfyui() == explicit


def test_a_broken_config_is_ignored(home):
    default = fake_comfyui(home / "comfy" / "ComfyUI")
    write_config(home)
    (home / ".config" / "comfy-cli" / "config.ini").write_text("not an ini file\n")  # no section header
    assert comfy_harness.find_comfyui() == default
