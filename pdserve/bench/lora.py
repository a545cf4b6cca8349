"""Decode speed with LoRA adapters: the base model, then the same model with LoRA on and a
full batch spread over 0, 16 and 64 adapters, decode graphs on, in one run.

Owns nothing past the run. Adapters: random rank-``--rank`` PEFT adapters of every
projection (q, k, v, o, gate, up, down), ``--distinct`` of them written to a temporary
directory and registered under as many names as the largest count needs (a slot's
weights are read whether or not another slot holds the same ones). Per configuration:
the median engine step at ``--batch`` sequences of ~``--context`` tokens, the captured
forward alone (graph replay), and output tok/s = batch / step. Lifecycle: the base
engine first (closed after it), then one engine with ``max_loras`` = the largest count.

Run: ``pdserve bench lora`` (defaults: ``--model dummy:llama-3-8b --dtype bfloat16
--device-type cuda``); ``--device-type cpu`` with a small model smoke-tests it.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time

from typing import TYPE_CHECKING

import torch

from pdserve.bench.gpu import _median_ms
from pdserve.bench.offline import _prompts
from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.models.model_config import ModelConfig

if TYPE_CHECKING:
    from pdserve.engine import LLM

_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pdserve bench lora")
    p.add_argument("--model", default="dummy:llama-3-8b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device-type", default="cuda")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=512, help="prompt length (decode context)")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per configuration")
    p.add_argument("--adapters", default="0,16,64", help="adapter counts spread over the batch")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--distinct", type=int, default=4, help="adapter files written (names reuse them)")
    p.add_argument("--json", default="", help="also write the figures to this file")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def write_adapter(directory: str, cfg: ModelConfig, rank: int, seed: int) -> str:
    """A random PEFT adapter (every projection of every layer) of ``cfg``'s shapes."""
    from safetensors.torch import save_file

    q, kv, hidden, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size, \
        cfg.intermediate_size
    shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_layers):
        for name, (n_in, n_out) in shapes.items():
            owner = "self_attn" if name in _TARGETS[:4] else "mlp"
            stem = f"base_model.model.model.layers.{layer}.{owner}.{name}"
            tensors[f"{stem}.lora_A.weight"] = (torch.randn(rank, n_in, generator=gen) / n_in ** 0.5).bfloat16()
            tensors[f"{stem}.lora_B.weight"] = (torch.randn(n_out, rank, generator=gen) * 0.01).bfloat16()
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
    with open(os.path.join(directory, "adapter_config.json"), "w") as fh:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(_TARGETS)}, fh)
    return directory


def measure(llm: "LLM", args: argparse.Namespace, vocab: int, names: list[str | None], tag: str,
            batch: int | None = None) -> dict:
    """Fill ``batch`` (default ``args.batch``) sequences (request i with adapter names[i % len]),
    then time decode steps."""
    engine, batch = llm.engine, batch or args.batch
    params = SamplingParams(max_tokens=args.steps + 64, temperature=0.0, ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(batch)]
    for i, (rid, prompt) in enumerate(zip(ids, _prompts(batch, args.context, vocab, args.seed))):
        engine.add_request(rid, prompt, params, adapter=names[i % len(names)])
    while any(engine.requests[r].num_output_tokens < 4 for r in ids):
        engine.step()
    step_ms = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        engine.step()
        step_ms.append((time.perf_counter() - t0) * 1e3)
    graphs = engine.local_rank().graphs
    padded = graphs.padded_size(batch) if graphs is not None else 0
    fwd_ms = _median_ms(lambda: graphs.replay(padded), args.device_type) if padded else float("nan")
    for r in ids:
        engine.abort(r)
    while engine.has_unfinished():  # NOTE: a step launched before the aborts is still in flight
        engine.step()
    step = statistics.median(step_ms)
    return {"config": tag, "batch": batch, "adapters": len({n for n in names if n}), "step_ms": step,
            "forward_ms": fwd_ms, "tok_per_s": batch / step * 1e3}


def load_times(llm: "LLM", path: str, repeats: int = 3) -> dict:
    """Median wall time to load one adapter at run time (read, check, slice into host memory)
    and to swap it into a device slot (the copy a request's first step waits for).

    NOTE: writes slot 0 behind the scheduler's back: the last thing a run does."""
    engine, slots = llm.engine, llm.engine.local_rank().lora
    load_ms, swap_ms = [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        engine.load_adapter(f"fresh{i}", path)
        load_ms.append((time.perf_counter() - t0) * 1e3)
        _sync(llm)
        t0 = time.perf_counter()
        slots.activate(0, f"fresh{i}")
        _sync(llm)
        swap_ms.append((time.perf_counter() - t0) * 1e3)
        engine.unload_adapter(f"fresh{i}")
    return {"load_ms": statistics.median(load_ms), "swap_in_ms": statistics.median(swap_ms)}


def _sync(llm: "LLM") -> None:
    if torch.cuda.is_available() and llm.engine.device.type == "cuda":
        torch.cuda.synchronize()


def _engine(args: argparse.Namespace, **lora: object) -> "LLM":
    from pdserve.engine import LLM

    blocks = args.batch * -(-(args.context + args.steps + 80) // 16) + 64
    return LLM(args.model, dtype=args.dtype, device_type=args.device_type, num_blocks=blocks,
               max_batch_size=args.batch, **lora)


def main(argv: list[str]) -> int:
    from pdserve.common.model_source import resolve_model
    from pdserve.engine.models.loader import load_config

    args = _args(argv)
    cfg = load_config(resolve_model(args.model))
    counts = [int(c) for c in args.adapters.split(",")]
    print(f"model={args.model} dtype={args.dtype} device={args.device_type} batch={args.batch} "
          f"context={args.context} rank={args.rank} adapters={counts}", flush=True)
    results = []
    llm = _engine(args)
    results.append(measure(llm, args, cfg.vocab_size, [None], "base (LoRA off)"))
    _print(results[-1], results[0])
    single = [measure(llm, args, cfg.vocab_size, [None], "base, batch 1", batch=1)]
    _print(single[-1], single[0])
    llm.engine.close()
    del llm
    gc.collect()
    with tempfile.TemporaryDirectory() as tmp:
        files = [write_adapter(os.path.join(tmp, f"a{i}"), cfg, args.rank, args.seed + i) for i in range(args.distinct)]
        most = max(max(counts), 1)
        llm = _engine(args, enable_lora=True, max_loras=most, max_cpu_loras=most + 1, max_lora_rank=args.rank)
        for i in range(most):
            llm.engine.load_adapter(f"a{i}", files[i % len(files)])
        print(f"LoRA stacks: {llm.engine.local_rank().lora.stack_bytes / 1e9:.2f} GB", flush=True)
        for count in counts:
            names = [f"a{i}" for i in range(count)] or [None]
            results.append(measure(llm, args, cfg.vocab_size, names, f"LoRA on, {count} adapters"))
            _print(results[-1], results[0])
        for names in ([None], ["a0"]):
            single.append(measure(llm, args, cfg.vocab_size, names, f"LoRA on, batch 1, {len([n for n in names if n])} adapter",
                                  batch=1))
            _print(single[-1], single[0])
        loading = load_times(llm, files[0])
        print(f"one adapter at run time: load {loading['load_ms']:.1f} ms, swap into a slot "
              f"{loading['swap_in_ms']:.2f} ms", flush=True)
        results += single
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results, "loading": loading}, fh, indent=1)
    return 0


def _print(r: dict, base: dict) -> None:
    print(f"{r['config']:>24}: step {r['step_ms']:.2f} ms, forward {r['forward_ms']:.2f} ms, "
          f"{r['tok_per_s']:.0f} tok/s ({r['tok_per_s'] / base['tok_per_s']:.2f}x base)", flush=True)
