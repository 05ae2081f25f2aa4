"""The discriminator's diagnostics (hinge, margin, adversarial / consistency gradient ratio) against independent
recomputations; --disc-renoise's fresh, paired draws; --disc-features down_mid's features, LoRA and cost;
--disc-head-warmup."""

import logging

import pytest
import torch

from scott_core.schedule import alpha_sigma, append_dims
from training import checkpoint
from training.data.images import make_loader
from training.encode import encode_images, encode_text
from training.loop import build, step_generator, train, train_step
from training.memory import count_flops
from training.models.adapters import DISC, STUDENT, adapter_params, using
from training.models.conditioning import Conditioning
from training.models.discriminator import unet_features
from training.step import draw, hinge_d_loss, pseudo_huber, pseudo_huber_grad, scott_backward


@pytest.fixture(params=[{}, {"disc_renoise": True, "disc_features": "down_mid"}], ids=["clean-up", "renoise-down_mid"])
def trained_run(tiny_teacher, tiny_data, tmp_path, tiny_config, request):
    cfg = tiny_config(tiny_teacher, tiny_data, tmp_path / "out", lr=1e-3, batch_size=4, **request.param,
                      cache_latents=False)  # the tests encode the batch's pixels themselves
    run = build(cfg)
    batch = next(iter(make_loader(run.dataset, 4, 0, 1, seed=0)))
    train_step(run, [batch], step=0)  # non-zero LoRAs and a trained head
    return run, batch


def inputs(run, batch, step=1):
    """z0, cond and the Draws of one step: the same values on every call."""
    generator = step_generator(run.cfg.seed, 0, step, 0)
    z0 = encode_images(run, batch["pixels"], generator)
    return z0, encode_text(run, batch["captions"]), draw(z0, run.grid, run.cfg, generator)


def disc_input(x, draws, t_n, ab):
    """The disc's input and timestep, written out: x at t_n, or x noised with the disc's own draws."""
    if draws.disc_t is None:
        return x, t_n
    alpha, sigma = (append_dims(v.float(), x.ndim) for v in alpha_sigma(draws.disc_t, ab))
    return alpha * x + sigma * draws.disc_noise, draws.disc_t


def step_losses(run, batch):
    """scott_backward's logged losses, the estimate behind them and the model; gradients cleared after."""
    model = run.accelerator.unwrap_model(run.model)
    z0, cond, draws = inputs(run, batch)
    losses = scott_backward(model, z0, cond, run.uncond, draws)
    model.zero_grad(set_to_none=True)
    z0, cond, draws = inputs(run, batch)
    with torch.no_grad():
        est = model.estimate(z0, cond, run.uncond, draws)
    return model, losses, est, draws


def test_margin_and_hinge_equal_a_recomputation_from_separate_disc_passes(trained_run):
    run, batch = trained_run
    model, losses, est, draws = step_losses(run, batch)
    ab = model.alphas_cumprod.cpu()
    with torch.no_grad():
        d_real = model.discriminate(*disc_input(est.z0, draws, est.t_n, ab), est.cond)
        d_fake = model.discriminate(*disc_input(est.fake, draws, est.t_n, ab), est.cond)
    assert losses["disc_margin"].item() == pytest.approx((d_real.mean() - d_fake.mean()).item(), rel=1e-4, abs=1e-6)
    assert losses["disc"].item() == pytest.approx(hinge_d_loss(d_real, d_fake).item(), rel=1e-5)
    assert abs(losses["disc_margin"].item()) > 1e-6  # the trained disc tells them apart a little
    assert losses["loss"].item() == pytest.approx(
        (losses["cd"] + run.cfg.adv_weight * losses["adv_g"] + losses["disc"]).item(), rel=1e-6
    )


def test_gradient_ratio_equals_brute_force_autograd_at_the_student_output(trained_run):
    run, batch = trained_run
    model, losses, est, draws = step_losses(run, batch)
    with torch.no_grad(), using(run.unet, STUDENT):
        f = model.consistency(est.z_n, est.t_n, est.cond)
    f = f.detach().requires_grad_(True)
    (g_cd,) = torch.autograd.grad(pseudo_huber(f, est.f_target, run.cfg.huber_c), f)
    adv_g = -model.discriminate(*disc_input(f, draws, est.t_n, model.alphas_cumprod.cpu()), est.cond).mean()
    (g_adv,) = torch.autograd.grad(adv_g, f)
    expected = (run.cfg.adv_weight * g_adv).norm() / g_cd.norm()
    assert losses["adv_cd_grad_ratio"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert expected > 0
    torch.testing.assert_close(pseudo_huber_grad(f.detach(), est.f_target, run.cfg.huber_c), g_cd)


def test_renoise_draws_fresh_paired_noise_and_timestep_and_leave_the_step_stream_alone(tiny_config, tiny_teacher):
    grid = torch.arange(999, 0, -8)
    z0 = torch.randn(64, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    on = tiny_config(tiny_teacher, "d", "o", disc_renoise=True)
    off = tiny_config(tiny_teacher, "d", "o")
    a, b = step_generator(0, 0, 5, 0), step_generator(0, 0, 5, 0)
    with_disc, without = draw(z0, grid, on, a), draw(z0, grid, off, b)
    for name in ("t_n", "noise", "w", "drop"):
        assert torch.equal(getattr(with_disc, name), getattr(without, name)), name
    assert torch.equal(torch.randn(8, generator=a), torch.randn(8, generator=b))  # the teacher's SDE noise after
    assert without.disc_t is None and without.disc_noise is None
    assert not torch.equal(with_disc.disc_t, with_disc.t_n) and set(with_disc.disc_t.tolist()) <= set(grid.tolist())
    assert (with_disc.disc_noise - with_disc.noise).abs().min() > 0  # fresh noise, not the student's
    again = draw(z0, grid, on, step_generator(0, 0, 5, 0))
    assert torch.equal(again.disc_t, with_disc.disc_t) and torch.equal(again.disc_noise, with_disc.disc_noise)
    other_step = draw(z0, grid, on, step_generator(0, 0, 6, 0))
    assert not torch.equal(other_step.disc_noise, with_disc.disc_noise)


@pytest.mark.parametrize("trained_run", [{"disc_renoise": True}], indirect=True, ids=["renoise"])
def test_renoised_real_is_not_z_n_and_the_disc_is_told_the_fresh_timestep(trained_run, monkeypatch):
    run, batch = trained_run
    model = run.accelerator.unwrap_model(run.model)
    z0, cond, draws = inputs(run, batch)
    with torch.no_grad():
        est = model.estimate(z0, cond, run.uncond, draws)
    (real, t_real), (fake, t_fake) = model.renoised(est.z0, est), model.renoised(est.fake, est)
    assert (real - est.z_n).abs().max() > 1e-3  # the old bug: real was exactly z_n
    assert torch.equal(t_real, draws.disc_t) and torch.equal(t_fake, draws.disc_t)
    alpha = append_dims(alpha_sigma(draws.disc_t, model.alphas_cumprod.cpu())[0].float(), 4)
    torch.testing.assert_close(real - fake, alpha * (est.z0 - est.fake))  # paired: the same noise on both
    told, real_discriminate = [], type(model).discriminate

    def recording(self, x, t, c):
        told.append(t)
        return real_discriminate(self, x, t, c)

    monkeypatch.setattr(type(model), "discriminate", recording)
    scott_backward(model, *inputs(run, batch)[:2], run.uncond, inputs(run, batch)[2])
    assert len(told) == 2 and torch.equal(told[0], torch.cat([draws.disc_t, draws.disc_t]))
    assert torch.equal(told[1], draws.disc_t)


def manual_down_mid(unet, x, t, cond):
    """diffusers' UNet2DConditionModel.forward up to the mid block, written out: the features down_mid pools."""
    emb = unet.time_embedding(unet.time_proj(t.expand(x.shape[0])).to(x.dtype))
    h, features = unet.conv_in(x), []
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=cond.states)
        else:
            h, _ = block(hidden_states=h, temb=emb)
        features.append(h)
    features.append(unet.mid_block(h, emb, encoder_hidden_states=cond.states))
    return features


def disc_run(tiny_teacher, tiny_data, tmp_path, tiny_config, features):
    run = build(tiny_config(tiny_teacher, tiny_data, tmp_path / features, disc_features=features))
    return run, run.accelerator.unwrap_model(run.model)


def test_down_mid_features_lora_and_head_are_the_down_and_mid_blocks(tiny_teacher, tiny_data, tmp_path, tiny_config):
    run, model = disc_run(tiny_teacher, tiny_data, tmp_path, tiny_config, "down_mid")
    unet = run.unet
    names = list(adapter_params(unet, DISC))
    assert names and all(n.startswith(("down_blocks.", "mid_block.")) for n in names)
    assert any(n.startswith("mid_block.") for n in names)
    with torch.no_grad():
        for p in adapter_params(unet, DISC).values():  # a non-zero disc LoRA, so "its adapter is on" shows
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([700, 50])
    cond = Conditioning(torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2)))
    ran_up = []
    hooks = [b.register_forward_hook(lambda *_: ran_up.append(1)) for b in unet.up_blocks]
    with torch.no_grad(), using(unet, DISC):
        got = unet_features(unet, "down_mid", x, t, cond)
        expected = manual_down_mid(unet, x, t, cond)
    for hook in hooks:
        hook.remove()
    assert not ran_up  # the pass stopped after the mid block
    assert [f.shape[1] for f in got] == [32, 64, 64] == [f.shape[1] for f in expected]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model.discriminate(x, t, cond), model.head(expected), rtol=1e-5, atol=1e-6)
        with using(unet, STUDENT):  # the disc's LoRA really is in the features
            assert (unet_features(unet, "down_mid", x, t, cond)[-1] - got[-1]).abs().max() > 1e-4
    assert model.head.mlp[0].in_features == 32 + 64 + 64


def test_a_down_mid_disc_pass_costs_less_than_an_up_pass(tiny_teacher, tiny_data, tmp_path, tiny_config):
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([700, 50])
    cond = Conditioning(torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2)))
    cost = {}
    for features in ("up", "down_mid"):
        _, model = disc_run(tiny_teacher, tiny_data, tmp_path, tiny_config, features)
        with torch.no_grad():
            cost[features] = count_flops(lambda m=model: m.discriminate(x, t, cond))
    assert 0 < cost["down_mid"] < 0.6 * cost["up"], cost


def student_and_disc(output, step):
    state = checkpoint_tensors(output, step)
    return {k: v for k, v in state.items() if ".student." in k}, {k: v for k, v in state.items() if ".disc." in k}


def checkpoint_tensors(output, step):
    from safetensors.torch import load_file

    return load_file(str(output / "checkpoints" / f"step_{step:07d}" / checkpoint.WEIGHTS))


def test_head_warmup_trains_only_the_disc_and_the_log_shows_its_diagnostics(
    tiny_teacher, tiny_data, tmp_path, tiny_config, caplog
):
    common = dict(max_grad_norm=0.0, checkpoint_every=2, log_every=1)
    with caplog.at_level(logging.INFO, logger="training"):
        train(tiny_config(tiny_teacher, tiny_data, tmp_path / "warm", max_steps=3, disc_head_warmup=2, **common))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 1", "step 2", "step 3"]
    for line in lines:
        assert "disc=" in line and "disc_margin=" in line
    assert ["adv_cd_grad_ratio=" in line for line in lines] == [False, False, True]
    train(tiny_config(tiny_teacher, tiny_data, tmp_path / "cd", max_steps=2, adv_weight=0.0, **common))
    warm_student, warm_disc = student_and_disc(tmp_path / "warm", 2)
    cd_student, cd_disc = student_and_disc(tmp_path / "cd", 2)
    assert not cd_disc and warm_disc.keys() and warm_student.keys() == cd_student.keys()
    for key in warm_student:  # during warm-up the student learns from the consistency loss alone
        torch.testing.assert_close(warm_student[key], cd_student[key], rtol=1e-5, atol=1e-7)
    assert any(v.abs().max() > 0 for k, v in warm_disc.items() if ".lora_B." in k)  # while the disc trains


def test_disc_lr_zero_freezes_the_discriminator_but_not_the_student(tiny_teacher, tiny_data, tmp_path, tiny_config):
    """--disc-lr 0 (the world report's adv_frozen control): the disc LoRA and head keep their initial weights while
    the student still learns from the consistency and the (frozen) adversarial terms."""
    train(tiny_config(tiny_teacher, tiny_data, tmp_path / "frozen", max_steps=2, checkpoint_every=1, disc_lr=0.0))
    first, second = checkpoint_tensors(tmp_path / "frozen", 1), checkpoint_tensors(tmp_path / "frozen", 2)
    disc = [k for k in second if ".disc." in k or k.startswith("head.")]
    assert any(k.startswith("head.") for k in disc) and any(".lora_B." in k for k in disc)
    for key in disc:
        torch.testing.assert_close(second[key], first[key], rtol=0, atol=0)
        if ".lora_B." in key:
            assert not second[key].any(), key  # zero-initialised, never updated
    student = [k for k in second if ".student." in k and ".lora_B." in k]
    assert any(not torch.equal(second[k], first[k]) for k in student)
