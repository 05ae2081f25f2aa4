"""pyproject.toml as ComfyUI reads a node pack's registry metadata (comfy_config, what load_custom_node parses):
[tool.comfy] filled, the icon a square image in this repository, and the ComfyUI under test within
requires-comfyui."""

from pathlib import Path

from packaging.specifiers import SpecifierSet
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def test_comfyui_reads_the_registry_fields(comfy_modules):
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(REPO))
    comfy, project = config.tool_comfy, config.project
    assert comfy.publisher_id and comfy.display_name.startswith("SCott")
    assert project.name == "comfyui-scott" and project.version.count(".") == 2
    assert project.license.text == "MIT" and project.urls.repository.startswith("https://github.com/")
    assert project.supported_os == ["OS Independent"]
    # the icon is served from this repository's default branch: the file must be here, square, >= 200 px
    prefix = project.urls.repository.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    assert comfy.icon.startswith(prefix)
    with Image.open(REPO / comfy.icon.removeprefix(prefix)) as icon:
        assert icon.width == icon.height >= 200


def test_the_tested_comfyui_satisfies_requires_comfyui(comfy_modules):
    import comfyui_version
    from comfy_config import config_parser

    required = config_parser.extract_node_configuration(str(REPO)).project.supported_comfyui_version
    assert required and comfyui_version.__version__ in SpecifierSet(required)
