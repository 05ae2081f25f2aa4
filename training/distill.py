"""`python -m training.distill --teacher model.safetensors --data images/`: distill a SCott (or LCM) LoRA."""

import logging
import sys

from .cli import parse_command
from .errors import UserError, disk_full


def main(argv=None):
    """CLI entry: parse, train, export; a user mistake is one line on stderr and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("diffusers", "transformers", "accelerate", "peft"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        cfg, estimate_memory = parse_command(argv)
        if estimate_memory:
            from .memory import estimate, report

            print(report(cfg, estimate(cfg)))
            return 0
        from .loop import train

        train(cfg)  # its last log line names the LoRA it wrote
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if not disk_full(exc):
            raise
        print(f"error: the disk is full ({exc}): free space and rerun with --resume latest (finished checkpoints and "
              "cache entries are kept)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
