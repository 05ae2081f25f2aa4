"""The SCott iteration: both modes learn on a fixed batch, teacher = bare UNet, EMA = its formula."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from training.data.images import make_loader
from training.loop import build, train_step
from training.models.adapters import STUDENT, TARGET, adapter_params, ema_update, using


@pytest.fixture
def fixed_batch_run(tiny_teacher, tiny_data, tmp_path, request, tiny_config):
    cfg = tiny_config(tiny_teacher, tiny_data, tmp_path / "out", mode=request.param, lr=1e-3, batch_size=4,
                      cache_latents=False)  # the tests encode the batch's pixels themselves
    run = build(cfg)
    return run, next(iter(make_loader(run.dataset, 4, 0, 1, seed=0)))


@pytest.mark.parametrize("fixed_batch_run", ["scott", "lcm"], indirect=True)
def test_consistency_loss_falls_on_a_fixed_batch(fixed_batch_run):
    run, batch = fixed_batch_run
    # The same batch and the same draws (step 0's generator) every time: only the LoRA changes.
    cd = [train_step(run, [batch], step=0)["cd"] for _ in range(20)]
    assert cd[-1] < 0.7 * cd[0]
    assert sum(b < a for a, b in zip(cd, cd[1:])) >= 15


@pytest.mark.parametrize("fixed_batch_run", ["scott"], indirect=True)
def test_adversarial_terms_are_present_only_when_on(fixed_batch_run):
    run, batch = fixed_batch_run
    losses = train_step(run, [batch], step=0)
    assert {"cd", "adv_g", "disc", "loss"} <= set(losses)
    assert losses["loss"] != pytest.approx(losses["cd"])


def test_lcm_mode_has_no_discriminator(tiny_teacher, tiny_data, tmp_path, tiny_config):
    run = build(tiny_config(tiny_teacher, tiny_data, tmp_path / "out", mode="lcm"))
    assert run.accelerator.unwrap_model(run.model).head is None
    assert not any(".disc." in n for n, _ in run.unet.named_parameters())
    assert (run.cfg.solver, run.cfg.sub_steps, run.cfg.span, run.cfg.grid_spacing) == ("ode", 1, 20, 20)


@pytest.mark.parametrize("fixed_batch_run", ["scott"], indirect=True)
def test_teacher_pass_is_the_bare_unet(fixed_batch_run, tiny_teacher):
    run, batch = fixed_batch_run
    for _ in range(3):
        train_step(run, [batch], step=0)  # the student LoRA is now non-zero
    bare = UNet2DConditionModel.from_pretrained(str(tiny_teacher), subfolder="unet")
    unet = run.unet
    z, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([999, 400])
    c = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = bare(z, t, encoder_hidden_states=c).sample
        with using(unet, None):
            teacher = unet(z, t, encoder_hidden_states=c).sample
        with using(unet, STUDENT):
            student = unet(z, t, encoder_hidden_states=c).sample
    torch.testing.assert_close(teacher, expected, rtol=0, atol=0)
    assert (student - expected).abs().max() > 1e-4
    # Switching adapters leaves the trainable set as it was: student on, target off.
    assert all(p.requires_grad for p in adapter_params(unet, STUDENT).values())
    assert not any(p.requires_grad for p in adapter_params(unet, TARGET).values())


def test_ema_update_matches_its_formula(tiny_teacher, tiny_data, tmp_path, tiny_config):
    run = build(tiny_config(tiny_teacher, tiny_data, tmp_path / "out", mode="lcm", ema_decay=0.95))
    unet, generator = run.unet, torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in [*adapter_params(unet, STUDENT).values(), *adapter_params(unet, TARGET).values()]:
            p.copy_(torch.randn(p.shape, generator=generator))
    student = {n: p.clone() for n, p in adapter_params(unet, STUDENT).items()}
    target = {n: p.clone() for n, p in adapter_params(unet, TARGET).items()}
    ema_update(unet, 0.95)
    after = adapter_params(unet, TARGET)
    assert len(after) == len(student) > 0
    for name, value in student.items():
        tname = name.replace(".student.", ".target.")
        torch.testing.assert_close(after[tname], 0.95 * target[tname] + 0.05 * value, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(p, student[n]) for n, p in adapter_params(unet, STUDENT).items())


def test_gradient_checkpointing_gives_the_same_step(tiny_teacher, tiny_data, tmp_path, tiny_config):
    from training.checkpoint import trainable_state

    states = []
    for checkpointing in (False, True):
        cfg = tiny_config(
            tiny_teacher,
            tiny_data,
            tmp_path / str(checkpointing),
            gradient_checkpointing=checkpointing,
            lr=1e-3,
        )
        run = build(cfg)
        batch = next(iter(make_loader(run.dataset, 2, 0, 1, seed=0)))
        for step in range(2):
            train_step(run, [batch], step)
        states.append(trainable_state(run.accelerator.unwrap_model(run.model)))
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=1e-4, atol=1e-6, msg=key)


def test_bf16_keeps_the_base_in_bf16_and_the_adapters_in_fp32(tiny_teacher, tiny_data, tmp_path, tiny_config):
    run = build(tiny_config(tiny_teacher, tiny_data, tmp_path / "out", mixed_precision="bf16", lr=1e-3))
    batch = next(iter(make_loader(run.dataset, 2, 0, 1, seed=0)))
    losses = [train_step(run, [batch], step) for step in range(2)]
    assert all(torch.isfinite(torch.tensor(list(loss.values()))).all() for loss in losses)
    dtypes = {(".lora_" in n, p.dtype) for n, p in run.unet.named_parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    assert any(p.abs().max() > 0 for n, p in adapter_params(run.unet, STUDENT).items() if ".lora_B." in n)
