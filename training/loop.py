"""The training loop on accelerate: build the run, then step, log, checkpoint, validate, export."""

import importlib.util
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from scott_core.schedule import alphas_cumprod, training_grid

from . import checkpoint
from .config import DistillConfig, UserError
from .data.buckets import bucket_report
from .data.cache import CachedPairs, Encoders, encoder_id, fill, text_key
from .data.holdout import Holdout
from .data.images import PairDataset, epoch_batches, make_loader
from .data.prepare import synthetic_dataset, training_data
from .data.skips import SKIPPED, Skipped, read_drawn
from .encode import batch_latents, encode_moments, encode_text, encode_uncond
from .errors import DataError
from .export import export_lora
from .keep_best import Judges, KeepBest, check_judges, score_line, student_scores
from .keep_best import prepare as prepare_validation
from .memory import OutOfMemory, out_of_memory_message
from .models.adapters import DISC, STUDENT, add_adapters, ema_update, enable_checkpointing
from .models.discriminator import DiscriminatorHead, feature_channels
from .models.teacher import Teacher, check_teacher_path, load_teacher, on_device
from .runfile import RUN_FILE, write_run_file
from .step import SCottStep, draw, scott_backward, step_plan
from .validation import read_prompts, validation_grid

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger("training")

MIN_EMPTY_DRAWS = 100  # empty micro-batches in a row (or one epoch's, if more) that stop a run which cannot read data


class TrainingDiverged(UserError):
    """The loss went NaN or inf: training stops, the last good checkpoint stays."""


@dataclass
class Run:
    """Everything one run holds: the accelerator, the prepared SCott model and optimiser, the encoders."""

    cfg: DistillConfig
    accelerator: "Accelerator"
    model: torch.nn.Module  # SCottStep, wrapped by accelerate.prepare (DDP under several processes)
    optimizer: torch.optim.Optimizer  # accelerate's AcceleratedOptimizer over AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    teacher: Teacher
    dataset: PairDataset  # or cache.CachedPairs over it (--cache-latents)
    grid: torch.Tensor
    uncond: torch.Tensor | None
    skips: Skipped  # every input not trained on (this process's draws), for <output>/skipped.txt
    holdout: Holdout | None = None  # what keep-best scores and training never sees

    @property
    def unet(self):
        return self.accelerator.unwrap_model(self.model).unet


def step_generator(seed, rank, step, micro):
    """The generator of one micro-batch's randomness: a pure function of (seed, rank, step, micro)."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 1_000_003 + step) * 64 + micro)


def weight_dtype(mixed_precision, device):
    """dtype of the frozen base weights: bf16 under bf16 autocast, fp16 under fp16 on CUDA (CPU autocast has
    no fp16), else fp32. The LoRA weights stay fp32."""
    if mixed_precision == "bf16" or (mixed_precision == "fp16" and device.type == "cuda"):
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
    return torch.float32


def make_accelerator(cfg, estimate=False):
    """The run's Accelerator: cfg's precision and accumulation, TensorBoard under <output>/logs when installed;
    estimate: the memory estimate's, on the CPU and leaving its fake tensors where they are."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    output = Path(cfg.output)
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    return Accelerator(
        cpu=estimate,
        device_placement=not estimate,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with="tensorboard" if tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(output / "logs")),
        # The phased step: the disc's backward leaves the student's LoRA unused and the student's the disc's.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.adv_weight > 0)],
    )


def step_model(cfg, teacher):
    """The SCottStep on the teacher's UNet: student/target/disc LoRAs, gradient checkpointing, the disc's head."""
    from accelerate.utils import set_seed

    unet = teacher.unet
    set_seed(cfg.seed)  # LoRA A and head initialisation (the same on every process)
    adversarial = cfg.adv_weight > 0
    add_adapters(unet, cfg.lora_rank, cfg.lora_alpha, cfg.disc_lora_rank if adversarial else None, cfg.disc_features)
    if cfg.gradient_checkpointing:
        enable_checkpointing(unet)
    head = DiscriminatorHead(feature_channels(unet, cfg.disc_features)) if adversarial else None
    return SCottStep(unet, cfg, alphas_cumprod(), head)


def optimise(cfg, accelerator, model):
    """(model, optimizer, scheduler): AdamW over two groups (the student's LoRA at --lr; the disc's LoRA and head at
    --disc-lr), the warm-up schedule; prepared by accelerate, with the checkpoint hooks registered."""
    unet = model.unet
    groups = [{"params": [p for n, p in unet.named_parameters() if f".{STUDENT}." in n], "lr": cfg.lr}]
    if model.head is not None:
        disc = [p for n, p in unet.named_parameters() if f".{DISC}." in n] + list(model.head.parameters())
        groups.append({"params": disc, "lr": cfg.disc_lr})
    optimizer = torch.optim.AdamW(groups)
    warmup = max(cfg.lr_warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    checkpoint.register_hooks(accelerator)
    return model, optimizer, scheduler


def build(cfg):
    """Accelerator, data (less what keep-best withholds), teacher + adapters + head, optimiser: a run ready at
    step 0."""
    accelerator, output = make_accelerator(cfg), Path(cfg.output)
    check_teacher_path(cfg.teacher, cfg.trust_ckpt)  # the cheap checks first: the teacher's kind, then the data
    cfg.source.check()  # a missing folder or shard, a bad prompt file: fails here, before any model loads
    checkpoint.check_resume_data(cfg)
    check_judges(cfg)  # --inception / --clip files
    dataset, prompts, holdout = training_data(cfg, accelerator)
    if dataset is not None and dataset.bucketed and accelerator.is_main_process:
        log.info(bucket_report(dataset.groups()))
    teacher = load_teacher(
        cfg.teacher, cfg.trust_ckpt, dtype=weight_dtype(cfg.mixed_precision, accelerator.device)
    )
    if dataset is None:
        dataset = synthetic_dataset(cfg, accelerator, teacher, prompts)
    model, optimizer, scheduler = optimise(cfg, accelerator, step_model(cfg, teacher))
    for module in (teacher.vae, *teacher.text_encoders):
        module.to(accelerator.device)
    run = Run(
        cfg,
        accelerator,
        model,
        optimizer,
        scheduler,
        teacher,
        dataset,
        training_grid(cfg.grid_spacing),
        None,
        Skipped(output / SKIPPED, dataset.skips + dataset.undrawn(cfg.batch_size * accelerator.num_processes)),
        holdout,
    )
    if cfg.cache_latents:
        run.dataset = cache_latents(run)
        run.uncond = teacher.family.uncond(run.dataset.uncond().to(accelerator.device))
    else:
        run.uncond = encode_uncond(run)
    return run


def cache_latents(run):
    """Fill <output>/cache (each process its shard), then serve the dataset from it; the VAE and text encoders
    leave the GPU."""
    accelerator, cfg, teacher = run.accelerator, run.cfg, run.teacher
    root = Path(cfg.output) / "cache"
    encoders = Encoders(latents=lambda pixels: encode_moments(run, pixels), text=lambda c: encode_text(run, c, False))
    encoder = encoder_id(teacher.sha256, teacher.vae.dtype, *(module.dtype for module in teacher.text_encoders))
    filled = fill(
        run.dataset, encoder, root, encoders, accelerator.process_index, accelerator.num_processes, cfg.batch_size
    )
    run.skips.add(filled.unreadable)
    accelerator.wait_for_everyone()
    log.info("latent cache %s: rank %d encoded %d new entries", root, accelerator.process_index, filled.made)
    for module in (teacher.vae, *teacher.text_encoders):
        module.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return CachedPairs(run.dataset, root, filled.latent_keys, filled.text_keys, text_key(encoder, ""))


def train_step(run, batches, step):
    """One optimiser step over len(batches) micro-batches; returns the last micro-batch's losses."""
    accelerator, cfg = run.accelerator, run.cfg
    for micro, batch in enumerate(batches):
        generator = step_generator(cfg.seed, accelerator.process_index, step, micro)
        with accelerator.accumulate(run.model):
            z0, cond = batch_latents(run, batch, generator)
            draws = draw(z0, run.grid, cfg, generator)
            losses = scott_backward(run.model, z0, cond, run.uncond, draws, accelerator.backward, step_plan(cfg, step))
            finite = torch.tensor([float(torch.isfinite(losses["loss"]).item())], device=accelerator.device)
            if accelerator.reduce(finite, reduction="sum").item() < accelerator.num_processes:
                raise TrainingDiverged(f"loss is {losses['loss'].item()} at step {step + 1}: stopped")
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(run.model.parameters(), cfg.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    ema_update(run.unet, cfg.ema_decay)
    return {k: v.item() for k, v in losses.items()}


def data_batches(run, start_step):
    """Endless micro-batches for this process, starting where a straight run would be at start_step."""
    cfg, accelerator = run.cfg, run.accelerator
    loader = make_loader(
        run.dataset,
        cfg.batch_size,
        accelerator.process_index,
        accelerator.num_processes,
        cfg.seed,
        start_batch=start_step * cfg.grad_accum,
        num_workers=cfg.num_workers,
    )
    yield from loader


def take_micro_batches(batches, count, skipped=None, patience=MIN_EMPTY_DRAWS):
    """`count` non-empty micro-batches and the Skips met on the way (recorded in `skipped`, a Skipped); `patience`
    empty micro-batches in a row stop the run with one line naming the first unreadable files."""
    skipped = Skipped() if skipped is None else skipped
    micro, met, empty = [], [], 0
    while len(micro) < count:
        batch = next(batches)
        skipped.add(batch["skipped"])
        met += batch["skipped"]
        empty = 0 if batch["captions"] else empty + 1
        if batch["captions"]:
            micro.append(batch)
        elif empty >= patience:
            raise DataError(skipped.stuck(empty))
    return micro, met


def validate(run, step, prompts):
    """Write output/validation/step_N.png on the main process."""
    if not run.accelerator.is_main_process:
        return None
    cfg = run.cfg
    path = Path(cfg.output) / "validation" / f"step_{step:07d}.png"
    with run.accelerator.autocast(), on_device(run.teacher.vae, run.accelerator.device):
        validation_grid(
            run.unet,
            run.teacher.vae,
            run.teacher.family,
            encode_text(run, [line.prompt for line in prompts]),
            negatives(run, prompts),
            prompts,
            cfg.validation_step_counts(),
            alphas_cumprod(),
            cfg.resolution,
            path,
            gamma=cfg.recommended_gamma,
            seed=cfg.seed,
        )
    return path


def negatives(run, prompts):
    """The Conditioning of each line's negative prompt: the run's unconditional embedding where it has none."""
    cond = encode_text(run, [line.negative for line in prompts])
    return cond.where(torch.tensor([not line.negative for line in prompts]), run.uncond.like(cond))


def keep_best(run, step, validation, keeper, judges):
    """At a validation: the student's keep-best score (the mean over the --validation-steps counts; keep_best.py) to
    the log and TensorBoard (val/<score name>, and per step count), with FID / CLIP score where their weights are
    given; a new lowest is exported as <output>/<name>_best.safetensors with its score and step. Main process only;
    returns the score."""
    if not run.accelerator.is_main_process or validation is None:
        return None
    cfg, name = run.cfg, run.cfg.keep_best_score
    values, judged = student_scores(run, validation, judges)
    value = sum(values.values()) / len(values)
    if run.accelerator.log_with:
        logged = {f"val/{name}": value, **{f"val/{name}/{k}_steps": v for k, v in values.items()}}
        logged.update({f"val/{judge}/{k}_steps": v for k, found in judged.items() for judge, v in found.items()})
        run.accelerator.log(logged, step=step)
    if keeper.improves(value):
        best = Path(cfg.output) / f"{cfg.name}_best.safetensors"
        export(run, best, step, extra={"scott.validation_score": value, "scott.validation_score_name": name})
        keeper.record(step, value)
    log.info("step %d: %s", step, score_line(cfg, validation, value, values, judged, keeper))
    return value


def export(run, path, step, extra=None):
    """Export the run's student LoRA at optimiser step `step` to `path` (the teacher's family, name and hash; `extra`
    metadata added)."""
    teacher = run.teacher
    export_lora(run.unet, run.cfg, teacher.family, teacher.name, teacher.sha256, path, step=step, extra=extra)


def write_skips(run):
    """<output>/skipped.txt from the main process; a write that fails (a full disk) is a warning, not a second error."""
    if not run.accelerator.is_main_process:
        return
    try:
        run.skips.write()
    except OSError as error:
        log.warning("could not write %s: %s", run.skips.path, error)


def gather_skips(run):
    """Every process's skips into each one's run.skips (the images each met unreadable in its own draws)."""
    if run.accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        run.skips.add(gather_object(list(run.skips)))


def step_lora_path(cfg, step):
    """Where --save-every writes the LoRA of optimiser step `step`: <output>/<name>_step<N>.safetensors."""
    return Path(cfg.output) / f"{cfg.name}_step{step:07d}.safetensors"


def saves_at(cfg, step):
    """Whether optimiser step `step` (from 1) exports <name>_step<N>: a --save-steps step, or a multiple of
    --save-every short of the final step (the final LoRA is that step's)."""
    every = cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps
    return bool(every) or step in cfg.save_step_set()


@dataclass
class Whereabouts:
    """Where a run is, for its out-of-memory line: what it was doing, and its last finished checkpoint."""

    doing: str = "while loading the teacher, drawing data-free images or caching latents"
    checkpoint: Path | None = None


def train(cfg):
    """Run cfg to max_steps (resuming if asked); returns the exported LoRA's path. Out of GPU memory anywhere: one
    line with this run's estimated peak, the flags that lower it and the last checkpoint (memory.py)."""
    where = Whereabouts()
    try:
        return train_run(cfg, where)
    except torch.OutOfMemoryError:
        raise OutOfMemory(out_of_memory_message(cfg, where.doing, where.checkpoint)) from None


def train_run(cfg, where):
    """train()'s body: build, resume, then step, log, checkpoint, export, validate to max_steps; `where` follows."""
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    prompts = read_prompts(cfg.validation_prompts) if cfg.validate_every else []
    run = build(cfg)
    accelerator = run.accelerator
    ckpt_dir = output / "checkpoints"
    resume = checkpoint.resolve(cfg.resume, ckpt_dir)
    step = checkpoint.load(accelerator, resume) if resume else 0
    if resume:  # what the draws before the checkpoint met (the scan finds the rest again)
        run.skips.add(read_drawn(Path(resume) / SKIPPED))
    where.checkpoint = (checkpoint.checkpoints(ckpt_dir)[-1:] or [None])[0]
    main = accelerator.is_main_process
    where.doing = "while preparing keep-best's references"
    validation = prepare_validation(run, run.holdout) if main and run.holdout else None
    keeper = KeepBest.open(output / "best.json", cfg.keep_best_score, resume)
    judges = Judges.load(cfg) if validation is not None else None
    if main:
        write_run_file(cfg, output / RUN_FILE)
        write_skips(run)
        trained = sum(pair.file not in run.skips for pair in run.dataset.pairs)  # not in a small bucket, cached
        log.info(
            "%s; keep-best: %s; %s",
            run.skips.report(trained),
            run.holdout.origin if run.holdout else "off",
            f"resuming at step {step}" if resume else "fresh run",
        )
    if accelerator.log_with:
        accelerator.init_trackers("scott", config={k: v for k, v in asdict(cfg).items() if v is not None})
    batches = data_batches(run, step)
    patience = max(MIN_EMPTY_DRAWS, epoch_batches(run.dataset, cfg.batch_size, accelerator.num_processes))
    progress = tqdm(total=cfg.max_steps, initial=step, disable=not main, desc=cfg.mode)
    run.model.train()
    started = time.perf_counter()
    try:
        while step < cfg.max_steps:
            where.doing = f"at step {step + 1}"
            micro, _ = take_micro_batches(batches, cfg.grad_accum, run.skips, patience)
            try:
                losses = train_step(run, micro, step)
            except TrainingDiverged as exc:
                raise TrainingDiverged(
                    f"{exc}; last good checkpoint: {where.checkpoint or 'none written yet'}"
                ) from None
            step += 1
            lr = run.scheduler.get_last_lr()[0]
            progress.set_postfix(loss=f"{losses['loss']:.4f}", lr=f"{lr:.2e}", skipped=len(run.skips))
            progress.update(1)
            if accelerator.log_with and step % cfg.log_every == 0:
                accelerator.log(
                    {**{f"loss/{k}": v for k, v in losses.items()}, "lr": lr, "data/skipped": len(run.skips)},
                    step=step,
                )
            if main and step % cfg.log_every == 0:  # the disc's hinge, margin, ratio too
                log.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in losses.items()))
            if step == cfg.max_steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                gather_skips(run)
                where.checkpoint = checkpoint.save(accelerator, ckpt_dir, step, cfg.keep_checkpoints, run.skips)
            if saves_at(cfg, step) and main:
                export(run, step_lora_path(cfg, step), step)
            if cfg.validate_every and (step % cfg.validate_every == 0 or step == cfg.max_steps):
                where.doing = f"while validating at step {step}"
                validate(run, step, prompts)
                keep_best(run, step, validation, keeper, judges)
        gather_skips(run)
    finally:
        progress.close()
        write_skips(run)  # every process's skips; only this one's when the run stops early
    path = output / f"{cfg.name}.safetensors"
    if main:
        export(run, path, step)
        log.info(
            "%d steps in %.1f s; %d inputs skipped, listed in %s; LoRA written to %s",
            step,
            time.perf_counter() - started,
            len(run.skips),
            run.skips.path,
            path,
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return path
