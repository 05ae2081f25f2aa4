"""What keep-best scores and training never sees (training/data/holdout.py): the split rule, the seeded split of the
user's pairs (the same under buckets, the latent cache and --resume; never served by the training loader), the
world's scenes of unseen captions, the data-free prompts synthesis never draws, --validation-data."""

from types import SimpleNamespace

import pytest
from PIL import Image

from training.data import holdout, scenes
from training.data.images import folder_pairs
from training.data.prepare import training_data
from training.data.sources import BuiltinPrompts, PromptFile, World
from training.data.synth_prompts import builtin_prompts
from training.distill import main
from training.errors import UserError
from training.loop import build, data_batches, train


@pytest.mark.parametrize("spec, total, count", [
    ("auto", 20, 2), ("auto", 40, 2), ("auto", 100, 5), ("auto", 1000, 50), ("auto", 100_000, 64), ("auto", 3, 2),
    ("0.1", 20, 2), ("0.5", 3, 2), ("0.001", 20, 1), ("7", 20, 7), ("0", 20, 0),
])
def test_the_split_rule(spec, total, count):
    assert holdout.withheld_count(spec, total) == count


@pytest.mark.parametrize("spec", ["-1", "1.0", "1.5", "0.0", "ten", ""])
def test_a_bad_split_is_one_line(spec):
    with pytest.raises(UserError) as error:
        holdout.parse_split(spec)
    assert str(error.value) == (f"--validation-split must be auto, a count (e.g. 50) or a fraction in (0, 1) (e.g. "
                                f"0.05), got {spec.strip().lower()!r}")


def test_the_split_is_seeded_and_partitions_the_items():
    items = [f"item {i}" for i in range(50)]
    kept, withheld = holdout.split(items, 5, seed=3)
    assert (kept, withheld) == holdout.split(items, 5, seed=3)
    assert len(withheld) == 5 and sorted(kept + withheld) == sorted(items) and not set(kept) & set(withheld)
    assert [x for x in items if x in withheld] == withheld  # item order kept
    assert holdout.split(items, 5, seed=4)[1] != withheld


def test_withholding_everything_is_one_line():
    with pytest.raises(UserError, match=r"^--validation-split 3 withholds 3 of 3 image pairs, leaving none to train"):
        holdout.split_counted(["a", "b", "c"], "3", 0, "image pairs")


def write_sized(folder, sizes):
    """One image + a caption naming it per (width, height)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (30 * (i % 8), 100, 200)).save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(f"image {i} of {w}x{h}")
    return folder


SIZES = [(300, 100)] * 6 + [(100, 300)] * 6 + [(200, 200)] * 8  # 20 pairs: auto withholds 2


def expected_withheld(folder, seed=0):
    """The captions the split must withhold: the listed pairs, split by the seed alone."""
    pairs, _ = folder_pairs(folder)
    return {pair.caption for pair in holdout.split(pairs, 2, seed)[1]}


def served_captions(run, start_step, batches):
    """The captions the training loader serves in `batches` micro-batches from `start_step`."""
    stream = data_batches(run, start_step)
    return {caption for _ in range(batches) for caption in next(stream)["captions"]}


@pytest.mark.parametrize("buckets, cache", [(False, False), (True, False), (False, True), (True, True)])
def test_no_withheld_image_reaches_the_training_loader(tmp_path, tiny_teacher, tiny_config, buckets, cache):
    data = write_sized(tmp_path / "data", SIZES)
    sizing = dict(resolution=128, min_bucket_reso=64) if buckets else dict(resolution=16)
    cfg = tiny_config(tiny_teacher, data, tmp_path / "out", buckets=buckets, cache_latents=cache, validate_every=1,
                      **sizing)
    run = build(cfg)
    withheld = set(run.holdout.captions)
    assert withheld == expected_withheld(data)  # the same split with and without buckets and the cache
    kept = {pair.caption for pair in run.dataset.pairs}
    assert len(kept) == 18 and not kept & withheld
    served = served_captions(run, 0, 30)  # about three epochs of batch 2
    assert served <= kept and len(served) >= 16
    if cache:  # the cache encoded the training images only
        assert len(list((tmp_path / "out" / "cache" / "latents").rglob("*.safetensors"))) == 18


def test_a_resumed_run_withholds_the_same_images(tmp_path, tiny_teacher, tiny_config):
    data = write_sized(tmp_path / "data", SIZES)
    flags = dict(mode="lcm", validate_every=2, checkpoint_every=1)
    train(tiny_config(tiny_teacher, data, tmp_path / "out", max_steps=2, **flags))
    resumed = build(tiny_config(tiny_teacher, data, tmp_path / "out", max_steps=4, resume="latest", **flags))
    withheld = set(resumed.holdout.captions)
    assert withheld == expected_withheld(data)
    assert not served_captions(resumed, 2, 20) & withheld


def test_a_resume_with_another_split_is_refused(tmp_path, tiny_teacher, tiny_args, capsys):
    data = write_sized(tmp_path / "data", SIZES)
    out = tmp_path / "out"
    argv = tiny_args(tiny_teacher, data, out, max_steps=1, mode="lcm", validate_every=1, checkpoint_every=1)
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*tiny_args(tiny_teacher, data, out, max_steps=2, mode="lcm", validate_every=1, resume="latest"),
                 "--validation-split", "4"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --resume {out / 'checkpoints' / 'step_0000001'}: that run trained with --validation-split auto and "
        "this one with --validation-split 4; give --validation-split auto to resume it, or start a new --output"
    ]


def test_the_split_follows_validation_and_validation_data(tmp_path, tiny_teacher, tiny_config):
    data = write_sized(tmp_path / "data", SIZES)
    assert tiny_config(tiny_teacher, data, tmp_path / "o", validate_every=0).validation_split == "0"
    assert tiny_config(tiny_teacher, data, tmp_path / "o", validate_every=5).validation_split == "auto"
    other = write_sized(tmp_path / "other", [(32, 32)] * 3)
    cfg = tiny_config(tiny_teacher, data, tmp_path / "o", validate_every=5, validation_data=str(other))
    assert cfg.validation_split == "0"
    dataset, _, held = training_data(cfg, accelerator=None)
    assert len(dataset.pairs) == 20 and held.captions == [f"image {i} of 32x32" for i in range(3)]
    with pytest.raises(UserError, match="^give --validation-split or --validation-data, not both$"):
        tiny_config(tiny_teacher, data, tmp_path / "o", validate_every=5, validation_data=str(other),
                    validation_split="3")


def test_world_validation_scenes_have_captions_no_training_scene_has(tmp_path, tiny_teacher, tiny_config):
    cfg = tiny_config(tiny_teacher, "world:300", tmp_path / "out", validate_every=5, resolution=64)
    main_process = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    dataset, _, held = training_data(cfg, main_process)
    trained = {pair.caption for pair in dataset.pairs}
    assert len(dataset) == 300 and trained == {scenes.caption_at(i) for i in range(300)}
    assert len(held.captions) == 15 == len(set(held.captions)) and not set(held.captions) & trained
    assert held.captions == training_data(cfg, main_process)[2].captions
    index = next(i for i in range(1000) if scenes.caption_at(i, holdout.WORLD_SEED) == held.captions[0])
    image = scenes.sample(index, holdout.WORLD_SEED)[1]
    pixels = held.images[0]()
    assert pixels.shape == (3, 64, 64)
    assert pixels[:, 0, 0].tolist() == pytest.approx([v / 127.5 - 1 for v in image.getpixel((0, 0))])


def test_data_free_validation_prompts_are_never_drawn(tmp_path):
    prompts = builtin_prompts()
    kept, held = holdout.split_prompts(BuiltinPrompts(), prompts, "auto", seed=0)
    assert kept == prompts and len(held.captions) == 64 and not set(held.captions) & set(prompts)
    assert held.captions == builtin_prompts(64, start=len(prompts))
    lines = [f"prompt number {i}" for i in range(40)]
    (tmp_path / "p.txt").write_text("\n".join(lines))
    kept, held = holdout.split_prompts(PromptFile(tmp_path / "p.txt"), lines, "auto", seed=0)
    assert len(held.captions) == 2 and sorted(kept + held.captions) == sorted(lines)
    assert not set(kept) & set(held.captions) and held.images is None


def test_a_world_source_is_not_split(tmp_path):
    assert holdout.world_scenes(World(40), "0", 64) is None
    assert len(holdout.world_scenes(World(40), "3", 64).captions) == 3
