"""scott_core.lora_format: format/family detection, kohya <-> peft/diffusers with alpha, file errors."""

import json

import pytest
import torch
from safetensors.torch import save_file

from scott_core import families
from scott_core import lora_format as lf

UNET_PATHS = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.0.attentions.0.proj_in",
    "mid_block.resnets.0.time_emb_proj",
    "up_blocks.1.resnets.0.conv_shortcut",
]
TE_PATHS = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.11.mlp.fc1"]


def _peft_unet(rank=4, cross=768, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path in UNET_PATHS:
        width = cross if "attn2.to_k" in path else 320
        sd[f"{path}.lora_A.weight"] = torch.randn(rank, width, generator=g)
        sd[f"{path}.lora_B.weight"] = torch.randn(320, rank, generator=g)
    return sd


def _diffusers_full(rank=4):
    sd = {f"unet.{k}": v for k, v in _peft_unet(rank).items()}
    g = torch.Generator().manual_seed(1)
    for path in TE_PATHS:
        sd[f"text_encoder.{path}.lora_A.weight"] = torch.randn(rank, 768, generator=g)
        sd[f"text_encoder.{path}.lora_B.weight"] = torch.randn(768, rank, generator=g)
    return sd


def test_kohya_names_match_the_standard_sd15_names():
    kohya = lf.to_kohya(_diffusers_full())
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj.alpha" in kohya
    assert "lora_te_text_model_encoder_layers_11_mlp_fc1.lora_up.weight" in kohya
    assert len(kohya) == 3 * (len(UNET_PATHS) + len(TE_PATHS))


@pytest.mark.parametrize("alpha", [None, 2.0])
def test_diffusers_kohya_diffusers_round_trip_keeps_tensors_and_scale(alpha):
    sd = _diffusers_full()
    meta = (
        None
        if alpha is None
        else {
            lf.DIFFUSERS_METADATA_KEY: json.dumps(
                {"unet.lora_alpha": alpha, "text_encoder.lora_alpha": alpha}
            )
        }
    )
    kohya = lf.to_kohya(sd, meta)
    assert lf.detect_format(kohya) == "kohya"
    assert all(float(v) == (alpha or 4.0) for k, v in kohya.items() if k.endswith(".alpha"))
    back, back_meta = lf.to_diffusers(kohya)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    assert json.loads(back_meta[lf.DIFFUSERS_METADATA_KEY])["unet.lora_alpha"] == (alpha or 4.0)
    before, after = lf.modules(sd, meta), lf.modules(back, back_meta)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(lf.patched_delta(before[key]), lf.patched_delta(after[key]))


def test_bare_peft_keys_are_unet_and_base_model_prefix_is_stripped():
    sd = {f"base_model.model.{k}": v for k, v in _peft_unet().items()}
    assert lf.detect_format(sd) == "peft"
    mods = lf.modules(sd)
    assert set(mods) == {f"unet:{p}" for p in UNET_PATHS}


def test_old_diffusers_processor_keys_map_to_module_paths():
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora"
    sd = {f"{key}.down.weight": torch.ones(2, 320), f"{key}.up.weight": torch.ones(320, 2)}
    assert list(lf.modules(sd)) == ["unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]


@pytest.mark.parametrize("cross, family", [(768, "sd15"), (1024, "sd2"), (2048, "sdxl")])
def test_family_from_cross_attention_width(cross, family):
    assert lf.detect_family(_peft_unet(cross=cross)) == family
    assert lf.detect_family(lf.to_kohya(_peft_unet(cross=cross))) == family


def test_sdxl_kohya_text_encoder_keys_mean_sdxl():
    key = "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"
    assert lf.detect_family({key: torch.ones(1, 768)}) == "sdxl"


def test_a_state_dict_without_lora_keys_is_rejected():
    with pytest.raises(lf.LoraFormatError, match="not a LoRA"):
        lf.detect_format({"model.diffusion_model.input_blocks.0.0.weight": torch.ones(1)})


def test_a_module_missing_its_up_matrix_is_rejected():
    sd = _peft_unet()
    del sd[f"{UNET_PATHS[0]}.lora_B.weight"]
    with pytest.raises(lf.LoraFormatError, match="only one of its two matrices"):
        lf.modules(sd)


def test_mixed_ranks_cannot_be_written_as_diffusers_metadata():
    sd = _peft_unet()
    sd[f"{UNET_PATHS[0]}.lora_A.weight"] = torch.ones(8, 320)
    sd[f"{UNET_PATHS[0]}.lora_B.weight"] = torch.ones(320, 8)
    with pytest.raises(lf.LoraFormatError, match="kohya"):
        lf.to_diffusers(sd)
    assert lf.to_kohya(sd)[f"lora_unet_{UNET_PATHS[0].replace('.', '_')}.alpha"] == 8.0


def test_read_safetensors_round_trip_and_sampling_metadata(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file(_peft_unet(), str(path), metadata=lf.sampling_metadata(steps=2, gamma=0.3))
    sd, meta = lf.read_safetensors(path)
    assert set(sd) == set(_peft_unet())
    assert lf.sampling_defaults(meta) == {"steps": 2, "gamma": 0.3}


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"PK\x03\x04" + b"\0" * 64, "not a safetensors"),
        (b"\x80\x02}q\x00." + b"\0" * 16, "not a safetensors"),
    ],
)
def test_read_safetensors_refuses_empty_and_pickled_files(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(lf.LoraFormatError, match=message) as info:
        lf.read_safetensors(path)
    assert "\n" not in str(info.value)


def test_read_safetensors_reports_a_truncated_file_in_one_line(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file(_peft_unet(), str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(lf.LoraFormatError, match="corrupt or truncated") as info:
        lf.read_safetensors(path)
    assert "\n" not in str(info.value)


def test_bad_scott_metadata_names_the_key():
    with pytest.raises(lf.LoraFormatError, match="scott.steps"):
        lf.sampling_defaults({"scott.steps": "two"})


SDXL_TE_PATHS = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.31.mlp.fc2"]


def _diffusers_sdxl(rank=4):
    """unet. (cross-attention 2048), text_encoder. (CLIP-L, 768) and text_encoder_2. (bigG, 1280) modules."""
    sd = {f"unet.{k}": v for k, v in _peft_unet(rank, cross=2048).items()}
    g = torch.Generator().manual_seed(2)
    for part, width in (("text_encoder", 768), ("text_encoder_2", 1280)):
        for path in SDXL_TE_PATHS:
            sd[f"{part}.{path}.lora_A.weight"] = torch.randn(rank, width, generator=g)
            sd[f"{part}.{path}.lora_B.weight"] = torch.randn(width, rank, generator=g)
    return sd


def test_sdxl_text_encoders_become_kohya_te1_and_te2_and_round_trip():
    sd = _diffusers_sdxl()
    assert lf.detect_family(sd) == "sdxl"
    kohya = lf.to_kohya(sd)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    assert "lora_te2_text_model_encoder_layers_31_mlp_fc2.alpha" in kohya
    assert not any(k.startswith("lora_te_") for k in kohya)
    back, _ = lf.to_diffusers(kohya)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_the_family_argument_picks_the_text_encoder_prefix():
    """A CLIP-L-only LoRA reads as SD1.5 (lora_te_); on an SDXL model the loader asks for SDXL's lora_te1_."""
    sd = {k: v for k, v in _diffusers_sdxl().items() if k.startswith("text_encoder.")}
    assert all(k.startswith("lora_te_") for k in lf.to_kohya(sd))
    assert all(k.startswith("lora_te1_") for k in lf.to_kohya(sd, family=families.SDXL))
    with pytest.raises(lf.LoraFormatError, match="SD1.5 models have no text_encoder_2"):
        lf.to_kohya(_diffusers_sdxl(), family=families.SD15)


def test_kohya_sdxl_keys_with_original_unet_names_keep_their_names():
    """kohya sd-scripts names SDXL UNet modules by the original (ldm) layout: input_blocks / middle_block /
    output_blocks; conversion keeps every key and reads the module path with its multi-word names intact."""
    names = [
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
        "lora_unet_middle_block_1_proj_in",
        "lora_unet_output_blocks_2_0_emb_layers_1",
        "lora_unet_output_blocks_0_0_skip_connection",
        "lora_te2_text_model_encoder_layers_3_self_attn_out_proj",
    ]
    sd = {}
    for name in names:
        width = 2048 if name.endswith("attn2_to_k") else 640
        sd.update({f"{name}.lora_down.weight": torch.ones(4, width), f"{name}.lora_up.weight": torch.ones(640, 4)})
        sd[f"{name}.alpha"] = torch.tensor(2.0)
    assert lf.detect_family(sd) == "sdxl"
    assert set(lf.to_kohya(sd)) == set(sd)
    paths = {m.path for m in lf.modules(sd).values()}
    assert "input_blocks.4.1.transformer_blocks.0.attn2.to_k" in paths
    assert "output_blocks.0.0.skip_connection" in paths and "middle_block.1.proj_in" in paths
