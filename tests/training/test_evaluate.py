"""`python -m training.evaluate`: the scoring networks vs pytorch-fid / clean-fid / torchmetrics on random weights, the
LoRA merge vs peft, the COCO protocol, the weights checks and a tiny end-to-end run on the demo teacher."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scott_core import lora_format
from training import config
from training.errors import UserError
from training.eval import coco, evaluation, scorers
from training.evaluate import build_parser, main, resolve
from training.models.teacher import load_teacher


@pytest.fixture(scope="session")
def demo_teacher():
    if not (config.DEMO_TEACHER / "model_index.json").is_file():
        pytest.skip("the demo teacher is not in this checkout (python -m experiments.world.teacher builds it)")
    return config.DEMO_TEACHER


LORA_LAYERS = {  # demo UNet layers: an attention projection, a 3x3 conv, a time embedding projection
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64),
    "down_blocks.1.resnets.0.conv1": (64, 32, 3, 3),
    "up_blocks.0.resnets.0.time_emb_proj": None,
}


def write_demo_lora(path, rank=4, alpha=2.0, scale=0.3, metadata=None):
    """A random kohya-format LoRA over three layers of the demo UNet."""
    from safetensors.torch import save_file

    teacher_unet = load_teacher(config.DEMO_TEACHER).unet
    generator = torch.Generator().manual_seed(3)
    state = {}
    for layer in LORA_LAYERS:
        weight = teacher_unet.get_submodule(layer).weight
        down_shape = (rank, weight.shape[1], *weight.shape[2:])
        up_shape = (weight.shape[0], rank, *([1, 1] if weight.ndim == 4 else []))
        name = "lora_unet_" + layer.replace(".", "_")
        state[f"{name}.lora_down.weight"] = torch.randn(down_shape, generator=generator) * scale
        state[f"{name}.lora_up.weight"] = torch.randn(up_shape, generator=generator) * scale
        state[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path), metadata=metadata or {})
    return path


@pytest.fixture
def demo_lora(demo_teacher, tmp_path):
    return write_demo_lora(tmp_path / "tiny_scott.safetensors", metadata=lora_format.sampling_metadata(gamma=0.5))


def test_inception_features_match_pytorch_fids_network(inception_file, monkeypatch):
    from pytorch_fid import inception

    state = torch.load(inception_file, weights_only=True)
    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: state)  # no download
    reference = inception.InceptionV3([3], resize_input=False).eval()
    pixels = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 255
    ours = scorers.load_inception(inception_file)
    with torch.no_grad():
        expected = reference(pixels / 255)[0].flatten(1)
        got = ours(pixels)
    assert got.shape == (2, 2048)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())


def test_resize_is_clean_fids():
    from cleanfid import resize

    pixels = np.random.default_rng(0).integers(0, 256, size=(70, 50, 3), dtype=np.uint8)
    expected = resize.make_resizer("PIL", False, "bicubic", (299, 299))(pixels)
    np.testing.assert_allclose(scorers.clean_resize(pixels), expected, rtol=0, atol=1e-4)


def test_inception_weights_file_is_checked(tmp_path):
    with pytest.raises(UserError, match=r"put pt_inception-2015-12-05-6726825d\.pth .*pytorch-fid"):
        scorers.load_inception(tmp_path / "missing.pth")
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(UserError, match="is not the FID Inception-v3 state dict"):
        scorers.load_inception(other)


def test_clip_score_matches_torchmetrics(clip_folder, references):
    model, processor = scorers.load_clip(clip_folder)
    generator = torch.Generator().manual_seed(0)
    images = [(torch.rand(3, 40, 48, generator=generator) * 255).to(torch.uint8) for _ in range(6)]
    captions = ["a red circle", "a blue square on white", "cat", "a photo of a dog", "two birds", "the sea at dusk"]
    pil = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
    cosines = scorers.clip_cosines(model, processor, pil, captions, batch_size=4)
    assert scorers.clip_score(model, processor, pil, captions, batch_size=4) == pytest.approx(
        references.clip_score(model, processor, images, captions), abs=1e-4)
    assert scorers.clip_score(model, processor, pil, captions) == pytest.approx(max(cosines.mean().item(), 0))


def test_missing_clip_folder_is_one_line(tmp_path):
    with pytest.raises(UserError, match="--clip: no CLIP model at .* saved with transformers' save_pretrained"):
        scorers.load_clip(tmp_path / "clip")


def test_merged_lora_equals_the_peft_adapter_and_restores(demo_lora):
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    lora = evaluation.read_lora(demo_lora)
    teacher = load_teacher(config.DEMO_TEACHER)
    reference = load_teacher(config.DEMO_TEACHER).unet
    state, _ = lora_format.to_diffusers(*lora_format.read_safetensors(demo_lora), prefixed=False)
    reference.add_adapter(LoraConfig(r=4, lora_alpha=2.0, target_modules=list(LORA_LAYERS)))
    set_peft_model_state_dict(reference, state)
    generator = torch.Generator().manual_seed(0)
    z, cond = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 64, generator=generator)
    t = torch.tensor([500.0, 80.0])
    before = {n: p.clone() for n, p in teacher.unet.named_parameters()}
    with torch.no_grad():
        bare = teacher.unet(z, t, encoder_hidden_states=cond).sample
        with evaluation.merged(teacher, lora):
            got = teacher.unet(z, t, encoder_hidden_states=cond).sample
        expected = reference(z, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - bare).abs().max() > 1e-3  # the LoRA does change the output
    assert all(torch.equal(p, before[n]) for n, p in teacher.unet.named_parameters())


def test_lora_for_another_model_is_one_line(demo_teacher, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 1280),
               "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(1280, 2)}, str(path))
    with pytest.raises(UserError, match="does not fit this teacher"):
        evaluation.check_lora_fits(load_teacher(demo_teacher), evaluation.read_lora(path))


def test_an_image_depends_on_its_prompt_and_seed_only(demo_teacher):
    teacher = load_teacher(demo_teacher)
    generate = evaluation.consistency_generator(teacher, steps=2, gamma=0.5, cfg=2.0, resolution=32, device="cpu")
    prompts = ["a large red circle on the left on a grey background", "a small blue square at the top on a white "
               "background", "a large yellow triangle in the center on a black background"]
    batch = generate(prompts, [10, 11, 12])
    alone = generate(prompts[1:2], [11])
    other_seed = generate(prompts[1:2], [12])
    assert pixel_diff(batch[1], alone[0]) <= 2  # the same image up to batch-size rounding
    assert pixel_diff(batch[1], other_seed[0]) > 20
    assert batch[0].size == (32, 32)


def pixel_diff(a, b):
    """Largest per-pixel difference of two images, in uint8 levels."""
    return np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max()


def write_coco(folder, ids=(30, 10, 20)):
    """A COCO-like captions file (several captions per image, ids out of order) and its images."""
    images = folder / "val2017"
    images.mkdir(parents=True)
    annotations = []
    for image_id in ids:
        Image.new("RGB", (40, 30), (image_id, 0, 0)).save(images / f"{image_id:012d}.jpg")
        annotations += [{"id": 100 + image_id, "image_id": image_id, "caption": f"second  caption of {image_id}"},
                        {"id": image_id, "image_id": image_id, "caption": f"First caption\nof {image_id} "}]
    data = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids], "annotations": annotations}
    (folder / "captions_val2017.json").write_text(json.dumps(data))
    return images, folder / "captions_val2017.json"


def test_coco_protocol_takes_the_first_caption_of_each_image_in_id_order(tmp_path):
    images, captions = write_coco(tmp_path)
    prompts, paths = coco.coco_pairs(images, captions, n=3)
    assert prompts == ["First caption of 10", "First caption of 20", "First caption of 30"]
    assert [p.name for p in paths] == ["000000000010.jpg", "000000000020.jpg", "000000000030.jpg"]
    args = build_parser().parse_args(["--teacher", "t", "--protocol", "coco2017-5k", "--real", str(images),
                                      "--captions", str(captions), "--n", "3", "--out", "o"])
    opts = resolve(args)
    assert (opts.n, opts.resolution, opts.prompts, opts.real) == (3, 512, prompts, paths)
    with pytest.raises(UserError, match="lists 3 images, fewer than the 5000"):
        resolve(build_parser().parse_args(["--teacher", "t", "--protocol", "coco2017-5k", "--real", str(images),
                                           "--captions", str(captions), "--out", "o"]))
    (images / "000000000020.jpg").unlink()
    with pytest.raises(UserError, match="lacks 1 of the captioned images .first: 000000000020.jpg"):
        coco.coco_pairs(images, captions, n=3)


def write_real(folder, n=8, size=(80, 64)):
    """n real images of colour ramps, not square (they get center-cropped)."""
    folder.mkdir(parents=True)
    for i in range(n):
        ramp = np.linspace(0, 1, size[0])[None, :, None] * np.array([30 * i, 255 - 20 * i, 100])[None, None, :]
        Image.fromarray(np.broadcast_to(ramp, (size[1], size[0], 3)).astype(np.uint8)).save(folder / f"r{i}.png")
    return folder


def eval_argv(tmp_path, lora, inception, clip, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text((config.DEMO_TEACHER / "prompts.txt").read_text().splitlines()[0] + "\na blue square\n")
    real = tmp_path / "real" if (tmp_path / "real").is_dir() else write_real(tmp_path / "real")
    return ["--teacher", "demo", "--lora", str(lora), "--prompts", str(prompts), "--real", str(real), "--steps", "1",
            "2", "--n", "6", "--resolution", "64", "--teacher-steps", "4", "--batch-size", "4", "--grid-prompts", "3",
            "--out", str(tmp_path / "out"), "--inception", str(inception), "--clip", str(clip), *extra]


def test_missing_weights_stop_before_generation(tmp_path, demo_lora, inception_file, clip_folder, capsys):
    argv = eval_argv(tmp_path, demo_lora, tmp_path / "weights" / "fid.pth", clip_folder)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pt_inception-2015-12-05-6726825d.pth" in err and "weights/fid.pth" in err
    assert main(eval_argv(tmp_path, demo_lora, inception_file, tmp_path / "no_clip")) == 2
    assert "--clip: no CLIP model at" in capsys.readouterr().err
    assert not (tmp_path / "out" / "images").exists()


def test_end_to_end_on_the_demo_teacher_then_a_rerun_reuses_the_cache(tmp_path, demo_lora, inception_file,
                                                                     clip_folder, references, capsys, monkeypatch):
    monkeypatch.setattr(scorers, "INCEPTION_SIZE", 96)  # speed only: the network is fully convolutional to the pool
    argv = eval_argv(tmp_path, demo_lora, inception_file, clip_folder)
    assert main(argv) == 0
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    names = [row["name"] for row in results["rows"]]
    assert names == ["teacher_dpmpp2m4_cfg7.5", "tiny_scott_steps1_gamma0.5_cfg1", "tiny_scott_steps2_gamma0.5_cfg1"]
    assert (results["n"], results["n_real"], results["resolution"], results["k"]) == (6, 8, 64, 5)
    inception, (clip, processor) = scorers.load_inception(inception_file), scorers.load_clip(clip_folder)
    real = scorers.inception_features(inception, evaluation.Lazy(sorted((tmp_path / "real").iterdir()),
                                                                 evaluation.real_loader(64)))
    prompts = (tmp_path / "prompts.txt").read_text().splitlines()
    for row in results["rows"]:
        assert (row["n"], row["n_real"]) == (6, 8)
        images = [Image.open(out / "images" / row["name"] / f"{i:06d}.png").convert("RGB") for i in range(6)]
        fake = scorers.inception_features(inception, images)  # 6 and 8 images, 2048 features: singular covariances
        assert row["fid"] == pytest.approx(references.fid(real.numpy(), fake.numpy()), rel=1e-6)
        tensors = [torch.from_numpy(np.asarray(image)).permute(2, 0, 1) for image in images]
        captions = [prompts[i % 2] for i in range(6)]
        assert row["clip_score"] == pytest.approx(references.clip_score(clip, processor, tensors, captions),
                                                  abs=1e-4)
    assert [row["gamma"] for row in results["rows"]] == [None, 0.5, 0.5]  # from the LoRA's metadata
    table = (out / "results.md").read_text().splitlines()
    assert len(table) == 2 + 3 and table[2].startswith("| teacher_dpmpp2m4_cfg7.5 | dpmpp_2m | 4 | 7.5 |")
    assert Image.open(out / "grid.png").size == (3 * 64, 3 * 64)
    pngs = sorted((out / "images").rglob("*.png"))
    assert len(pngs) == 18
    assert (out / "images" / names[1] / "000001.txt").read_text().strip() == "a blue square"
    stamps = {p: p.stat().st_mtime_ns for p in pngs}
    capsys.readouterr()

    assert main(argv) == 0
    assert "tiny_scott_steps2_gamma0.5_cfg1: 0 new image(s), 6 cached" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in sorted((out / "images").rglob("*.png"))} == stamps
    assert json.loads((out / "results.json").read_text()) == results

    assert main([*argv, "--seed", "1"]) == 2  # another seed into the same folders is refused, naming what changed
    assert "holds images made with other settings (changed: seed)" in capsys.readouterr().err


def test_two_processes_split_the_images_without_duplicates(tmp_path, demo_lora, inception_file, clip_folder):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    argv = eval_argv(tmp_path, demo_lora, inception_file, clip_folder, "--no-reference", "--steps", "1")
    argv[argv.index("--n")] = "--num-images"  # torchrun's parser would take --n for an abbreviation of its own flags
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "training.evaluate", *argv],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tiny_scott_steps1_gamma0.5_cfg1: 3 new image(s), 0 cached (rank 0)" in result.stdout
    folder = tmp_path / "out" / "images" / "tiny_scott_steps1_gamma0.5_cfg1"
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:06d}.png" for i in range(6)]
    prompts = (tmp_path / "prompts.txt").read_text().splitlines()
    teacher, lora = load_teacher(config.DEMO_TEACHER), evaluation.read_lora(demo_lora)
    with evaluation.merged(teacher, lora):
        generate = evaluation.consistency_generator(teacher, 1, 0.5, 1.0, 64, "cpu")
        expected = generate([prompts[i % 2] for i in range(6)], list(range(6)))
    for i, image in enumerate(expected):  # ranks 0 and 1 drew the plan's images 0, 2, 4 and 1, 3, 5
        assert pixel_diff(Image.open(folder / f"{i:06d}.png"), image) <= 2, i  # batch-size rounding only
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())["rows"]) == 1
