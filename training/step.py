"""One SCott training iteration (METHOD.md section 2), in phases: (a) the noisy latent, the teacher's solve, the
target and the student's clean estimate, all without grad; (b) the discriminator's hinge update on real vs the
detached estimate; (c) the student's update: consistency loss plus the weighted generator term, through the
frozen discriminator's gradient at the estimate. Each update has its own backward, so only one graph is alive.
Besides the losses the step reports how its discriminator fares: the margin mean D(real) - mean D(fake) and the
ratio of the adversarial to the consistency gradient at the student's output."""

from dataclasses import dataclass

import torch
from torch import nn

from scott_core.sampling import add_noise, consistency_denoiser
from scott_core.schedule import skip_timestep
from scott_core.solvers import KNOBS, solve

from .models.adapters import DISC, STUDENT, TARGET, frozen, using
from .models.conditioning import Conditioning
from .models.discriminator import unet_features
from .models.unet import guided_eps_fn, unet_eps_fn


@dataclass
class Draws:
    """The randomness of one iteration, all from one seeded generator (so a resumed run draws the same)."""

    t_n: torch.Tensor  # long [B]
    noise: torch.Tensor  # like z0
    w: torch.Tensor  # float [B]
    drop: torch.Tensor  # bool [B]: caption (hidden states and pooled embedding) replaced by the unconditional one
    generator: torch.Generator  # for the teacher's SDE noise
    disc_t: torch.Tensor | None = None  # --disc-renoise: the disc's own timestep [B] (a fresh draw) ...
    disc_noise: torch.Tensor | None = None  # ... and its own noise, like z0, the same for real and fake


@dataclass
class Estimate:
    """What phase (a) hands to the two updates: no tensor here carries a graph."""

    z0: torch.Tensor  # the clean latent (the discriminator's real sample)
    z_n: torch.Tensor  # z0 noised to t_n
    t_n: torch.Tensor
    cond: Conditioning  # the captions' conditioning after dropout
    f_target: torch.Tensor  # the target LoRA's f(z_m, t_m) after the teacher's solve t_n -> t_m
    fake: torch.Tensor | None  # the student's f(z_n, t_n) (None without the adversarial loss)
    disc_t: torch.Tensor | None = None  # --disc-renoise: the disc's timestep and noise (Draws')
    disc_noise: torch.Tensor | None = None


@dataclass(frozen=True)
class StepPlan:
    """What one optimiser step runs of the adversarial part: the generator term's weight (0: none) and whether the
    discriminator updates. The student's clean estimate is needed when either is on."""

    adv_weight: float
    disc_update: bool

    @property
    def needs_fake(self):
        return self.adv_weight > 0 or self.disc_update

    @property
    def load(self):
        """(disc updates, generator term on): how much of the adversarial part it runs, comparable with max."""
        return self.disc_update, self.adv_weight > 0


def adv_weight_at(cfg, step):
    """The generator term's weight at optimiser step `step` (from 0): 0 during --disc-head-warmup, else
    --adv-weight, falling linearly to 0 over the first --adv-decay-steps steps when that is set."""
    if step < cfg.disc_head_warmup:
        return 0.0
    if cfg.adv_decay_steps:
        return cfg.adv_weight * max(0.0, 1.0 - step / cfg.adv_decay_steps)
    return cfg.adv_weight


def step_plan(cfg, step):
    """The StepPlan of optimiser step `step` (from 0): nothing adversarial without --adv-weight or after
    --adv-decay-steps; the discriminator updates on the --disc-every-th steps (steps k, 2k, ... counted from 1)."""
    on = cfg.adv_weight > 0 and not (cfg.adv_decay_steps and step >= cfg.adv_decay_steps)
    return StepPlan(adv_weight_at(cfg, step) if on else 0.0, on and (step + 1) % cfg.disc_every == 0)


def peak_step(cfg):
    """The first optimiser step (from 0) whose StepPlan runs the most of the adversarial part, the disc update first,
    then the generator term: the step whose memory is the run's peak (0 without an adversary)."""
    return max(range(cfg.disc_head_warmup + cfg.disc_every), key=lambda s: step_plan(cfg, s).load)


DISC_SALT = 0x5C077D15C  # the disc's generator seed: the step generator's seed xor this


def draw(z0, grid, cfg, generator):
    """t_n uniform on the grid, noise ~ N(0, I), w ~ U[w_min, w_max], caption dropout ~ Bernoulli; with
    --disc-renoise also the disc's timestep (uniform on the grid) and noise, from a generator of their own seeded
    from `generator`'s seed, so that the step generator's stream (the teacher's SDE noise) stays as it was."""
    batch = z0.shape[0]
    t_n = grid[torch.randint(len(grid), (batch,), generator=generator)]
    noise = torch.randn(z0.shape, generator=generator, dtype=torch.float32).to(z0.device)
    w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(batch, generator=generator)
    drop = torch.rand(batch, generator=generator) < cfg.caption_dropout
    draws = Draws(t_n, noise, w, drop, generator)
    if cfg.disc_renoise:
        own = torch.Generator().manual_seed((generator.initial_seed() ^ DISC_SALT) % 2**63)
        draws.disc_t = grid[torch.randint(len(grid), (batch,), generator=own)]
        draws.disc_noise = torch.randn(z0.shape, generator=own, dtype=torch.float32).to(z0.device)
    return draws


def pseudo_huber(a, b, c):
    """mean(sqrt((a - b)^2 + c^2) - c)."""
    return (((a.float() - b.float()) ** 2 + c**2).sqrt() - c).mean()


def pseudo_huber_grad(a, b, c):
    """d pseudo_huber(a, b, c) / d a in closed form: (a - b) / sqrt((a - b)^2 + c^2) / a.numel()."""
    diff = a.float() - b.float()
    return diff / (diff**2 + c**2).sqrt() / diff.numel()


def hinge_d_loss(real, fake):
    """Hinge loss of the discriminator: mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))."""
    return torch.relu(1 - real).mean() + torch.relu(1 + fake).mean()


class SCottStep(nn.Module):
    """The SCott losses, one method per phase; forward(phase, ...) dispatches, so that DDP sees one forward
    before each backward. Teacher = the UNet with adapters disabled, student/target/disc = its adapters;
    head = the disc's logit."""

    def __init__(self, unet, cfg, alphas_cumprod, head=None):
        super().__init__()
        self.unet, self.head, self.cfg = unet, head, cfg
        self.register_buffer("alphas_cumprod", alphas_cumprod.double(), persistent=False)

    @property
    def adversarial(self):
        return self.head is not None and self.cfg.adv_weight > 0

    def forward(self, phase, *args):
        """Run one phase: 'estimate' (no grad), 'discriminator_loss' or 'student_loss'."""
        return getattr(self, phase)(*args)

    def consistency(self, z, t, c):
        """f(z, t) = c_skip z + c_out x0(z, eps(z, t, c)) of the active adapter (the LCM boundary condition)."""
        return consistency_denoiser(unet_eps_fn(self.unet, c), self.alphas_cumprod.cpu())(z, t)

    def teacher_eps_fn(self, cond, uncond, w):
        """eps_fn(z, t) of the guided teacher: (1 + w) eps(z, t, c) - w eps(z, t, u), one UNet call."""
        return guided_eps_fn(self.unet, cond, uncond, w)

    def discriminate(self, x, t, c):
        """One logit per sample: the UNet with the disc LoRA, its block features (--disc-features) into the head."""
        with using(self.unet, DISC):
            features = unet_features(self.unet, self.cfg.disc_features, x, t, c)
        return self.head(features)

    def renoised(self, x, est):
        """(The disc's input for a clean latent, its timestep): x told t_n, or (--disc-renoise) x noised to the
        disc's fresh timestep with its fresh noise, the same draw for real and fake, told that timestep."""
        if not self.cfg.disc_renoise:
            return x, est.t_n
        return add_noise(x, est.disc_noise, est.disc_t, self.alphas_cumprod.cpu()), est.disc_t

    @torch.no_grad()
    def estimate(self, z0, cond, uncond, draws, fake=True):
        """(a) z_n, the teacher's solve to t_m, the target f(z_m, t_m) and (if `fake` and adversarial) the student's
        f(z_n, t_n)."""
        cfg, ab = self.cfg, self.alphas_cumprod.cpu()
        uncond = uncond.like(cond)
        cond = cond.where(draws.drop, uncond)
        t_n, t_m = draws.t_n, skip_timestep(draws.t_n, cfg.span)
        z_n = add_noise(z0, draws.noise, t_n, ab)
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
                generator=draws.generator,
                **{knob: getattr(cfg, knob) for knob in KNOBS},
            )
        with using(self.unet, TARGET):
            f_target = self.consistency(z_m, t_m, cond)
        f_student = None
        if self.adversarial and fake:
            with using(self.unet, STUDENT):
                f_student = self.consistency(z_n, t_n, cond)
        return Estimate(z0, z_n, t_n, cond, f_target, f_student, draws.disc_t, draws.disc_noise)

    def discriminator_loss(self, est):
        """(b) The hinge loss on D(real) vs D(detached fake), whose gradient reaches only the disc; and the margin
        mean D(real) - mean D(fake) (detached)."""
        (real, t), (fake, _) = self.renoised(est.z0, est), self.renoised(est.fake, est)
        c = Conditioning.cat([est.cond, est.cond])
        d_real, d_fake = self.discriminate(torch.cat([real, fake]), torch.cat([t, t]), c).chunk(2)
        return hinge_d_loss(d_real, d_fake), (d_real.mean() - d_fake.mean()).detach()

    def generator_grad(self, est):
        """(adv_g, d adv_g / d fake) with adv_g = -mean D(fake), the discriminator frozen."""
        fake = est.fake.detach().requires_grad_(True)
        with torch.enable_grad(), frozen(self.unet, DISC, self.head):
            adv_g = -self.discriminate(*self.renoised(fake, est), est.cond).mean()
            (grad,) = torch.autograd.grad(adv_g, fake)
        return adv_g.detach(), grad

    def consistency_loss(self, est):
        """The pseudo-Huber consistency loss of the student's f(z_n, t_n) against the target; and f_student."""
        with using(self.unet, STUDENT):
            f_student = self.consistency(est.z_n, est.t_n, est.cond)
        return pseudo_huber(f_student, est.f_target, self.cfg.huber_c), f_student

    def student_loss(self, est, adv_weight=None):
        """(c) cd + adv_weight * adv_g as the student sees it: the generator term enters as <grad, f_student>,
        whose gradient is the generator term's through the student's output. adv_weight: the config's unless given
        (the step's plan: 0 during --disc-head-warmup or after --adv-decay-steps, no generator term). Returns
        (objective, logged losses), the logged ones with adv_cd_grad_ratio = ||adv_weight * d adv_g / df|| /
        ||d cd / df|| at the student's output f."""
        weight = self.cfg.adv_weight if adv_weight is None else adv_weight
        losses = {}
        if self.adversarial and weight > 0 and est.fake is not None:
            losses["adv_g"], grad = self.generator_grad(est)
        losses["cd"], f_student = self.consistency_loss(est)
        objective = losses["cd"]
        if "adv_g" in losses:
            objective = objective + weight * (f_student.float() * grad).sum()
            cd_grad = pseudo_huber_grad(f_student.detach(), est.f_target, self.cfg.huber_c)
            losses["adv_cd_grad_ratio"] = weight * grad.norm() / cd_grad.norm().clamp_min(1e-30)
        return objective, losses


def scott_backward(model, z0, cond, uncond, draws, backward=torch.Tensor.backward, plan=None):
    """The phased iteration the loop runs: (a) estimate, (b) disc backward, (c) student backward; `model` is the
    SCottStep or its DDP wrapper, `backward` the accelerator's; plan: the step's StepPlan (default: the full step,
    the config's weight with the disc updating), which says whether (b) runs and the generator term's weight in
    (c). Returns the losses (detached): 'loss' is cd + weight * adv_g (+ disc when it updates); with the disc update
    also 'disc' and 'disc_margin', with the generator term 'adv_cd_grad_ratio', which 'loss' leaves out."""
    cfg = model_cfg(model)
    plan = plan or StepPlan(cfg.adv_weight, cfg.adv_weight > 0)
    with torch.no_grad():
        est = model("estimate", z0, cond, uncond, draws, plan.needs_fake)
    losses = {}
    if est.fake is not None and plan.disc_update:
        disc, margin = model("discriminator_loss", est)
        backward(disc)
        losses["disc"], losses["disc_margin"] = disc.detach(), margin
        del disc  # the disc's graph is freed before the student's is built
    objective, logged = model("student_loss", est, plan.adv_weight)
    backward(objective)
    losses.update({k: v.detach() for k, v in logged.items()})
    losses["loss"] = losses["cd"] + plan.adv_weight * losses.get("adv_g", 0.0) + losses.get("disc", 0.0)
    return losses


def model_cfg(model):
    """The config of a SCottStep, DDP-wrapped or not."""
    return getattr(model, "module", model).cfg
