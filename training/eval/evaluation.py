"""Score LoRAs (and the teacher) with FID, CLIP score and PRDC: generate image sets into a resumable cache, score.

One set per (LoRA, steps) sampled with scott_core's consistency sampler on the LoRA-patched teacher, plus the
teacher's own reference row (25 DPM-Solver++ 2M steps, cfg 7.5). Image i of every set uses prompt i and seed + i
(training.data.synth.plan), so sets compare image for image and a rerun or a larger --n only draws what is missing.
"""

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from scott_core import lora_format
from scott_core.sampling import consistency_denoiser, sample_scott
from scott_core.schedule import alphas_cumprod, lcm_timesteps

from ..data.synth import pipeline_generator, plan, teacher_pipeline
from ..errors import UserError
from ..models.family import FAMILIES, square_sizes
from ..models.teacher import encode_captions, file_sha256, vae_scale
from ..models.unet import guided_eps_fn, unet_eps_fn
from ..validation import decode, grid
from . import metrics, scorers

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SET_FILE = "set.json"


@dataclass(frozen=True)
class EvalSet:
    """One row: the LoRA (None = the teacher's own sampler), its sampler and settings."""

    name: str
    lora: str | None
    sampler: str
    steps: int
    cfg: float
    gamma: float | None


@dataclass
class Lora:
    """A LoRA file read once: its modules (any supported key format), sampling metadata and hash."""

    name: str
    path: str
    modules: dict
    defaults: dict
    sha256: str


def read_lora(path):
    """A Lora from a .safetensors file; a one-line UserError for a missing or pickled file, or one for a family the
    trainer does not support (check_lora_fits then matches it against the teacher)."""
    try:
        state, metadata = lora_format.read_safetensors(path)
        modules = lora_format.modules(state, metadata)
        defaults = lora_format.sampling_defaults(metadata)
    except lora_format.LoraFormatError as error:
        raise UserError(f"--lora {path}: {error}") from None
    family = lora_format.detect_family(state)
    if family not in (*FAMILIES, "unknown"):
        raise UserError(f"--lora {path} is an {family} LoRA; this evaluator scores SD1.5- and SDXL-family LoRAs")
    return Lora(Path(path).stem, str(path), modules, defaults, file_sha256(path))


def eval_sets(loras, step_counts, gamma=None, cfg=None, teacher_steps=25, teacher_cfg=7.5, reference=True):
    """The rows: the teacher reference (if `reference`), then each LoRA x step count; gamma/cfg None take the
    LoRA's metadata (scott.gamma, scott.cfg), else 1 and 1."""
    sets = [EvalSet(f"teacher_dpmpp2m{teacher_steps}_cfg{teacher_cfg:g}", None, "dpmpp_2m", teacher_steps,
                    teacher_cfg, None)] if reference else []
    for lora in loras:
        g = gamma if gamma is not None else lora.defaults.get("gamma", 1.0)
        c = cfg if cfg is not None else lora.defaults.get("cfg", 1.0)
        for steps in step_counts:
            sets.append(EvalSet(f"{lora.name}_steps{steps}_gamma{g:g}_cfg{c:g}", lora.path, "scott", steps, c, g))
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise UserError("two --lora files have the same name (file stem); rename one")
    return sets


def lora_layer(teacher, module):
    """The nn.Module a LoRA module patches, or a UserError naming the path the teacher lacks."""
    root = teacher.component(module.part)
    try:
        layer = root.get_submodule(module.path)
    except AttributeError:
        layer = None
    weight = getattr(layer, "weight", None)
    if weight is None or weight.numel() != module.up.shape[0] * module.down[0].numel():
        raise UserError(f"the LoRA's layer {module.part}:{module.path} does not fit this teacher: is the LoRA for "
                        "another base model family?")
    return layer


def check_lora_fits(teacher, lora):
    """Raise a UserError unless every module of the LoRA patches a layer of the teacher of the right shape."""
    for module in lora.modules.values():
        lora_layer(teacher, module)


@contextlib.contextmanager
@torch.no_grad()
def merged(teacher, lora, strength=1.0):
    """Inside the context the teacher's weights are W + strength * alpha / rank * up @ down; restored after."""
    saved = []
    try:
        for module in lora.modules.values():
            weight = lora_layer(teacher, module).weight
            saved.append((weight, weight.detach().clone()))
            delta = lora_format.patched_delta(module, strength).reshape(weight.shape)
            weight.copy_((weight.double() + delta.to(weight.device)).to(weight.dtype))
        yield teacher
    finally:
        for weight, original in saved:
            weight.copy_(original)


@torch.no_grad()
def encode(teacher, captions, resolution, device):
    """The captions' Conditioning as the trainer encodes them, with the size conditioning of a square image at
    `resolution` where the family takes it."""
    cond = encode_captions(teacher, captions).to(device)
    return teacher.family.conditioned(cond, square_sizes(resolution, resolution, len(captions)))


def latent_shape(teacher, resolution):
    """(C, H, W) of the teacher's latents at `resolution` pixels."""
    scale = vae_scale(teacher.vae)
    return (teacher.unet.config.in_channels, resolution // scale, resolution // scale)


def guided_eps(unet, cond, uncond, cfg):
    """eps_fn(z, t) of the UNet with ComfyUI's cfg: cond only at cfg 1, else uncond + cfg * (cond - uncond)."""
    eps = unet_eps_fn(unet, cond) if cfg == 1 else guided_eps_fn(unet, cond, uncond, cfg - 1)
    return lambda z, t: eps(z.to(unet.dtype), t)


def per_image_noise(seeds, shape, device):
    """(start latent, noise_sampler): image i's start noise and re-noise draws from its own generator seeded seeds[i],
    so an image does not depend on its batch or process."""
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]

    def draw(*_):
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)

    return draw(), draw


@torch.no_grad()
def consistency_latents(unet, cond, uncond, seeds, steps, gamma, cfg, shape):
    """Clean latents from scott_core's SCott sampler on the UNet as it is (LoRA-patched or its adapter active) in
    `steps` LCM-grid steps: sample i from seeds[i]'s start noise and re-noise, captions `cond`, guidance `cfg` against
    `uncond` (the Conditionings of the captions and of the family's unconditional embedding, one row)."""
    ab = alphas_cumprod()
    z, noise_sampler = per_image_noise(seeds, shape, cond.states.device)
    denoiser = consistency_denoiser(guided_eps(unet, cond, uncond.like(cond), cfg), ab)
    return sample_scott(denoiser, z, lcm_timesteps(steps), ab, gamma=gamma, noise_sampler=noise_sampler)


def consistency_generator(teacher, steps, gamma, cfg, resolution, device):
    """generate(prompts, seeds) -> PIL images from scott_core's SCott sampler on the (LoRA-patched) teacher UNet."""
    shape = latent_shape(teacher, resolution)

    def generate(prompts, seeds):
        cond = encode(teacher, prompts, resolution, device)
        uncond = teacher.family.uncond(encode(teacher, [""], resolution, device))
        x0 = consistency_latents(teacher.unet, cond, uncond, seeds, steps, gamma, cfg, shape)
        return [Image.fromarray(image.numpy()) for image in decode(teacher.vae, x0)]

    return generate


def set_generator(eval_set, teacher, resolution, device):
    """generate(prompts, seeds) for one row: the teacher's DPM-Solver++ pipeline, or the consistency sampler."""
    if eval_set.lora is None:
        pipe = teacher_pipeline(teacher).to(device)
        return pipeline_generator(pipe, eval_set.steps, eval_set.cfg, resolution)
    return consistency_generator(teacher, eval_set.steps, eval_set.gamma, eval_set.cfg, resolution, device)


def prompts_sha256(prompts):
    """sha256 of the prompt list (one per line)."""
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def set_record(eval_set, teacher_sha256, lora_sha256, resolution, seed, prompts):
    """What decides a set's images: written as set.json beside them, compared on every rerun."""
    return {**asdict(eval_set), "teacher_sha256": teacher_sha256, "lora_sha256": lora_sha256,
            "resolution": resolution, "seed": seed, "prompts_sha256": prompts_sha256(prompts)}


def claim_folder(folder, record):
    """Create the set's folder with its set.json, or check an existing one holds the same settings."""
    folder = Path(folder)
    path = folder / SET_FILE
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in record if old.get(k) != record[k])
        if changed:
            raise UserError(f"{folder} holds images made with other settings (changed: {', '.join(changed)}); use "
                            "another --out, or delete that folder to redraw it")
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def image_files(folder):
    """The sorted image files of a folder; a UserError if it is missing or holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--real {folder} is not a folder: pass a folder of real images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"--real {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def center_crop_resize(image, resolution):
    """The central square of an image, resized to resolution x resolution (PIL bicubic, antialiased), RGB."""
    return ImageOps.fit(image.convert("RGB"), (resolution, resolution), Image.Resampling.BICUBIC)


def real_loader(resolution):
    """load(path) -> the real image center-cropped and resized to the generation resolution."""

    def load(path):
        with Image.open(path) as image:
            return center_crop_resize(image, resolution)

    return load


def open_rgb(path):
    """A generated image, RGB, fully read."""
    with Image.open(path) as image:
        return image.convert("RGB")


class Lazy:
    """A sequence that loads item i with load(items[i]) when asked (a batch in memory at a time)."""

    def __init__(self, items, load):
        self.items, self.load = list(items), load

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.load(item) for item in self.items[index]]
        return self.load(self.items[index])


@dataclass
class RealStats:
    """The real set's Inception features, mean, covariance and covariance square root (computed once per run)."""

    feats: torch.Tensor
    mu: torch.Tensor
    cov: torch.Tensor
    root: torch.Tensor

    @classmethod
    def of(cls, feats):
        mu, cov = metrics.mean_cov(feats)
        return cls(feats, mu, cov, metrics.sqrtm_psd(cov))


def score_set(images, captions, real, inception, clip, device, k=5, batch_size=50):
    """{fid, clip_score, precision, recall, density, coverage, n} of one image set against the RealStats."""
    feats = scorers.inception_features(inception, images, device, batch_size)
    clip_model, processor = clip
    clip_score = scorers.clip_score(clip_model, processor, images, captions, device, batch_size)
    fid = metrics.frechet_gaussians(real.mu, real.cov, *metrics.mean_cov(feats), root1=real.root)
    return {"fid": fid, "clip_score": clip_score, **metrics.prdc(real.feats, feats, k=k), "n": len(images)}


def set_images(out, eval_set, items):
    """The cached images of a set (lazily loaded) and their prompts, in plan order."""
    folder = Path(out) / "images" / eval_set.name
    return Lazy([folder / f"{item.stem}.png" for item in items], open_rgb), [item.prompt for item in items]


def markdown_table(rows):
    """The results as a Markdown table, one line per row."""
    head = "| set | sampler | steps | cfg | gamma | FID | CLIP | precision | recall | density | coverage |"
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        gamma = "" if r["gamma"] is None else f"{r['gamma']:g}"
        lines.append(f"| {r['name']} | {r['sampler']} | {r['steps']} | {r['cfg']:g} | {gamma} | {r['fid']:.2f} | "
                     f"{r['clip_score']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['density']:.3f} | "
                     f"{r['coverage']:.3f} |")
    return "\n".join(lines) + "\n"


def write_grid(out, sets, items, count=4):
    """grid.png: the first `count` prompts (rows) x the sets (columns)."""
    rows = []
    for item in items[:count]:
        row = [np.asarray(open_rgb(Path(out) / "images" / s.name / f"{item.stem}.png")) for s in sets]
        rows.append([torch.from_numpy(image.copy()) for image in row])
    path = Path(out) / "grid.png"
    grid(rows).save(path)
    return path


def write_results(out, header, rows):
    """results.json ({header..., rows: [...]}) and results.md; returns the Markdown table."""
    out = Path(out)
    (out / "results.json").write_text(json.dumps({**header, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    table = markdown_table(rows)
    (out / "results.md").write_text(table, encoding="utf-8")
    return table


@dataclass
class EvalOptions:
    """One evaluation run, resolved: what to generate, against what, scored with which local networks."""

    teacher: str
    loras: list
    prompts: list
    real: list
    out: str
    inception: str
    clip: str
    steps: tuple = (1, 2, 4)
    gamma: float | None = None
    cfg: float | None = None
    n: int = 5000
    resolution: int = 512
    seed: int = 0
    k: int = 5
    batch_size: int = 8
    teacher_steps: int = 25
    teacher_cfg: float = 7.5
    reference: bool = True
    grid_prompts: int = 4
    dtype: str = "auto"
    trust_ckpt: bool = False
    protocol: str | None = None


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def model_dtype(name, device):
    """auto: fp16 on CUDA, fp32 elsewhere."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def check_options(opts):
    """The cheap checks, before any model loads: weights files, LoRAs, teacher path, set sizes."""
    from ..models.teacher import check_teacher_path

    scorers.check_inception_file(opts.inception)
    scorers.check_clip_folder(opts.clip)
    loras = [read_lora(path) for path in opts.loras]
    check_teacher_path(opts.teacher, opts.trust_ckpt)
    if opts.n <= opts.k or len(opts.real) <= opts.k:
        raise UserError(f"precision/recall need more than k={opts.k} images per set: got --n {opts.n} and "
                        f"{len(opts.real)} real images")
    if not opts.prompts:
        raise UserError("no prompts to generate from")
    return loras


def generate_sets(opts, sets, loras, teacher, items, accelerator):
    """Fill each set's cache folder; every process draws its shard of the missing images."""
    from ..data.synth import shard, synthesize

    by_path = {lora.path: lora for lora in loras}
    for eval_set in sets:
        folder = Path(opts.out) / "images" / eval_set.name
        lora = by_path.get(eval_set.lora)
        if accelerator.is_main_process:
            print(f"{eval_set.name}: drawing the missing of {len(items)} images into {folder}")
        with merged(teacher, lora) if lora else contextlib.nullcontext():
            generate = set_generator(eval_set, teacher, opts.resolution, accelerator.device)
            mine = shard(items, accelerator.process_index, accelerator.num_processes)
            made = synthesize(generate, mine, folder, opts.batch_size, accelerator.process_index,
                              show_progress=accelerator.is_main_process)
        if accelerator.is_main_process:
            print(f"{eval_set.name}: {made} new image(s), {len(mine) - made} cached (rank 0)")


def claim_folders(opts, sets, loras, teacher_sha256, accelerator):
    """Main process: create or check every set's folder and set.json; all processes wait for it."""
    sha = {lora.path: lora.sha256 for lora in loras}
    if accelerator.is_main_process:
        for eval_set in sets:
            record = set_record(eval_set, teacher_sha256, sha.get(eval_set.lora), opts.resolution, opts.seed,
                                opts.prompts)
            claim_folder(Path(opts.out) / "images" / eval_set.name, record)
    accelerator.wait_for_everyone()


def score_sets(opts, sets, items, nets, device):
    """One results row per set, each against the features of the real images."""
    inception, clip = nets
    real = RealStats.of(scorers.inception_features(inception, Lazy(opts.real, real_loader(opts.resolution)), device))
    rows = []
    for eval_set in sets:
        images, captions = set_images(opts.out, eval_set, items)
        scores = score_set(images, captions, real, inception, clip, device, opts.k)
        rows.append({**asdict(eval_set), **scores, "n_real": len(opts.real)})
    return rows


def evaluate(opts):
    """Generate (resumably, on every accelerate process) and score every set; the rows on the main process."""
    from accelerate import Accelerator

    from ..models.teacher import load_teacher

    accelerator = Accelerator()
    loras = check_options(opts)
    sets = eval_sets(loras, opts.steps, opts.gamma, opts.cfg, opts.teacher_steps, opts.teacher_cfg, opts.reference)
    if not sets:
        raise UserError("nothing to evaluate: give --lora files, or leave the teacher reference row on")
    main = accelerator.is_main_process
    nets = (scorers.load_inception(opts.inception), scorers.load_clip(opts.clip)) if main else None
    device = accelerator.device
    teacher = load_teacher(opts.teacher, opts.trust_ckpt, dtype=model_dtype(opts.dtype, device))
    for module in (teacher.unet, teacher.vae, *teacher.text_encoders):
        module.to(device)
    for lora in loras:
        check_lora_fits(teacher, lora)
    items = plan(opts.prompts, opts.n, opts.seed)
    claim_folders(opts, sets, loras, teacher.sha256, accelerator)
    generate_sets(opts, sets, loras, teacher, items, accelerator)
    accelerator.wait_for_everyone()
    if not main:
        return None
    del teacher
    rows = score_sets(opts, sets, items, nets, device)
    header = {"teacher": str(opts.teacher), "protocol": opts.protocol, "n": opts.n, "n_real": len(opts.real),
              "resolution": opts.resolution, "seed": opts.seed, "k": opts.k,
              "prompts_sha256": prompts_sha256(opts.prompts), "inception": Path(opts.inception).name,
              "clip": Path(opts.clip).name}
    table = write_results(opts.out, header, rows)
    write_grid(opts.out, sets, items, opts.grid_prompts)
    return rows, table
