"""One SCott training iteration (METHOD.md section 2): teacher solve, target, student, adversarial terms."""

from dataclasses import dataclass

import torch
from torch import nn

from scott_core.consistency import consistency_function, x0_from_eps
from scott_core.schedule import alpha_sigma, append_dims, skip_timestep
from scott_core.solvers import cfg_combine, solve

from .models import DISC, STUDENT, TARGET, capture_up_blocks, using, without_checkpointing


@dataclass
class Draws:
    """The randomness of one iteration, all from one seeded generator (so a resumed run draws the same)."""

    t_n: torch.Tensor  # long [B]
    noise: torch.Tensor  # like z0
    w: torch.Tensor  # float [B]
    drop: torch.Tensor  # bool [B]: caption replaced by the empty caption
    generator: torch.Generator  # for the teacher's SDE noise


def draw(z0, grid, cfg, generator):
    """t_n uniform on the grid, noise ~ N(0, I), w ~ U[w_min, w_max], caption dropout ~ Bernoulli."""
    batch = z0.shape[0]
    t_n = grid[torch.randint(len(grid), (batch,), generator=generator)]
    noise = torch.randn(z0.shape, generator=generator, dtype=torch.float32).to(z0.device)
    w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(batch, generator=generator)
    drop = torch.rand(batch, generator=generator) < cfg.caption_dropout
    return Draws(t_n, noise, w, drop, generator)


def pseudo_huber(a, b, c):
    """mean(sqrt((a - b)^2 + c^2) - c)."""
    return (((a.float() - b.float()) ** 2 + c**2).sqrt() - c).mean()


def hinge_d_loss(real, fake):
    """Hinge loss of the discriminator: mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))."""
    return torch.relu(1 - real).mean() + torch.relu(1 + fake).mean()


class SCottStep(nn.Module):
    """The whole loss of one iteration in one forward, so that DDP sees one forward and one backward.

    Teacher = the UNet with adapters disabled, student/target/disc = its adapters; head = the disc's logit.
    """

    def __init__(self, unet, cfg, alphas_cumprod, head=None):
        super().__init__()
        self.unet, self.head, self.cfg = unet, head, cfg
        self.register_buffer("alphas_cumprod", alphas_cumprod.double(), persistent=False)

    def eps(self, z, t, c):
        """The UNet's eps prediction (float32) with whatever adapter is active."""
        return self.unet(z, t.to(z.device), encoder_hidden_states=c).sample.float()

    def consistency(self, z, t, c):
        """f(z, t) = c_skip z + c_out x0(z, eps(z, t, c)) (the LCM boundary condition)."""
        alpha, sigma = alpha_sigma(t.cpu(), self.alphas_cumprod.cpu())
        x0 = x0_from_eps(z, self.eps(z, t, c), alpha, sigma)
        return consistency_function(z, x0, t.cpu())

    def teacher_eps_fn(self, cond, uncond, w):
        """eps_fn(z, t) of the guided teacher: (1 + w) eps(z, t, c) - w eps(z, t, u), one UNet call."""

        def eps_fn(z, t):
            e_cond, e_uncond = self.eps(
                torch.cat([z, z]), torch.cat([t, t]), torch.cat([cond, uncond])
            ).chunk(2)
            return cfg_combine(e_cond, e_uncond, w.to(z.device))

        return eps_fn

    def discriminate(self, x, t, c):
        """One logit per sample: the UNet with the disc LoRA, its up-block features into the head."""
        with (
            using(self.unet, DISC),
            without_checkpointing(self.unet),
            capture_up_blocks(self.unet) as features,
        ):
            self.unet(x, t.to(x.device), encoder_hidden_states=c)
        return self.head(features)

    def forward(self, z0, cond, uncond, draws):
        cfg, ab = self.cfg, self.alphas_cumprod.cpu()
        uncond = uncond.expand_as(cond)
        cond = torch.where(append_dims(draws.drop.to(cond.device), cond.ndim), uncond, cond)
        t_n, t_m = draws.t_n, skip_timestep(draws.t_n, cfg.span)
        alpha, sigma = (append_dims(v.to(z0.device, z0.dtype), z0.ndim) for v in alpha_sigma(t_n, ab))
        z_n = alpha * z0 + sigma * draws.noise
        with torch.no_grad():
            with using(self.unet, None):
                eps_fn = self.teacher_eps_fn(cond, uncond, draws.w)
                z_m = solve(
                    eps_fn,
                    z_n,
                    t_n,
                    t_m,
                    ab,
                    solver=cfg.solver,
                    sub_steps=cfg.sub_steps,
                    eta=cfg.eta,
                    noise_strength=cfg.noise_strength,
                    generator=draws.generator,
                )
            with using(self.unet, TARGET):
                f_target = self.consistency(z_m, t_m, cond)
        with using(self.unet, STUDENT):
            f_student = self.consistency(z_n, t_n, cond)
        losses = {"cd": pseudo_huber(f_student, f_target, cfg.huber_c)}
        loss = losses["cd"]
        if cfg.adv_weight > 0:
            real, fake = z0, f_student
            if cfg.disc_renoise:
                real, fake = alpha * real + sigma * draws.noise, alpha * fake + sigma * draws.noise
            d_real, d_fake_detached = self.discriminate(
                torch.cat([real, fake.detach()]), torch.cat([t_n, t_n]), torch.cat([cond, cond])
            ).chunk(2)
            d_fake = self.discriminate(fake, t_n, cond)
            losses["adv_g"] = -d_fake.mean()
            losses["disc"] = hinge_d_loss(d_real, d_fake_detached)
            # The generator term's gradient reaches the disc's weights too; the detached copy of the same term
            # cancels it there exactly (same values, opposite sign) and gives the student nothing.
            loss = loss + cfg.adv_weight * (losses["adv_g"] + d_fake_detached.mean()) + losses["disc"]
        losses["loss"] = loss
        return losses
