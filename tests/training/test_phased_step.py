"""The phased step (estimate, disc backward, student backward) gives today's single-backward gradients, with and
without gradient checkpointing (the disc's recompute runs under the disc's adapter)."""

import pytest
import torch

from scott_core.schedule import alpha_sigma, append_dims, skip_timestep
from scott_core.solvers import solve
from training.data.images import make_loader
from training.encode import batch_latents
from training.loop import build, step_generator, train_step
from training.memory import count_flops
from training.models.adapters import DISC, STUDENT, TARGET, adapter_params, enable_checkpointing, using
from training.models.conditioning import Conditioning
from training.step import draw, hinge_d_loss, pseudo_huber, scott_backward


def single_backward_loss(model, z0, cond, uncond, draws):
    """The step as it was before the phases (reference only): every graph alive at one backward, the generator
    term's gradient into the disc cancelled by a detached copy of the same term."""
    cfg, ab = model.cfg, model.alphas_cumprod.cpu()
    uncond = uncond.like(cond)
    cond = cond.where(draws.drop, uncond)
    t_n, t_m = draws.t_n, skip_timestep(draws.t_n, cfg.span)
    alpha, sigma = (append_dims(v.to(z0.dtype), z0.ndim) for v in alpha_sigma(t_n, ab))
    z_n = alpha * z0 + sigma * draws.noise
    with torch.no_grad():
        with using(model.unet, None):
            z_m = solve(
                model.teacher_eps_fn(cond, uncond, draws.w), z_n, t_n, t_m, ab, solver=cfg.solver,
                sub_steps=cfg.sub_steps, noise_strength=cfg.noise_strength, generator=draws.generator,
            )
        with using(model.unet, TARGET):
            f_target = model.consistency(z_m, t_m, cond)
    with using(model.unet, STUDENT):
        f_student = model.consistency(z_n, t_n, cond)
    cd = pseudo_huber(f_student, f_target, cfg.huber_c)
    real, fake, t_d = z0, f_student, t_n
    if cfg.disc_renoise:  # fresh noise at a fresh timestep, the same for real and fake
        a_d, s_d = (append_dims(v.to(z0.dtype), z0.ndim) for v in alpha_sigma(draws.disc_t, ab))
        real, fake, t_d = a_d * real + s_d * draws.disc_noise, a_d * fake + s_d * draws.disc_noise, draws.disc_t
    d_real, d_fake_detached = model.discriminate(
        torch.cat([real, fake.detach()]), torch.cat([t_d, t_d]), Conditioning.cat([cond, cond])
    ).chunk(2)
    d_fake = model.discriminate(fake, t_d, cond)
    adv_g, disc = -d_fake.mean(), hinge_d_loss(d_real, d_fake_detached)
    return cd + cfg.adv_weight * (adv_g + d_fake_detached.mean()) + disc, cd


TEACHERS = {"sd15": "tiny_teacher", "sdxl": "tiny_xl_teacher"}
DISC_OPTIONS = [
    ("sd15", {}), ("sd15", {"disc_renoise": True}), ("sd15", {"disc_renoise": True, "disc_features": "down_mid"}),
    ("sdxl", {}),
]


@pytest.fixture(params=DISC_OPTIONS, ids=["clean", "renoise", "renoise-down_mid", "sdxl-clean"])
def trained_run(tiny_data, tmp_path, tiny_config, request):
    family, options = request.param
    teacher = request.getfixturevalue(TEACHERS[family])
    cfg = tiny_config(teacher, tiny_data, tmp_path / "out", lr=1e-3, batch_size=4, **options,
                      cache_latents=False)  # the tests encode the batch's pixels themselves
    run = build(cfg)
    batch = next(iter(make_loader(run.dataset, 4, 0, 1, seed=0)))
    train_step(run, [batch], step=0)  # non-zero LoRAs, so every gradient below is non-trivial
    return run, batch


def inputs(run, batch):
    """z0, cond and a fresh Draws from one seeded generator: the same values on every call."""
    generator = step_generator(0, 0, 1, 0)
    z0, cond = batch_latents(run, batch, generator)
    return z0, cond, draw(z0, run.grid, run.cfg, generator)


def phased_grads(run, batch, params):
    model = run.accelerator.unwrap_model(run.model)
    model.zero_grad(set_to_none=True)
    losses = scott_backward(model, *inputs(run, batch)[:2], run.uncond, inputs(run, batch)[2])
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    return grads, losses


def trainable(run):
    model = run.accelerator.unwrap_model(run.model)
    student = list(adapter_params(run.unet, STUDENT).values())
    return model, student, list(adapter_params(run.unet, DISC).values()) + list(model.head.parameters())


def test_phased_gradients_equal_the_single_backward_gradients(trained_run):
    run, batch = trained_run
    model, student, disc = trainable(run)
    z0, cond, draws = inputs(run, batch)
    loss, cd = single_backward_loss(model, z0, cond, run.uncond, draws)
    expected = torch.autograd.grad(loss, student + disc, retain_graph=True, allow_unused=True)
    cd_only = torch.autograd.grad(cd, student)
    got, losses = phased_grads(run, batch, student + disc)
    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, torch.zeros_like(g) if e is None else e, rtol=1e-4, atol=1e-7)
    assert losses["cd"] == pytest.approx(cd.item(), rel=1e-6)
    # Both updates are non-trivial: the disc moves, and the generator term changes the student's gradient.
    assert any(g.abs().max() > 0 for g in got[len(student):])
    assert any((g - c).abs().max() > 1e-6 for g, c in zip(got, cd_only))


def test_checkpointing_gives_the_same_gradients_in_every_pass(trained_run):
    run, batch = trained_run
    _, student, disc = trainable(run)
    plain, _ = phased_grads(run, batch, student + disc)
    enable_checkpointing(run.unet)
    try:
        recomputed, _ = phased_grads(run, batch, student + disc)
    finally:
        run.unet.disable_gradient_checkpointing()
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert any(g.abs().max() > 0 for g in recomputed[len(student):])


def test_phased_step_costs_at_most_one_more_no_grad_student_forward(trained_run):
    run, batch = trained_run
    model = run.accelerator.unwrap_model(run.model)
    z0, cond, draws = inputs(run, batch)
    reference = count_flops(lambda: single_backward_loss(model, z0, cond, run.uncond, draws)[0].backward())
    z0, cond, draws = inputs(run, batch)
    phased = count_flops(lambda: scott_backward(model, z0, cond, run.uncond, draws))
    model.zero_grad(set_to_none=True)
    t = draws.t_n

    def student_forward():
        with torch.no_grad(), using(run.unet, STUDENT):
            model.consistency(z0, t, cond)

    assert reference < phased <= reference + count_flops(student_forward)
