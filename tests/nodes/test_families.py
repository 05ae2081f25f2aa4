"""scott_core.families against the ComfyUI under test: the table names every SD1.5- and SDXL-derived model class
ComfyUI detects, every refused class exists, and the fixtures are detected as the families they stand for."""

from scott_core import families


def test_the_table_names_every_sd15_and_sdxl_derived_comfyui_class(comfy_modules):
    from comfy import supported_models

    def derived(base):
        return {cls.__name__ for cls in supported_models.models if issubclass(cls, base)}

    assert derived(supported_models.SDXL) == set(families.SDXL.comfy_configs) | {"SDXL_instructpix2pix"}
    assert derived(supported_models.SD15) == set(families.SD15.comfy_configs) | {"SD15_instructpix2pix"}
    assert set(families.REFUSED_CONFIGS) <= {cls.__name__ for cls in supported_models.models}


def test_the_fixtures_are_detected_as_their_families(comfy, fixture_paths):
    from comfy import sd as comfy_sd

    model_family = comfy.pack("nodes.model_sampling").model_family
    for key, family in (("checkpoint", families.SD15), ("sdxl_checkpoint", families.SDXL)):
        model = comfy_sd.load_checkpoint_guess_config(
            str(fixture_paths[key]), output_vae=False, output_clip=False
        )[0]
        assert type(model.model.model_config).__name__ == family.comfy_configs[0 if key == "checkpoint" else 2]
        assert model_family(model).name == family.name  # the pack imports scott_core under its own path
