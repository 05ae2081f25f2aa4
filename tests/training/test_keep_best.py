"""Keep-best (training/keep_best.py): the student's samples on the withheld captions scored against the teacher's
samples or the withheld images in the teacher's own feature spaces; a fixed LoRA scores the same every time, a
collapsed or zeroed student worse than one that samples like the teacher; the lowest score's LoRA is kept with its
score and step, across a resume."""

import json
import logging
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from training.config import DistillConfig
from training.data.synth import teacher_pipeline
from training.errors import UserError
from training.eval import scorers
from training.eval.evaluation import latent_shape, per_image_noise
from training.eval.scores import DEFAULT_SCORE, SCORES
from training.keep_best import (
    Judges,
    KeepBest,
    judge,
    prepare,
    score_values,
    student_sampler,
    teacher_features,
    teacher_latents,
)
from training.loop import build, keep_best, train
from training.models.family import square_sizes
from training.models.teacher import encode_captions, load_teacher
from training.validation import decode

SCORE_LINE = re.compile(r"step (\d+): keep-best score ([0-9.e+-]+) \((.*)\); best ([0-9.e+-]+) at step (\d+)")


def build_scored(teacher, images, tmp_path, tiny_config):
    """A built tiny run with keep-best on (20 pairs, 2 withheld, 16 samples) and its ValidationSet."""
    data = images(tmp_path / "data", 20)
    run = build(tiny_config(teacher, data, tmp_path / "out", validate_every=1, validation_samples=16, mode="lcm"))
    return run, prepare(run, run.holdout)


@pytest.fixture
def scored_run(tiny_teacher, images, tmp_path, tiny_config):
    return build_scored(tiny_teacher, images, tmp_path, tiny_config)


def test_a_fixed_lora_gets_the_same_score_twice(family_teacher, images, tmp_path, tiny_config):
    run, validation = build_scored(family_teacher, images, tmp_path, tiny_config)
    keeper = KeepBest(tmp_path / "best.json", DEFAULT_SCORE)
    first = keep_best(run, 1, validation, keeper, None)
    again = prepare(run, run.holdout)  # the references read back from <output>/validation/reference.safetensors
    assert all(torch.equal(again.references[k], validation.references[k]) for k in validation.references)
    assert keep_best(run, 2, again, keeper, None) == first
    assert keeper.step == 1 and json.loads((tmp_path / "best.json").read_text())["score"] == first


def test_the_teacher_references_are_the_family_pipelines_own_samples(family_teacher):
    """teacher_latents hands the family's pipeline the trainer's embeddings (SDXL: the pooled pair; the pipeline's
    own time ids, uncropped) and gets what the pipeline makes from the prompts themselves, its own unconditional
    embedding included (SDXL's zeros for an empty negative prompt)."""
    teacher = load_teacher(family_teacher)
    captions, seeds, shape = ["a red circle", "two blue squares"], [5, 6], latent_shape(teacher, 32)
    cond = teacher.family.conditioned(encode_captions(teacher, captions), square_sizes(32, 32, 2))
    uncond = teacher.family.uncond(encode_captions(teacher, [""]))
    got = teacher_latents(teacher, cond, uncond, seeds, shape, steps=3, cfg=2.0, batch_size=2)
    z, _ = per_image_noise(seeds, shape, "cpu")
    with torch.no_grad():
        expected = teacher_pipeline(teacher)(prompt=captions, latents=z, num_inference_steps=3, guidance_scale=2.0,
                                             height=32, width=32, output_type="latent").images
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-5)


def like_the_teacher(reference, generator):
    """A student's samples that the teacher's (or the images') resemble: each one a reference latent plus a little
    noise (a tenth of the references' spread), as many as the validation has samples."""
    noise = torch.randn(reference.shape, generator=generator) * reference.std() * 0.1
    return reference + noise


def test_a_collapsed_or_zeroed_student_scores_worse_than_one_that_samples_like_the_teacher(scored_run):
    run, validation = scored_run
    n, generator, worse = len(validation.seeds), torch.Generator().manual_seed(0), {}
    for name, score in SCORES.items():
        reference = validation.references[score.reference]
        reference = reference.repeat(n // len(reference), 1, 1, 1)  # the images: one per withheld caption
        students = {
            "trained": like_the_teacher(reference, generator),
            "collapsed": reference.mean(0, keepdim=True).expand_as(reference).clone(),  # one sample for every noise
            "zeroed": torch.zeros_like(reference),
        }
        features_of = teacher_features(run, score.feature)
        values = {kind: score_values(lambda k, x=x: x, features_of, validation, score, [1])[1]
                  for kind, x in students.items()}
        if not values["trained"] < min(values["collapsed"], values["zeroed"]):
            worse[name] = values
    assert not worse


def tensorboard_scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values.update({e.step: e.value for e in accumulator.Scalars(tag)})
    return values


def logged_scores(text):
    """{step: (score, what it says it is, best so far, its step)} of the keep-best log lines."""
    return {int(m[1]): (float(m[2]), m[3], float(m[4]), int(m[5])) for m in SCORE_LINE.finditer(text)}


def lora(path):
    with safe_open(str(path), framework="pt") as f:
        return load_file(str(path)), f.metadata()


def test_the_best_lora_is_the_one_at_the_lowest_score(tiny_teacher, images, tmp_path, tiny_config, caplog):
    data, out = images(tmp_path / "data", 20), tmp_path / "run"
    cfg = tiny_config(tiny_teacher, data, out, mode="lcm", max_steps=3, validate_every=1, save_every=1, lr=3e-2)
    with caplog.at_level(logging.INFO, logger="training"):
        train(cfg)
    logged = logged_scores(caplog.text)
    assert sorted(logged) == [1, 2, 3]
    scores = {step: value for step, (value, _, _, _) in logged.items()}
    best_step = min(scores, key=scores.get)
    assert len(set(scores.values())) == 3  # the LoRA moved between validations, and the score with it
    _, what, best, at = logged[3]
    assert (best, at) == (scores[best_step], best_step)
    assert what.startswith(f"{SCORES[DEFAULT_SCORE].describe(4)}; 4 samples on the captions of 2 image pairs of "
                           f"{data} withheld by --validation-split auto; 1 step ")
    kept, meta = lora(out / f"{cfg.name}_best.safetensors")
    source = out / (f"{cfg.name}_step{best_step:07d}.safetensors" if best_step < 3 else f"{cfg.name}.safetensors")
    expected, _ = lora(source)
    assert kept.keys() == expected.keys() and all(torch.equal(kept[k], expected[k]) for k in kept)
    assert (meta["scott.step"], meta["scott.validation_score_name"]) == (str(best_step), DEFAULT_SCORE)
    assert float(meta["scott.validation_score"]) == pytest.approx(scores[best_step], rel=1e-4)
    record = json.loads((out / "best.json").read_text())
    assert (record["step"], record["name"]) == (best_step, DEFAULT_SCORE)
    assert record["score"] == pytest.approx(scores[best_step], rel=1e-4)
    board = tensorboard_scalars(out / "logs", f"val/{DEFAULT_SCORE}")
    assert board == pytest.approx(scores, rel=1e-4)
    assert sorted(tensorboard_scalars(out / "logs", f"val/{DEFAULT_SCORE}/4_steps")) == [1, 2, 3]


def test_a_resumed_run_scores_as_a_straight_one_and_keeps_the_best_so_far(
    tiny_teacher, images, tmp_path, tiny_config, caplog
):
    data = images(tmp_path / "data", 20)
    flags = dict(mode="lcm", validate_every=2, checkpoint_every=2, lr=3e-2)
    with caplog.at_level(logging.INFO, logger="training"):
        train(tiny_config(tiny_teacher, data, tmp_path / "straight", max_steps=4, **flags))
    straight = logged_scores(caplog.text)
    caplog.clear()
    out = tmp_path / "split"
    with caplog.at_level(logging.INFO, logger="training"):
        train(tiny_config(tiny_teacher, data, out, max_steps=2, **flags))
        first_best = (out / "tiny-sd-v1_lcm_lora_best.safetensors").read_bytes()
        train(tiny_config(tiny_teacher, data, out, max_steps=4, resume="latest", **flags))
    resumed = logged_scores(caplog.text)
    assert {s: v[0] for s, v in resumed.items()} == {s: v[0] for s, v in straight.items()}
    scores = {s: v[0] for s, v in resumed.items()}
    best_step = min(scores, key=scores.get)
    record = json.loads((out / "best.json").read_text())
    assert record["step"] == best_step and record["score"] == pytest.approx(scores[best_step], rel=1e-4)
    assert sorted(scores) == [2, 4]
    if best_step == 2:  # the resumed part found nothing better: the best file is the first part's
        assert (out / "tiny-sd-v1_lcm_lora_best.safetensors").read_bytes() == first_best


def test_the_best_record_reads_back_only_for_the_same_score_on_resume(tmp_path):
    path = tmp_path / "best.json"
    keeper = KeepBest.open(path, "unet_fd_teacher", resume=None)
    assert keeper.improves(3.0) and not keeper.improves(float("nan"))
    keeper.record(5, 3.0)
    assert json.loads(path.read_text()) == {"step": 5, "score": 3.0, "name": "unet_fd_teacher"}
    back = KeepBest.open(path, "unet_fd_teacher", resume="latest")
    assert (back.score, back.step) == (3.0, 5) and not back.improves(3.5) and back.improves(2.5)
    assert KeepBest.open(path, "vae_fd_teacher", resume="latest").step is None  # another score starts afresh
    assert KeepBest.open(path, "unet_fd_teacher", resume=None).step is None  # a fresh run starts afresh


def test_validation_scores_fid_and_clip_through_training_eval(tiny_teacher, images, tmp_path, tiny_config,
                                                              inception_file, clip_folder, references, monkeypatch):
    monkeypatch.setattr(scorers, "INCEPTION_SIZE", 96)  # speed only: the network is fully convolutional to the pool
    data = images(tmp_path / "data", 20)
    cfg = tiny_config(tiny_teacher, data, tmp_path / "out", validate_every=1, validation_split="4", mode="lcm",
                      inception=str(inception_file), clip=str(clip_folder))
    run = build(cfg)
    validation, judges = prepare(run, run.holdout), Judges.load(cfg)
    latents = student_sampler(run, validation)(1)
    found = judge(run, validation, judges, latents)
    fake = decode(run.teacher.vae, latents)
    real = scorers.inception_features(judges.inception, [x.numpy() for x in validation.images])
    fakes = scorers.inception_features(judges.inception, [x.numpy() for x in fake])
    assert found["fid"] == pytest.approx(references.fid(real.numpy(), fakes.numpy()), rel=1e-6)
    expected = references.clip_score(*judges.clip, list(fake.permute(0, 3, 1, 2)), validation.captions)
    assert found["clip_score"] == pytest.approx(expected, abs=1e-4)


def test_a_score_against_images_needs_images(tiny_teacher, tmp_path):
    def data_free(**values):
        return DistillConfig(teacher=str(tiny_teacher), output=str(tmp_path), validate_every=1,
                             keep_best_score="vae_fd_images", **values).resolved()

    with pytest.raises(UserError) as error:
        data_free()
    assert str(error.value) == (
        "--keep-best-score vae_fd_images compares with withheld images, and data-free runs have none: give "
        f"--validation-data PATH, or a score against the teacher's samples (e.g. {DEFAULT_SCORE})")
    assert data_free(validation_data=str(tmp_path)).validation_split == "0"
