"""scott_core.families against the ComfyUI under test: the table names every SD1.5- and SDXL-derived model class
ComfyUI detects, and every refused class exists."""

from scott_core import families


def test_the_table_names_every_sd15_and_sdxl_derived_comfyui_class(comfy_modules):
    from comfy import supported_models

    def derived(base):
        return {cls.__name__ for cls in supported_models.models if issubclass(cls, base)}

    assert derived(supported_models.SDXL) == set(families.SDXL.comfy_configs) | {"SDXL_instructpix2pix"}
    assert derived(supported_models.SD15) == set(families.SD15.comfy_configs) | {"SD15_instructpix2pix"}
    assert set(families.REFUSED_CONFIGS) <= {cls.__name__ for cls in supported_models.models}
