"""A full-size SD1.5 checkpoint in the original single-file layout loads offline, every tensor in place."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from training.models.family import SD15
from training.models.teacher import check_teacher_path

REPO = Path(__file__).resolve().parents[2]

# Loads the teacher with the hub switched off and an empty HF cache, maps every loaded tensor back to its
# original key (the test's own inverse of diffusers' converter) and compares it with the file: a wrong
# mapping anywhere fails.
CHECK = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import original_layout
    from safetensors import safe_open
    from training.models.family import SD15
    from training.models.teacher import load_teacher
    teacher = load_teacher({path!r})
    loaded = original_layout(teacher.unet, teacher.vae, *teacher.text_encoders)
    with safe_open({path!r}, "pt") as f:
        keys = set(f.keys())
        assert set(loaded) <= keys, sorted(set(loaded) - keys)[:5]
        bad = [k for k in loaded if not torch.equal(loaded[k], f.get_tensor(k))]
    assert not bad, bad[:5]
    (tokenizer,) = teacher.tokenizers
    assert teacher.unet.dtype == torch.float32 and tokenizer.model_max_length == 77
    assert teacher.scheduler_config == SD15.assets / "scheduler"  # a single file samples on the shipped config
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407] and len(ids) == 77
    print("OK", len(loaded), sum(p.numel() for p in teacher.unet.parameters()))
""")


def test_original_layout_sd15_loads_offline_and_round_trips(sd15_single_file, tmp_path):
    assert check_teacher_path(sd15_single_file) is SD15
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "PYTHONPATH": str(REPO),
    }
    script = CHECK.format(tests=str(Path(__file__).parent), path=str(sd15_single_file))
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    count, unet_params = result.stdout.split()[-2:]
    assert int(count) > 1000 and int(unet_params) == 859_520_964
    assert not any((tmp_path / "hf").rglob("*.json"))  # nothing was fetched or cached
