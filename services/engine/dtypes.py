"""The engine's one table of dtypes, by name (the names configs, records and handshakes use).

Owns: which dtypes a model may run in (``MODEL_DTYPES``), the byte size of every
dtype a KV cache may hold (``ITEMSIZE``), and the name -> ``torch.dtype`` map.
Imports torch only when a torch dtype is asked for, so configs stay torch-free.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MODEL_DTYPES = ("float32", "bfloat16", "float16")
ITEMSIZE = MappingProxyType({"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1})


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    if name not in ITEMSIZE:
        raise ValueError(f"dtype {name!r} is unknown; expected one of {sorted(ITEMSIZE)}")
    return getattr(torch, name)


__all__ = ["ITEMSIZE", "MODEL_DTYPES", "torch_dtype"]
