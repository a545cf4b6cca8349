"""Reading a LoRA adapter saved in the PEFT format.

Owns ``PeftAdapter`` (name, rank, scaling, and for every targeted module of the base
model its ``A [r, in]`` and ``B [out, r]``) and ``load_peft_adapter``, which reads
``adapter_config.json`` with ``adapter_model.safetensors`` (or ``.bin``) and refuses
what cannot be served with a message naming it: a rank above the maximum, biases or
extra trained modules, DoRA, tensors missing their pair. Whether the targets fit the
base model is checked where the adapter is placed (``slots``). ``adapter_target_modules``
names the modules an adapter trains from its tensors' names alone (no weights read).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

_PREFIX = "base_model.model."


@dataclass(frozen=True)
class PeftAdapter:
    name: str
    rank: int
    scaling: float  # lora_alpha / r (rsLoRA: / sqrt(r))
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A [r, in], B [out, r])


def load_peft_adapter(name: str, path: str, max_rank: int) -> PeftAdapter:
    """Raises ValueError naming the problem (and the adapter) when it cannot be served."""
    config = _read_config(name, path)
    rank = int(config.get("r", 0))
    if not 1 <= rank <= max_rank:
        raise ValueError(f"adapter {name!r}: rank r={rank} is outside [1, max_lora_rank={max_rank}]")
    for key, off in (("bias", "none"), ("use_dora", False)):
        if config.get(key, off) not in (off, None):
            raise ValueError(f"adapter {name!r}: {key}={config[key]!r} is not supported (only {off!r})")
    if config.get("modules_to_save"):
        raise ValueError(f"adapter {name!r}: modules_to_save={config['modules_to_save']} is not supported")
    alpha = float(config.get("lora_alpha", rank))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return PeftAdapter(name, rank, scaling, _pairs(name, _read_tensors(name, path)))


def adapter_target_modules(name: str, path: str) -> frozenset[str]:
    """The modules the adapter at ``path`` trains, by their last name (``q_proj``, ...)."""
    _read_config(name, path)
    safetensors = os.path.join(path, "adapter_model.safetensors")
    if os.path.exists(safetensors):
        from safetensors import safe_open

        with safe_open(safetensors, framework="pt") as fh:
            keys = list(fh.keys())
    else:
        keys = list(_read_tensors(name, path))
    stems = [key.removeprefix(_PREFIX).split(".lora_A.")[0] for key in keys if ".lora_A." in key]
    return frozenset(stem.rpartition(".")[2] for stem in stems)


def _read_config(name: str, path: str) -> dict:
    file = os.path.join(path, "adapter_config.json")
    try:
        with open(file) as fh:
            config = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"adapter {name!r}: cannot read {file}: {exc}") from None
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"adapter {name!r}: peft_type={config.get('peft_type')!r} is not LORA")
    return config


def _read_tensors(name: str, path: str) -> dict[str, torch.Tensor]:
    safetensors = os.path.join(path, "adapter_model.safetensors")
    if os.path.exists(safetensors):
        from safetensors.torch import load_file

        return load_file(safetensors)
    binary = os.path.join(path, "adapter_model.bin")
    if os.path.exists(binary):
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise ValueError(f"adapter {name!r}: no adapter_model.safetensors or adapter_model.bin in {path}")


def _pairs(name: str, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        stem = key.removeprefix(_PREFIX)
        for half in ("lora_A", "lora_B"):
            marker = f".{half}."
            if marker in stem:
                module = stem.split(marker)[0]
                halves.setdefault(module, {})[half] = tensor.float()
                break
        else:
            raise ValueError(f"adapter {name!r}: tensor {key!r} is not a LoRA A/B matrix (adapters that train "
                             "base weights, e.g. embedding layers or lm_head, are not supported)")
    out = {}
    for module, pair in halves.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"adapter {name!r}: module {module!r} has {sorted(pair)} but needs lora_A and lora_B")
        out[module] = (pair["lora_A"], pair["lora_B"])
    return out


__all__ = ["PeftAdapter", "adapter_target_modules", "load_peft_adapter"]
