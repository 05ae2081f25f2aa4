"""The model-family seam changed nothing for SD1.5: the tiny SD1.5 teacher's LoRAs (2 steps, each mode) hold the
same tensors and metadata as main's code without the seam exported (commit eab2fab, recorded below; lcm's is also
what 5e1fba0 exported: issue 23 added the adversarial schedule's metadata to scott's)."""

import hashlib
import json

import pytest
from safetensors import safe_open

from training.loop import train

# sha256 of digest() of the LoRA each mode's tiny run exported on main at eab2fab (without the family seam).
RECORDED = {
    "scott": "c8a23e6955471c29cf201dc4d9469c4fabb94fa2da61653fd720f9fcef2341c5",
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
