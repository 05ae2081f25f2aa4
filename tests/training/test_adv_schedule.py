"""The adversarial term's schedule: --adv-decay-steps (the weight falls linearly to 0, then the discriminator is off
and the step costs what a step without it costs), --disc-every (the discriminator updates on every k-th step only),
and --save-steps (the LoRA exported at chosen steps, what the world curves score)."""

import logging

import pytest
import torch

from training.cli import parse_config
from training.data.images import make_loader
from training.encode import encode_images, encode_text
from training.errors import UserError
from training.export import metadata
from training.loop import build, step_generator, train
from training.memory import count_flops
from training.models.adapters import STUDENT, adapter_params
from training.models.family import SD15
from training.step import StepPlan, adv_weight_at, draw, peak_step, scott_backward, step_plan

from .test_discriminator import checkpoint_tensors, student_and_disc


def config(**flags):
    return parse_config(["--teacher", "t", "--data", "d", *[str(a) for kv in flags.items() for a in kv]])


def test_the_weight_falls_linearly_and_the_disc_stops_at_the_decay_end():
    cfg = config(**{"--adv-decay-steps": 10, "--disc-every": 3})
    weights = [adv_weight_at(cfg, s) for s in (0, 5, 9)]
    assert weights == pytest.approx([0.4, 0.2, 0.04])
    plans = [step_plan(cfg, s) for s in range(12)]
    assert [p.disc_update for p in plans] == [False, False, True] * 3 + [False] * 3  # steps 3, 6, 9 counted from 1
    assert [p.adv_weight for p in plans[10:]] == [0.0, 0.0] and not any(p.needs_fake for p in plans[10:])
    assert all(p.needs_fake for p in plans[:10])


def test_head_warmup_and_no_adversary_plans():
    warm = config(**{"--disc-head-warmup": 2, "--adv-decay-steps": 4})
    assert [step_plan(warm, s) for s in range(5)] == [
        StepPlan(0.0, True), StepPlan(0.0, True), StepPlan(pytest.approx(0.2), True),
        StepPlan(pytest.approx(0.1), True), StepPlan(0.0, False)]
    assert step_plan(config(**{"--mode": "lcm"}), 0) == StepPlan(0.0, False)
    assert step_plan(config(), 123) == StepPlan(0.4, True)  # the defaults: constant weight, the disc every step


def test_peak_step_is_the_first_with_the_disc_update_and_the_generator_term():
    assert peak_step(config()) == 0
    assert peak_step(config(**{"--disc-every": 3})) == 2  # steps 3, 6, ... counted from 1
    assert peak_step(config(**{"--disc-head-warmup": 5, "--disc-every": 2})) == 5  # the first update past warm-up
    assert peak_step(config(**{"--disc-head-warmup": 4, "--adv-decay-steps": 3})) == 0  # never both: the disc alone
    assert peak_step(config(**{"--mode": "lcm"})) == 0


def test_save_steps_are_checked_and_parsed():
    assert config(**{"--save-steps": "30, 10,100"}).save_step_set() == {10, 30, 100}
    assert config().save_step_set() == set()
    with pytest.raises(UserError, match=r"^--save-steps must be comma-separated integers >= 1, got '0,5'$"):
        config(**{"--save-steps": "0,5"})


def test_metadata_names_the_schedule_of_adversarial_runs_only():
    meta = metadata(config(**{"--adv-decay-steps": 300, "--disc-every": 2}), SD15, "base", "0" * 64)
    assert (meta["scott.adv_decay_steps"], meta["scott.disc_every"]) == ("300", "2")
    lcm = metadata(config(**{"--mode": "lcm"}), SD15, "base", "0" * 64)
    assert not {"scott.adv_decay_steps", "scott.disc_every"} & set(lcm)


def step_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]


def test_the_disc_updates_on_every_kth_step_only(tiny_teacher, tiny_data, tmp_path, tiny_config, caplog):
    with caplog.at_level(logging.INFO, logger="training"):
        train(tiny_config(tiny_teacher, tiny_data, tmp_path, max_steps=3, checkpoint_every=1, disc_every=2))
    students, discs = zip(*(student_and_disc(tmp_path, s) for s in (1, 2, 3)))
    heads = [{k: v for k, v in checkpoint_tensors(tmp_path, s).items() if k.startswith("head.")} for s in (1, 2, 3)]
    assert all(v.abs().max() == 0 for k, v in discs[0].items() if ".lora_B." in k)  # step 1: no update yet
    assert any(v.abs().max() > 0 for k, v in discs[1].items() if ".lora_B." in k)  # step 2 updated it
    for key in discs[1]:  # step 3 did not
        assert torch.equal(discs[1][key], discs[2][key])
    assert all(torch.equal(heads[1][k], heads[2][k]) for k in heads[1])
    assert any(not torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    for a, b in ((0, 1), (1, 2)):  # the student learns on every step
        assert any(not torch.equal(students[a][k], students[b][k]) for k in students[a])
    lines = step_lines(caplog)
    assert ["disc=" in line for line in lines] == [False, True, False]
    assert all("adv_cd_grad_ratio=" in line for line in lines)  # the generator term on every step


def test_after_the_decay_the_disc_neither_trains_nor_runs(tiny_teacher, tiny_data, tmp_path, tiny_config, caplog):
    with caplog.at_level(logging.INFO, logger="training"):
        train(tiny_config(tiny_teacher, tiny_data, tmp_path, max_steps=3, checkpoint_every=1, adv_decay_steps=2))
    lines = step_lines(caplog)
    assert ["disc=" in line for line in lines] == [True, True, False]
    assert ["adv_g=" in line for line in lines] == [True, True, False]
    _, at_2 = student_and_disc(tmp_path, 2)
    _, at_3 = student_and_disc(tmp_path, 3)
    assert all(torch.equal(at_2[k], at_3[k]) for k in at_2)


def one_step(run, plan):
    """The student LoRA's gradient and the step's FLOPs under `plan`, from the same batch and draws each call."""
    model = run.accelerator.unwrap_model(run.model)
    batch = next(iter(make_loader(run.dataset, 2, 0, 1, seed=0)))
    generator = step_generator(run.cfg.seed, 0, 1, 0)
    z0 = encode_images(run, batch["pixels"], generator)
    cond, draws = encode_text(run, batch["captions"]), draw(z0, run.grid, run.cfg, generator)
    flops = count_flops(lambda: scott_backward(model, z0, cond, run.uncond, draws, plan=plan))
    grads = [p.grad.clone() for p in adapter_params(run.unet, STUDENT).values()]
    model.zero_grad(set_to_none=True)
    return torch.cat([g.flatten() for g in grads]), flops


def test_the_plans_weight_scales_the_generator_term_and_no_adversary_costs_an_lcm_like_step(
    tiny_teacher, tiny_data, tmp_path, tiny_config
):
    run = build(tiny_config(tiny_teacher, tiny_data, tmp_path / "adv", cache_latents=False, adv_decay_steps=2))
    (g0, off), (g2, half), (g4, full) = (one_step(run, StepPlan(w, False)) for w in (0.0, 0.2, 0.4))
    scale = g4.abs().max().item()  # cd + w * generator term: linear in w, to fp32 rounding
    torch.testing.assert_close(g2, (g0 + g4) / 2, rtol=0, atol=1e-5 * scale)
    assert (g4 - g0).abs().max() > 1e-2 * scale
    plain = build(tiny_config(tiny_teacher, tiny_data, tmp_path / "cd", cache_latents=False, adv_weight=0.0))
    _, cd_only = one_step(plain, None)
    _, decayed = one_step(run, step_plan(run.cfg, 2))  # past the decay: no estimate, no disc, no generator term
    assert decayed == off == cd_only and 0 < cd_only < half == full
    _, with_disc = one_step(run, step_plan(run.cfg, 0))
    assert with_disc > full


def test_save_steps_export_those_steps_and_the_last_is_the_final_lora(tiny_teacher, tiny_data, tmp_path, tiny_config):
    from scott_core import lora_format

    train(tiny_config(tiny_teacher, tiny_data, tmp_path, max_steps=3, save_steps="1,3", name="mine"))
    assert sorted(p.name for p in tmp_path.glob("mine_step*")) == ["mine_step0000001.safetensors",
                                                                  "mine_step0000003.safetensors"]
    last, meta = lora_format.read_safetensors(tmp_path / "mine_step0000003.safetensors")
    final, _ = lora_format.read_safetensors(tmp_path / "mine.safetensors")
    assert meta["scott.step"] == "3" and all(torch.equal(last[k], final[k]) for k in final)

