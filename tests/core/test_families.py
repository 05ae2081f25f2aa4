"""scott_core.families: what ComfyUI detects maps to a supported family, everything else to its one-line refusal."""

import pytest

from scott_core import families as fam
from scott_core import lora_format as lf


@pytest.mark.parametrize(
    "config, family",
    [("SD15", fam.SD15), ("SDXL", fam.SDXL), ("SSD1B", fam.SDXL), ("Segmind_Vega", fam.SDXL), ("KOALA_700M", fam.SDXL)],
)
def test_comfyui_config_classes_map_to_their_family(config, family):
    assert fam.family_of(config) is family


REFUSALS = [
    (("SD20",), "the model is sd2 (SD2.x)"),
    (("SDXLRefiner",), "the model is sdxl_refiner (the SDXL refiner, a second-stage model)"),
    (("SD3",), "the model is sd3 (SD3, rectified flow)"),
    (("FluxSchnell",), "the model is flux (Flux, rectified flow)"),
    (("SDXL", "EDM"), "the model is playground_v2.5 (Playground v2.5, EDM)"),
    (("SDXL", "V_PREDICTION", 4, True),
     "the model is sdxl_vpred (a v-prediction SDXL fine-tune such as NoobAI's v-pred line, zero terminal SNR)"),
    (("SDXL", "V_PREDICTION_EDM"), "the model is sdxl_vpred_edm (a v-prediction EDM SDXL model such as CosXL)"),
    (("SDXL", "EPS", 9), "the model is sdxl_inpaint (an SDXL inpainting model, 9 input channels)"),
    (("SD15", "EPS", 9), "the model is sd15_inpaint (an SD1.5 inpainting model, 9 input channels)"),
    (("SDXL_instructpix2pix",), "the model is sdxl_instructpix2pix (an SDXL InstructPix2Pix model, 8 input channels)"),
    (("SDXL", "EPS", 4, True), "the model is sdxl_eps (SDXL with EPS prediction, zero terminal SNR)"),
    (("HunyuanDiT",), "the model is HunyuanDiT (not an SD1.5- or SDXL-family model)"),
]


@pytest.mark.parametrize("args, message", REFUSALS)
def test_everything_else_is_refused_in_one_line_naming_it_and_what_is_supported(args, message):
    with pytest.raises(fam.UnsupportedModel) as info:
        fam.family_of(*args)
    assert str(info.value) == f"{message}: {fam.SUPPORTED}"
    assert info.value.name == message.split()[3]


def test_the_kohya_and_diffusers_prefixes_are_the_ones_lora_format_reads():
    """Every prefix in the table is a part lora_format converts, and kohya prefixes round-trip to their part."""
    for family in fam.FAMILIES.values():
        for part, prefix in family.kohya_prefixes:
            assert part in lf.PARTS and lf.KOHYA_PARTS[prefix] == part
        assert {part for part, _ in family.diffusers_prefixes} == {part for part, _ in family.kohya_prefixes}
        assert all(prefix == f"{part}." for part, prefix in family.diffusers_prefixes)
