"""LoRA state dicts for SD1.5- and SDXL-family models: read (safetensors only), detect format and model family,
convert between kohya (`lora_unet_*.lora_down.weight` + `.alpha`; text encoders `lora_te_*`, SDXL `lora_te1_*` /
`lora_te2_*`), peft (`*.lora_A.weight`) and diffusers (`unet.*.lora_A.weight`, `text_encoder[_2].*`) keys, and read
SCott's recommended sampling settings from the file's metadata.

The update a LoRA module applies is `W += strength * alpha / rank * up @ down`; every conversion keeps
`alpha / rank`, writing it as kohya's `.alpha` or diffusers' `lora_adapter_metadata`.
"""

import json
import os
import re
import struct
from dataclasses import dataclass

import torch

from .families import FAMILIES, SD15

PARTS = ("unet", "text_encoder", "text_encoder_2")
# kohya prefix -> model part, over every family ("lora_te_" is SD1.5's text encoder, "lora_te1_" SDXL's first).
KOHYA_PARTS = {prefix: part for family in FAMILIES.values() for part, prefix in family.kohya_prefixes}
DIFFUSERS_PREFIXES = tuple(sorted({prefix for f in FAMILIES.values() for _, prefix in f.diffusers_prefixes}))
_KOHYA_KEY = "({})(.+)\\.(lora_down\\.weight|lora_up\\.weight|alpha)".format(
    "|".join(sorted(KOHYA_PARTS, key=len, reverse=True))  # longest first: lora_te1_ before lora_te_
)
# Multi-word module names of the SD1.5/SDXL UNet (diffusers and original ldm layouts) and CLIP text model: kohya
# joins every name with "_", so these are the words that must not be split back into "."-separated path parts.
_COMPOUND_NAMES = (
    "down_blocks",
    "up_blocks",
    "mid_block",
    "transformer_blocks",
    "proj_in",
    "proj_out",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "time_emb_proj",
    "conv_shortcut",
    "text_model",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "conv_in",
    "conv_out",
    "time_embedding",
    "linear_1",
    "linear_2",
    "conv_norm_out",
    "layer_norm1",
    "layer_norm2",
    "final_layer_norm",
    "token_embedding",
    "position_embedding",
    "add_embedding",
    "input_blocks",
    "output_blocks",
    "middle_block",
    "in_layers",
    "out_layers",
    "emb_layers",
    "skip_connection",
    "time_embed",
    "label_emb",
)
SCOTT_METADATA = {"steps": ("scott.steps", int), "gamma": ("scott.gamma", float), "cfg": ("scott.cfg", float)}
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"


class LoraFormatError(ValueError):
    """A LoRA file or state dict this module cannot read or convert; the message says what to do."""


@dataclass
class LoraModule:
    """One adapted layer: part ("unet"/"text_encoder"), diffusers module path, down [r, in], up [out, r]."""

    part: str
    path: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self):
        return self.down.shape[0]


def read_safetensors(path):
    """(state dict, metadata) of a .safetensors file; a one-line LoraFormatError otherwise (no pickle)."""
    name = os.path.basename(str(path))
    if not os.path.isfile(path):
        raise LoraFormatError(f"LoRA file {name!r} does not exist")
    size = os.path.getsize(path)
    if size == 0:
        raise LoraFormatError(f"LoRA file {name!r} is empty (0 bytes); download it again")
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        header_ok = 2 <= header_len <= size - 8 and f.read(1) == b"{"
    if not header_ok:
        raise LoraFormatError(
            f"LoRA file {name!r} is not a safetensors file (.ckpt/.pt/.bin pickles are refused: convert it "
            "to .safetensors)"
        )
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for truncated or corrupt files
        raise LoraFormatError(
            f"LoRA file {name!r} is corrupt or truncated: {str(e).splitlines()[0]}"
        ) from None
    if not state_dict:
        raise LoraFormatError(f"LoRA file {name!r} holds no tensors")
    return state_dict, metadata


def detect_format(state_dict):
    """kohya (lora_unet_/lora_te_/lora_te1_/lora_te2_ keys), diffusers (unet./text_encoder./text_encoder_2. +
    lora_A/B or lora.down/up), peft (bare module paths + lora_A/B); LoraFormatError when none fits."""
    keys = list(state_dict)
    if any(k.startswith(tuple(KOHYA_PARTS)) for k in keys):
        return "kohya"
    lora_keys = [k for k in keys if _split_peft_key(k) is not None]
    if lora_keys and all(k.startswith(DIFFUSERS_PREFIXES) for k in lora_keys):
        return "diffusers"
    if lora_keys:
        return "peft"
    raise LoraFormatError(f"not a LoRA: none of its {len(keys)} keys is a LoRA key (e.g. {keys[:3]})")


def detect_family(state_dict):
    """The model family a LoRA was trained for: "sdxl", "sd2", "sd15" or "unknown", from keys (a second text
    encoder, SDXL's added embedding) and the cross-attention width of an attn2.to_k down matrix."""
    keys = list(state_dict)
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) or "add_embedding" in k for k in keys):
        return "sdxl"
    widths = {f.cross_attention_dim: f.name for f in FAMILIES.values()} | {1024: "sd2"}
    for key in keys:
        if re.search(r"attn2[._]to_k", key) and re.search(r"(lora_down|lora_A|lora\.down)", key):
            return widths.get(state_dict[key].shape[-1], "unknown")
    return "unknown"


def modules(state_dict, metadata=None):
    """All LoRA modules of a state dict in any supported format, keyed "part:path"; alpha from the file
    (kohya .alpha, diffusers/peft lora_adapter_metadata) or, where it has none, alpha = rank (scale 1)."""
    fmt = detect_format(state_dict)
    pairs = _kohya_pairs(state_dict) if fmt == "kohya" else _peft_pairs(state_dict)
    alphas = _metadata_alphas(metadata)
    out = {}
    for (part, path), (down, up, alpha) in pairs.items():
        if down is None or up is None:
            raise LoraFormatError(
                f"LoRA module {part}:{path} has only one of its two matrices (down/A, up/B)"
            )
        alpha = alpha if alpha is not None else alphas.get(part, down.shape[0])
        out[f"{part}:{path}"] = LoraModule(part, path, down, up, float(alpha))
    return out


def to_kohya(state_dict, metadata=None, family=None):
    """Any supported format -> kohya keys `<prefix><path with _>.lora_down/lora_up.weight` and `.alpha`, with the
    prefixes of `family` (a families.Family; default: the LoRA's detected family, SD1.5 where unknown)."""
    family = family or FAMILIES.get(detect_family(state_dict), SD15)
    prefixes = dict(family.kohya_prefixes)
    out = {}
    for m in modules(state_dict, metadata).values():
        if m.part not in prefixes:
            raise LoraFormatError(f"{family.display_name} models have no {m.part}; the LoRA is for SDXL")
        name = prefixes[m.part] + m.path.replace(".", "_")
        out[f"{name}.lora_down.weight"] = m.down
        out[f"{name}.lora_up.weight"] = m.up
        out[f"{name}.alpha"] = torch.tensor(m.alpha)
    return out


def to_diffusers(state_dict, metadata=None, prefixed=True):
    """Any supported format -> (`[unet.]<path>.lora_A/lora_B.weight` state dict, metadata with
    lora_adapter_metadata holding lora_alpha and r per part). prefixed=False: bare peft keys (one part)."""
    mods = modules(state_dict, metadata)
    parts = {m.part for m in mods.values()}
    if not prefixed and len(parts) > 1:
        raise LoraFormatError(
            "bare peft keys cannot hold both UNet and text-encoder modules; use prefixed=True"
        )
    out, adapter = {}, {}
    for m in mods.values():
        key = f"{m.part}.{m.path}" if prefixed else m.path
        out[f"{key}.lora_A.weight"] = m.down
        out[f"{key}.lora_B.weight"] = m.up
        adapter.setdefault(m.part, set()).add((m.rank, m.alpha))
    meta = {}
    for part, values in adapter.items():
        if len(values) > 1:
            raise LoraFormatError(
                f"{part} modules have different (rank, alpha) pairs {sorted(values)}: diffusers metadata "
                "holds one; "
                "use the kohya format, which keeps an alpha per module"
            )
        rank, alpha = values.pop()
        meta[f"{part}.r" if prefixed else "r"] = rank
        meta[f"{part}.lora_alpha" if prefixed else "lora_alpha"] = alpha
    return out, {DIFFUSERS_METADATA_KEY: json.dumps(meta, sort_keys=True)}


def sampling_defaults(metadata):
    """SCott's recommended settings from the file's metadata: {"steps", "gamma", "cfg"}, those present."""
    metadata = metadata or {}
    out = {}
    for name, (key, cast) in SCOTT_METADATA.items():
        if key in metadata:
            try:
                out[name] = cast(metadata[key])
            except ValueError:
                raise LoraFormatError(f"metadata {key}={metadata[key]!r} is not a {cast.__name__}") from None
    return out


def sampling_metadata(steps=None, gamma=None, cfg=None):
    """The metadata entries sampling_defaults reads back (safetensors metadata values are strings)."""
    values = {"steps": steps, "gamma": gamma, "cfg": cfg}
    return {SCOTT_METADATA[k][0]: str(v) for k, v in values.items() if v is not None}


def patched_delta(module, strength=1.0):
    """The weight update the module applies: strength * alpha / rank * up @ down (conv kernels flattened)."""
    up, down = module.up.flatten(1).double(), module.down.flatten(1).double()
    return strength * module.alpha / module.rank * (up @ down)


def _kohya_path(name):
    """'down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q' -> 'down_blocks.0...attn1.to_q'."""
    for i, word in enumerate(_COMPOUND_NAMES):
        name = re.sub(rf"(^|_){word}(?=_|$)", rf"\g<1>@{i}@", name)
    path = name.replace("_", ".")
    return re.sub(r"@(\d+)@", lambda m: _COMPOUND_NAMES[int(m.group(1))], path)


def _kohya_pairs(state_dict):
    pairs = {}
    for key, value in state_dict.items():
        match = re.fullmatch(_KOHYA_KEY, key)
        if match is None:
            raise LoraFormatError(f"unsupported kohya key {key!r} (only plain LoRA: lora_down/lora_up/alpha)")
        part = KOHYA_PARTS[match.group(1)]
        entry = pairs.setdefault((part, _kohya_path(match.group(2))), [None, None, None])
        slot = {"lora_down.weight": 0, "lora_up.weight": 1, "alpha": 2}[match.group(3)]
        entry[slot] = float(value) if slot == 2 else value
    return pairs


def _split_peft_key(key):
    """(module key, 0 for down/A, 1 for up/B) of a peft/diffusers LoRA key, else None."""
    match = re.fullmatch(r"(.+?)(\.lora_A|\.lora_B|[._]lora\.down|[._]lora\.up)(\.default)?\.weight", key)
    if match is None:
        return None
    return match.group(1), 0 if match.group(2).endswith(("lora_A", "lora.down")) else 1


def _peft_pairs(state_dict):
    pairs = {}
    for key, value in state_dict.items():
        split = _split_peft_key(key)
        if split is None:
            raise LoraFormatError(f"unsupported peft/diffusers key {key!r} (only plain LoRA: lora_A/lora_B)")
        module, slot = split
        module = module.removeprefix("base_model.model.")
        if module.startswith(DIFFUSERS_PREFIXES):
            part, path = module.split(".", 1)
        else:
            part, path = ("text_encoder", module) if module.startswith("text_model.") else ("unet", module)
        path = path.replace(".processor.", ".")
        pairs.setdefault((part, path), [None, None, None])[slot] = value
    return pairs


def _metadata_alphas(metadata):
    """{part: lora_alpha} from diffusers' lora_adapter_metadata JSON ("unet.lora_alpha" or "lora_alpha")."""
    raw = (metadata or {}).get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise LoraFormatError(f"metadata {DIFFUSERS_METADATA_KEY} is not JSON") from None
    if "lora_alpha" in meta:
        return dict.fromkeys(PARTS, float(meta["lora_alpha"]))
    return {part: float(meta[f"{part}.lora_alpha"]) for part in PARTS if f"{part}.lora_alpha" in meta}
