"""The model-family seam changed nothing for SD1.5: the tiny SD1.5 teacher's LoRAs (2 steps, each mode) hold the
same tensors and metadata as main's code exported before the seam (commit 5e1fba0, recorded below)."""

import hashlib
import json

import pytest
from safetensors import safe_open

from training.loop import train

# sha256 of digest() of the LoRA each mode's tiny run exported on main at 5e1fba0 (before the family seam).
RECORDED = {
    "scott": "d1ce6226ec2db87ff0efeabcbcc03d9513074f52e64429e8ce552505d2e6259f",
    "lcm": "6a2dd0cfdcfabaea6e95acf7ddbc515d7292c46b8255d2ddeb6d5fe1f907fb89",
}


def digest(path):
    """sha256 over the file's metadata (sorted; the teacher folder's hash left out: it hashes the diffusers version
    written into the tiny teacher's configs) and every tensor's name, dtype and bytes in name order. The file's own
    bytes are no fingerprint: safetensors writes the metadata in hash-map order."""
    h = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "scott.base_model_sha256"}
        h.update(json.dumps(meta, sort_keys=True).encode())
        for key in sorted(f.keys()):
            tensor = f.get_tensor(key)
            h.update(key.encode())
            h.update(str(tensor.dtype).encode())
            h.update(tensor.numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("mode", sorted(RECORDED))
def test_tiny_sd15_lora_is_byte_for_byte_what_main_exported(mode, tiny_teacher, images, tmp_path, tiny_config):
    data = images(tmp_path / "data", 8)
    path = train(tiny_config(tiny_teacher, data, tmp_path / mode, mode=mode))
    assert digest(path) == RECORDED[mode]
