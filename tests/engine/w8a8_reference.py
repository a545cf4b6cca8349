"""References for the W8A8 tests: a checkpoint made by llmcompressor, and a float fake-quant model.

``make_llmcompressor_checkpoint`` runs llmcompressor (SmoothQuant, then W8A8 int8
with lm_head ignored) on a tiny random checkpoint in a subprocess (llmcompressor
patches transformers while it works); its output is the standard compressed-tensors
checkpoint. ``fake_quant_model`` loads any W8A8 checkpoint into a float32
transformers model: weights dequantized (q * scale), and every quantized Linear's
input rounded per token as pdserve's kernels round it (``quant_per_token_ref``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from pdserve.kernels.reference import quant_per_token_ref

_SCRIPT = r"""
import sys, torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

base, out, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(base)
gen = torch.Generator().manual_seed(seed)
vocab = model.config.vocab_size
rows = [{"input_ids": torch.randint(3, vocab, (1, 64), generator=gen),
         "attention_mask": torch.ones(1, 64, dtype=torch.long)} for _ in range(8)]
recipe = [SmoothQuantModifier(smoothing_strength=0.5),
          QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
oneshot(model=model, processor=tok, dataset=DataLoader(rows, batch_size=None), recipe=recipe,
        num_calibration_samples=len(rows), max_seq_length=64, output_dir=None)
model.save_pretrained(out, save_compressed=True)
tok.save_pretrained(out)
"""


def make_llmcompressor_checkpoint(base: str, out: str, seed: int = 0) -> str:
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, base, out, str(seed)], capture_output=True, text=True,
                          timeout=600, cwd=os.path.dirname(out))
    if proc.returncode != 0:
        raise RuntimeError(f"llmcompressor failed:\n{proc.stderr[-3000:]}")
    return out


def fake_quant_model(path: str, tp: int = 1) -> torch.nn.Module:
    """A float32 transformers model computing what a W8A8 checkpoint means (see module doc).
    With ``tp`` > 1, the input of a row-parallel layer (o_proj, down_proj) is rounded in
    ``tp`` slices, each with its own scale, as each rank rounds its own slice."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    with open(os.path.join(path, "config.json")) as fh:
        raw = json.load(fh)
    raw.pop("quantization_config")
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = load_file(os.path.join(path, "model.safetensors"))
    quantized = sorted(k[:-len(".weight_scale")] for k in state if k.endswith(".weight_scale"))
    for name in quantized:
        state[f"{name}.weight"] = state[f"{name}.weight"].float() * state.pop(f"{name}.weight_scale").float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    if config.tie_word_embeddings:
        model.tie_weights()
    modules = dict(model.named_modules())
    for name in quantized:
        slices = tp if name.endswith(("o_proj", "down_proj")) else 1
        modules[name].register_forward_pre_hook(lambda _m, args, n=slices: (_round_rows(args[0], n),))
    return model.eval()


def _round_rows(x: torch.Tensor, slices: int = 1) -> torch.Tensor:
    return torch.cat([_round(part) for part in x.chunk(slices, dim=-1)], dim=-1)


def _round(x: torch.Tensor) -> torch.Tensor:
    q, scale = quant_per_token_ref(x.reshape(-1, x.shape[-1]))
    return (q.float() * scale).reshape(x.shape).to(x.dtype)
