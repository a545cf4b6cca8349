"""Perplexity of a model on a text, computed by pdserve's own model code and kernels.

Owns: ``Scorer`` (every position's logits of a token sequence) and ``perplexity``
(and ``PerplexityResult``): one rank's model (tp 1) built as
the engine builds it (so a quantized checkpoint runs its int8 linear method), the
text tokenized with the model's tokenizer and cut into windows of ``window``
tokens; each window runs as one prefill over a KV cache of its own, every
position's logits scored against the next token. Lifecycle: everything is built
and freed within one call. Used by ``pdserve quantize`` (before/after figures),
``pdserve eval perplexity`` and the W8A8 accuracy tests.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pdserve.common.model_source import resolve_model
from pdserve.common.tokenizer import load_tokenizer
from pdserve.engine.backends.base import AttentionMetadata, Backend
from pdserve.engine.dtypes import torch_dtype
from pdserve.engine.layers import LayerContext, prepare_weights
from pdserve.engine.models.interface import CausalLM
from pdserve.engine.models.loader import load_config, load_model
from pdserve.engine.platforms import get_platform
from pdserve.engine.quant import linear_methods

BLOCK = 16


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    tokens: int  # scored tokens (every window's tokens but its first)
    windows: int


# Held-out text: module documentation that ships with Python, apart from the pydoc
# topics that calibration reads.
HELDOUT_MODULES = ("argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv", "dataclasses",
                   "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools", "heapq", "inspect",
                   "itertools", "json", "logging", "pathlib", "pickle", "random", "re", "shutil", "sqlite3",
                   "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest",
                   "urllib.parse", "uuid", "zipfile")


def heldout_text() -> str:
    """The docstrings of ``HELDOUT_MODULES`` and their public classes and functions, in a fixed order."""
    import importlib
    import inspect

    parts: list[str] = []
    for name in HELDOUT_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(getattr(module, "__all__", None) or dir(module)):
            obj = getattr(module, attr, None)
            if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)):
                parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(p for p in parts if p)


@torch.inference_mode()
def perplexity(model: str, text: str, dtype: str = "float32", device_type: str = "cpu", window: int = 512,
               max_windows: int | None = None) -> PerplexityResult:
    """exp(mean negative log-likelihood) of ``text``'s tokens, window by window."""
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    scorer = Scorer(model, dtype, device_type)
    ids = scorer.tokenizer.encode(text)
    chunks = [ids[i:i + window] for i in range(0, len(ids), window) if len(ids[i:i + window]) >= 2]
    if max_windows is not None:
        chunks = chunks[:max_windows]
    if not chunks:
        raise ValueError(f"the text is too short: {len(ids)} tokens")
    nll, count = 0.0, 0
    for chunk in chunks:
        logits = scorer.logits(chunk)
        nll += torch.nn.functional.cross_entropy(logits[:-1].float(), logits.new_tensor(chunk[1:], dtype=torch.long),
                                                 reduction="sum").item()
        count += len(chunk) - 1
    return PerplexityResult(math.exp(nll / count), count, len(chunks))


class Scorer:
    """One rank's model (tp 1), built as the engine builds it, that returns every position's logits."""

    def __init__(self, model: str, dtype: str = "float32", device_type: str = "cpu"):
        self.source = resolve_model(model)
        cfg = load_config(self.source)
        platform = get_platform(device_type)
        self.device, self.dtype = platform.device(), dtype
        ctx = LayerContext(dtype=torch_dtype(dtype), quantization=linear_methods.for_checkpoint(cfg.quantization))
        self.model = load_model(self.source, cfg, ctx, self.device)
        self.backend = platform.backend()
        prepare_weights(self.model, self.backend)
        self.model.fuse_layers(self.backend)

    @property
    def tokenizer(self):
        return load_tokenizer(self.source)

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """Logits [len(ids), vocab] of every position, the sequence run as one prefill."""
        return _window_logits(self.model, self.backend, torch.tensor(ids, device=self.device), self.dtype, self.device)


def _window_logits(net: CausalLM, be: Backend, ids: torch.Tensor, dtype: str, device: torch.device) -> torch.Tensor:
    """Logits [T, vocab] of every position of one sequence, run as a single prefill."""
    t = ids.numel()
    blocks = -(-t // BLOCK)
    kv = torch.zeros((net.config.num_layers, blocks, 2, BLOCK, net.kv_heads_per_rank(), net.config.head_dim),
                     dtype=torch_dtype(dtype), device=device)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(t, device=device), query_start_loc=torch.tensor([0, t], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([t], dtype=torch.int32, device=device),
        block_tables=torch.arange(blocks, dtype=torch.int32, device=device).view(1, -1),
        max_query_len=t, max_seq_len=t, query_lens_cpu=(t,), seq_lens_cpu=(t,))
    hidden = net(ids, torch.arange(t, device=device), kv, meta, be)
    return net.compute_logits(hidden, be)


__all__ = ["HELDOUT_MODULES", "PerplexityResult", "Scorer", "heldout_text", "perplexity"]
