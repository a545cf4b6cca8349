"""Build a model with its weights from a ``ModelSource``.

Owns: reading checkpoints (Hugging Face safetensors directories, sharded or not;
GGUF files dequantized with the ``gguf`` package; random ``dummy`` weights of a
preset) into the model class the registry names for the architecture, on the
requested device, built with one rank's ``LayerContext`` (dtype, tp rank and
size): every layer keeps its own slice of each whole tensor. The module is
created on the meta device and materialised once, so large models are never
built twice.

A GGUF file is parsed and dequantized once; the float32 result is kept as
safetensors in the user cache (keyed by path, size and mtime), so later starts
of the same model read it directly.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Iterator

import numpy as np
import torch

from pdserve.common.model_source import ModelSource
from pdserve.engine.layers import LayerContext, init_dummy_weights
from pdserve.engine.layers.loading import CheckpointSlice
from pdserve.engine.models import model_config as mc
from pdserve.engine.models.interface import CausalLM
from pdserve.engine.models.registry import check_quantization, model_class


def load_config(source: ModelSource) -> mc.ModelConfig:
    """The model's description; UnsupportedModelError for what no model class serves."""
    if source.kind == "dummy":
        cfg = mc.from_preset(source.preset)
    elif source.kind == "hf":
        with open(os.path.join(source.path, "config.json")) as fh:
            cfg = mc.from_hf_config(json.load(fh))
    else:
        cfg = gguf_checkpoint(source.path)[0]
    check_quantization(cfg)
    return cfg


def load_model(source: ModelSource, cfg: mc.ModelConfig, ctx: LayerContext, device: torch.device,
               seed: int = 0) -> CausalLM:
    """One rank's model with its slices of the weights, ready to run on ``device``."""
    with torch.device("meta"):
        model = model_class(cfg.architecture)(cfg, ctx)
    # NOTE: every layer creates its parameters in their final dtype on the meta device, so
    # only that is ever allocated (an 8B model in bf16 is 16 GB; float32 first would need 48 GB).
    model = model.to_empty(device=device)
    if source.kind == "dummy":
        init_dummy_weights(model, seed, device)
    elif source.kind == "hf":
        model.load_weights(_safetensors_weights(source.path))
    else:
        model.load_weights(_safetensors_weights(gguf_checkpoint(source.path)[1]))
    model.prepare(device)
    return model.eval().requires_grad_(False)


def _cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pdserve", "weights")


def gguf_checkpoint(path: str) -> tuple[mc.ModelConfig, str]:
    """(config, directory of the dequantized float32 safetensors, Hugging Face tensor names and
    layouts), converting the GGUF on first use."""
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]
    target = os.path.join(_cache_root(), key)
    cfg_path = os.path.join(target, "model_config.json")
    if not os.path.exists(cfg_path):
        _convert_gguf(path, target)
    with open(cfg_path) as fh:
        return mc.ModelConfig.from_json_dict(json.load(fh)), target


def _convert_gguf(path: str, target: str) -> None:
    from safetensors.torch import save_file

    reader = _gguf_reader(path)
    cfg = mc.from_gguf_metadata(_gguf_metadata(reader), any(t.name == "output.weight" for t in reader.tensors))
    tensors = dict(_gguf_weights(reader, cfg))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".tmp-")
    try:
        save_file(tensors, os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "model_config.json"), "w") as fh:
            json.dump(cfg.to_json_dict(), fh)
        try:
            os.rename(tmp, target)
        except OSError:  # another process converted it meanwhile
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _safetensors_weights(directory: str) -> Iterator[tuple[str, CheckpointSlice]]:
    from safetensors import safe_open

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"model directory {directory!r} has no *.safetensors weights")
    for name in files:
        with safe_open(os.path.join(directory, name), framework="pt") as fh:
            for key in fh.keys():
                yield key, CheckpointSlice(fh.get_slice(key))  # NOTE: read by the layer, its part only


def _gguf_reader(path: str):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # corrupt or not a GGUF file
        raise mc.UnsupportedModelError(f"cannot read GGUF file {path!r}: {exc}") from exc


def _gguf_metadata(reader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            continue
        try:
            out[key] = field.contents()
        except Exception:  # fields of exotic types are not needed here
            continue
    return out


_GGUF_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GGUF_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}


def gguf_to_hf_name(name: str) -> str | None:
    if name in _GGUF_TOP:
        return _GGUF_TOP[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
    return None


def _gguf_weights(reader, cfg: mc.ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    import gguf

    for t in reader.tensors:
        hf_name = gguf_to_hf_name(t.name)
        if hf_name is None:
            continue
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except (NotImplementedError, KeyError, ValueError) as exc:
            raise mc.UnsupportedModelError(
                f"GGUF tensor {t.name!r} uses quant type {t.tensor_type.name}, which cannot be dequantized: {exc}") from exc
        data = np.array(data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
        if cfg.architecture in ("LlamaForCausalLM", "MistralForCausalLM"):
            data = _unpermute_qk(hf_name, data, cfg)
        yield hf_name, torch.from_numpy(np.ascontiguousarray(data))


def _unpermute_qk(name: str, w: np.ndarray, cfg: mc.ModelConfig) -> np.ndarray:
    """Undo llama.cpp's interleaving of rotary halves in q/k projections."""
    if name.endswith("q_proj.weight"):
        heads = cfg.num_heads
    elif name.endswith("k_proj.weight"):
        heads = cfg.num_kv_heads
    else:
        return w
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)
