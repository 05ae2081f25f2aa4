"""Run under torchrun by test_distributed.py: SCott steps (3 unless given) on each rank, then save this rank's
trainable tensors, the captions it trained on and those keep-best withheld (with `split`: validation on, so
--validation-split auto applies). Usage: ddp_worker.py TEACHER DATA OUTPUT [GRAD_ACCUM [STEPS] [split]]."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest import make_tiny_config  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from training.checkpoint import trainable_state  # noqa: E402
from training.loop import build, data_batches, train_step  # noqa: E402

teacher, data, output = sys.argv[1:4]
accum = int(sys.argv[4]) if len(sys.argv) > 4 else 1
extra = sys.argv[5:]
steps = next((int(arg) for arg in extra if arg.isdigit()), 3)
validate_every = 1 if "split" in extra else 0
run = build(make_tiny_config(teacher, data, output, mode="scott", lr=1e-3, grad_accum=accum,
                             validate_every=validate_every))
rank, seen, batches = run.accelerator.process_index, [], data_batches(run, 0)
for step in range(steps):
    micro = [next(batches) for _ in range(accum)]
    seen += [caption for batch in micro for caption in batch["captions"]]
    train_step(run, micro, step)
save_file(trainable_state(run.accelerator.unwrap_model(run.model)), f"{output}/rank{rank}.safetensors")
Path(f"{output}/rank{rank}.json").write_text(
    json.dumps({"world": run.accelerator.num_processes, "seen": seen,
                "withheld": run.holdout.captions if run.holdout else []})
)
