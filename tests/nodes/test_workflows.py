"""workflows/: every API-format graph runs in ComfyUI to a saved image (its family's fixture substituted, 64 px);
every UI-format graph names existing node types, has consistent links and is the same graph as its API
twin; each has a small .jpg thumbnail for ComfyUI's template browser."""

import json
from pathlib import Path

import pytest
from PIL import Image
from workflow_ui import UI_ONLY_TYPES, ui_to_api

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
API_FILES = sorted((WORKFLOWS / "api").glob("*.json"))
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
EXPECTED = {"scott_txt2img", "scott_img2img", "scott_samplercustom", "scott_sdxl_txt2img", "scott_sdxl_img2img"}
# The checkpoint a workflow names -> the fixture checkpoint and LoRA of its family.
FIXTURES = {
    "v1-5-pruned-emaonly.safetensors": ("checkpoint", "lora_kohya"),
    "sd_xl_base_1.0.safetensors": ("sdxl_checkpoint", "sdxl_lora_kohya"),
}


def test_the_workflows_exist_in_both_formats_with_thumbnails():
    assert {p.stem for p in API_FILES} == EXPECTED and {p.stem for p in UI_FILES} == EXPECTED
    for path in UI_FILES:
        thumb = path.with_suffix(".jpg")
        assert thumb.stat().st_size < 50_000
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and min(im.size) >= 128


def substitute(api, fixture_paths, seed):
    """The fixture checkpoint/LoRA of the workflow's family, the test input image, 64 px latents and a fresh seed."""
    checkpoint, lora = FIXTURES[next(n["inputs"]["ckpt_name"] for n in api.values() if "ckpt_name" in n["inputs"])]
    for node in api.values():
        inputs = node["inputs"]
        if "ckpt_name" in inputs:
            inputs["ckpt_name"] = fixture_paths[checkpoint].name
        if "lora_name" in inputs:
            inputs["lora_name"] = fixture_paths[lora].name
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        for key in ("seed", "noise_seed"):
            if key in inputs:
                inputs[key] = seed
    return api


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.stem)
def test_api_workflow_runs_to_a_saved_image(comfy, fixture_paths, path):
    Image.new("RGB", (64, 64), (200, 120, 40)).save(comfy.input_dir / "example.png")
    api = json.loads(path.read_text())
    assert {n["inputs"]["ckpt_name"] for n in api.values() if "ckpt_name" in n["inputs"]} <= set(FIXTURES)
    result = comfy.run(substitute(api, fixture_paths, seed=len(path.stem)))
    assert result["ok"], result.get("error") or result.get("node_errors")
    images = comfy.output_files(result, "images", path.stem)
    assert len(images) == 1
    with Image.open(images[0]) as im:
        assert im.size == (64, 64)
        assert any(lo != hi for lo, hi in im.getextrema())  # a decoded image, not a constant fill


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_is_consistent_and_matches_its_api_twin(comfy, path):
    ui = json.loads(path.read_text())
    classes = comfy.nodes.NODE_CLASS_MAPPINGS
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert all(n["type"] in classes or n["type"] in UI_ONLY_TYPES for n in nodes.values())
    assert ui["last_node_id"] >= max(nodes) and ui["last_link_id"] >= max(link[0] for link in ui["links"])
    for link_id, src, src_slot, dst, dst_slot, link_type in ui["links"]:
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
        assert nodes[src]["outputs"][src_slot]["type"] == nodes[dst]["inputs"][dst_slot]["type"] == link_type
    linked = {lid for n in nodes.values() for o in n["outputs"] for lid in o["links"] or []}
    assert linked == {link[0] for link in ui["links"]}
    assert ui_to_api(ui, classes) == json.loads((WORKFLOWS / "api" / path.name).read_text())
