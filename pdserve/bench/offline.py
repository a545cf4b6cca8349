"""Offline throughput: pdserve's engine against transformers ``generate`` in the same run.

N random prompts of P tokens, O output tokens each with ignore_eos. pdserve gets all
prompts at once (continuous batching); transformers gets them in padded batches.
Prints output tokens/s for both and the ratio. With ``--batch B`` pdserve keeps B requests
in flight (a closed loop) and also reports TTFT and inter-token latency, and at B = 1 the
decode step against the bytes-read roofline with the memory bandwidth measured in the
same run (``latency``); transformers then generates in batches of B.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pdserve.common.sampling_params import SamplingParams


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pdserve bench offline")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device-type", default="cpu")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-prefill-tokens", type=int, default=2048)
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--torch-only", action="store_true", help="CPU: pure torch, not pdserve's compiled CPU kernels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (one process each)")
    p.add_argument("--adapters", default="",
                   help="LoRA adapters name=path,...: the prompts are spread evenly over them (mixed batches)")
    p.add_argument("--against", default="",
                   help="compare with this second model on pdserve (e.g. the unquantized one) instead of transformers")
    p.add_argument("--batch", type=int, default=0,
                   help="keep this many requests in flight; report TTFT and inter-token latency too "
                        "(at 1: the decode step against the memory roofline)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat pdserve then transformers this many times (noisy hosts); prints the median ratio")
    return p.parse_args(argv)


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 10, (n, length), generator=g).tolist()


def run_pdserve(args, prompts) -> tuple[float, int]:
    from pdserve.engine import LLM

    num_blocks = args.num_prompts * -(-(args.prompt_len + args.output_len) // 16) + 64
    adapters = tuple(a for a in args.adapters.split(",") if a)
    llm = LLM(args.model, dtype=args.dtype, device_type=args.device_type, num_blocks=num_blocks,
              max_batch_size=args.max_batch_size, max_prefill_tokens=args.max_prefill_tokens,
              compiled_cpu_kernels=not args.torch_only, tp=args.tp, adapters=adapters,
              max_loras=max(4, len(adapters)))
    names = [a.partition("=")[0] for a in adapters]
    per_prompt = [names[i % len(names)] for i in range(len(prompts))] if names else None
    try:
        params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
        llm.generate([prompts[0][:16]], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
        if args.batch:
            return _run_latency(llm, args, prompts)
        _sync(args.device_type)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, adapter=per_prompt)
        _sync(args.device_type)
        elapsed = time.perf_counter() - t0
    finally:
        llm.engine.close()  # NOTE: stops the rank processes of tp > 1
    return elapsed, sum(len(o.token_ids) for o in outs)


def _run_latency(llm, args, prompts) -> tuple[float, int]:
    from pdserve.bench import latency
    from pdserve.bench.gpu import weight_bytes_read

    report = latency.run(llm, prompts, args.batch, args.output_len, args.device_type)
    for line in report.lines():
        print(line, flush=True)
    if args.batch == 1 and args.tp == 1:
        engine = llm.engine
        _, weights = weight_bytes_read(engine.local_rank().model)
        bandwidth = latency.read_bandwidth(args.device_type)
        roof = latency.decode_roofline_ms(weights, engine.block_bytes() // engine.config.block_size,
                                          args.prompt_len + args.output_len / 2, bandwidth)
        step = statistics.median(report.itl_ms)
        print(f"  memory read bandwidth {bandwidth / 1e9:.1f} GB/s; weights {weights / 1e6:.0f} MB; "
              f"roofline {roof:.2f} ms per step; median step {step:.2f} ms = {step / roof:.2f}x the roofline",
              flush=True)
    return report.seconds, report.tokens


def run_hf(args, prompts) -> tuple[float, int]:
    model = _hf_model(args)
    dev = torch.device(args.device_type)
    total, t0 = 0, None
    for i in range(0, len(prompts), args.hf_batch_size):
        batch = torch.tensor(prompts[i:i + args.hf_batch_size], device=dev)
        if t0 is None:  # warm-up on the first batch, untimed
            model.generate(batch[:1, :16], max_new_tokens=4, do_sample=False)
            _sync(args.device_type)
            t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=False,
                                 max_new_tokens=args.output_len, min_new_tokens=args.output_len,
                                 pad_token_id=0)
        total += (out.shape[1] - batch.shape[1]) * batch.shape[0]
    _sync(args.device_type)
    return time.perf_counter() - t0, total


def _hf_model_type(architecture: str) -> str:
    """transformers' model type of an architecture name (``Qwen3MoeForCausalLM`` -> ``qwen3_moe``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    # NOTE: several model types may share a class (LlamaForCausalLM): take the one it is named after
    types = [t for t, name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if name == architecture]
    if not types:
        raise ValueError(f"transformers has no causal LM named {architecture!r}")
    named = [t for t in types if architecture.lower().startswith(t.replace("_", ""))]
    return (named or types)[0]


def _hf_model(args):
    import os

    from transformers import AutoConfig, AutoModelForCausalLM

    from pdserve.common.model_source import resolve_model
    from pdserve.engine.models.model_config import PRESETS

    dtype = getattr(torch, args.dtype)
    src = resolve_model(args.model)
    if src.kind == "gguf":
        m = AutoModelForCausalLM.from_pretrained(os.path.dirname(src.path), gguf_file=os.path.basename(src.path),
                                                 dtype=dtype)
    elif src.kind == "hf":
        m = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype)
    else:
        values = dict(PRESETS[src.preset])
        cfg = AutoConfig.for_model(_hf_model_type(values.pop("architectures")[0]), **values)
        with torch.device(args.device_type):
            m = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return m.to(args.device_type).eval()


def _sync(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str]) -> int:
    args = _args(argv)
    if args.batch < 0:
        raise SystemExit(f"--batch must be 1 or more (0: no latency run), not {args.batch}")
    if args.batch:
        if args.adapters:
            raise SystemExit("--batch runs the base model only: leave out --adapters")
        args.max_batch_size = args.hf_batch_size = args.batch
    from pdserve.common.model_source import resolve_model
    from pdserve.engine.models.loader import load_config

    vocab = load_config(resolve_model(args.model)).vocab_size
    prompts = _prompts(args.num_prompts, args.prompt_len, vocab, args.seed)
    print(f"model={args.model} dtype={args.dtype} device={args.device_type} prompts={args.num_prompts}"
          f"x{args.prompt_len} output={args.output_len} threads={torch.get_num_threads()}")
    ratios = []
    for r in range(args.rounds):
        label = f"[round {r + 1}/{args.rounds}] " if args.rounds > 1 else ""
        t, n = run_pdserve(args, prompts)
        ours = n / t
        print(f"{label}pdserve:      {n} output tokens in {t:.2f} s = {ours:.1f} tok/s", flush=True)
        if args.skip_hf and not args.against:
            continue
        other = args.against or "transformers"
        t, n = run_pdserve(argparse.Namespace(**{**vars(args), "model": args.against}), prompts) if args.against \
            else run_hf(args, prompts)
        theirs = n / t
        print(f"{label}{other}: {n} output tokens in {t:.2f} s = {theirs:.1f} tok/s", flush=True)
        ratios.append(ours / theirs)
        print(f"{label}ratio {args.model} / {other}: {ours / theirs:.2f}x", flush=True)
    if len(ratios) > 1:
        print(f"median ratio over {len(ratios)} rounds: {statistics.median(ratios):.2f}x "
              f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x)")
    return 0
