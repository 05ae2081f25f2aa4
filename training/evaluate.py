"""`python -m training.evaluate --teacher CKPT --lora scott.safetensors --prompts p.txt --real imgs/ --out eval/`:
FID, CLIP score and precision/recall/density/coverage of LoRAs at 1, 2, 4 steps and of the teacher, from local
weights only. Multi-GPU: `accelerate launch -m training.evaluate ...` (prompts split across processes)."""

import argparse
import logging
import sys
from pathlib import Path

from .errors import UserError

DEFAULT_INCEPTION = "weights/pt_inception-2015-12-05-6726825d.pth"
DEFAULT_CLIP = "weights/clip-vit-large-patch14"


def build_parser():
    """The evaluator's flags."""
    from .eval.coco import PROTOCOLS

    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.splitlines()[0])
    add = p.add_argument
    add("--teacher", required=True, help="the base model: SD1.5-family .safetensors, a diffusers folder, or 'demo'")
    add("--lora", nargs="*", default=[], metavar="FILE", help="LoRA .safetensors files to score (kohya, peft or "
        "diffusers keys); none: the teacher row only")
    add("--prompts", default=None, metavar="FILE", help="prompts, one a line; image i takes prompt i mod the count")
    add("--real", default=None, metavar="FOLDER", help="real images to compare with (center-cropped and resized to "
        "--resolution); with --protocol coco2017-5k: COCO-2017's val2017 folder")
    add("--captions", default=None, metavar="FILE", help="--protocol coco2017-5k: COCO-2017's "
        "annotations/captions_val2017.json")
    add("--protocol", default=None, choices=PROTOCOLS, help="coco2017-5k: the paper's MSCOCO-2017 5K protocol "
        "(5,000 val images, their first captions, 512 px, FID against the 5,000 real images)")
    add("--steps", type=int, nargs="+", default=[1, 2, 4], help="sampling step counts of each LoRA (default 1 2 4)")
    add("--gamma", type=float, default=None, help="sampler gamma (1 = LCM re-noise); default: the LoRA's metadata, "
        "else 1")
    add("--cfg", type=float, default=None, help="guidance of the LoRA rows (1 = no negative prompt); default: the "
        "LoRA's metadata, else 1")
    add("--n", "--num-images", dest="n", type=int, default=None, help="images per set (default 5000); under "
        "torchrun / accelerate launch write --num-images (their own flags swallow an abbreviation like --n)")
    add("--resolution", type=int, default=None, help="generation resolution in pixels (default 512; 64 for the demo "
        "teacher)")
    add("--seed", type=int, default=0, help="image i uses seed + i")
    add("--out", required=True, metavar="DIR", help="output: images/<set>/ (the cache), results.json, results.md, "
        "grid.png")
    add("--inception", default=DEFAULT_INCEPTION, metavar="PATH", help="FID Inception-v3 weights "
        f"(pytorch-fid's pt_inception-2015-12-05-6726825d.pth; default {DEFAULT_INCEPTION})")
    add("--clip", default=DEFAULT_CLIP, metavar="PATH", help=f"local CLIP model folder (default {DEFAULT_CLIP})")
    add("--k", type=int, default=5, help="nearest neighbours of precision/recall/density/coverage")
    add("--batch-size", type=int, default=8, help="images per generation batch per process")
    add("--teacher-steps", type=int, default=25, help="DPM-Solver++ 2M steps of the teacher reference row")
    add("--teacher-cfg", type=float, default=7.5, help="guidance scale of the teacher reference row")
    add("--reference", action=argparse.BooleanOptionalAction, default=True, help="include the teacher row")
    add("--grid-prompts", type=int, default=4, help="prompts (rows) in grid.png")
    add("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"), help="model weights dtype (auto: fp16 "
        "on CUDA, else fp32)")
    add("--trust-ckpt", action="store_true", help="allow a pickle .ckpt teacher (only files you trust)")
    return p


def resolve(args):
    """argparse namespace -> EvalOptions (protocol defaults, prompts and real images read), or a UserError."""
    from .config import DEMO_DEFAULTS, demo_teacher
    from .data.synth_prompts import read_prompt_file
    from .eval.coco import COCO_N, COCO_RESOLUTION, coco_pairs
    from .eval.evaluation import EvalOptions, image_files

    DEMO_RESOLUTION = DEMO_DEFAULTS["resolution"]

    positive = {"--n": args.n, "--resolution": args.resolution, "--k": args.k, "--batch-size": args.batch_size,
                "--teacher-steps": args.teacher_steps, "--grid-prompts": args.grid_prompts}
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if min(args.steps) < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    n = args.n or (COCO_N if args.protocol else 5000)
    resolution = args.resolution or (COCO_RESOLUTION if args.protocol else DEMO_RESOLUTION if args.teacher == "demo"
                                     else 512)
    if args.protocol:
        if args.prompts or not (args.real and args.captions):
            raise UserError("--protocol coco2017-5k takes --real VAL2017_FOLDER and --captions "
                            "captions_val2017.json, not --prompts")
        prompts, real = coco_pairs(args.real, args.captions, n)
    else:
        if not (args.prompts and args.real):
            raise UserError("give --prompts FILE and --real FOLDER (or --protocol coco2017-5k)")
        prompts, real = read_prompt_file(args.prompts), image_files(args.real)
    teacher = str(demo_teacher()) if args.teacher == "demo" else args.teacher
    return EvalOptions(
        teacher=teacher, loras=list(args.lora), prompts=prompts, real=real, out=args.out, inception=args.inception,
        clip=args.clip, steps=tuple(args.steps), gamma=args.gamma, cfg=args.cfg, n=n, resolution=resolution,
        seed=args.seed, k=args.k, batch_size=args.batch_size, teacher_steps=args.teacher_steps,
        teacher_cfg=args.teacher_cfg, reference=args.reference, grid_prompts=args.grid_prompts, dtype=args.dtype,
        trust_ckpt=args.trust_ckpt, protocol=args.protocol,
    )


def main(argv=None):
    """CLI entry: a user mistake is one line on stderr and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("diffusers", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    try:
        from .eval.evaluation import evaluate

        result = evaluate(resolve(args))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if result is not None:
        print(result[1], end="")
        print(f"results in {Path(args.out) / 'results.json'}, {Path(args.out) / 'results.md'}, "
              f"{Path(args.out) / 'grid.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
