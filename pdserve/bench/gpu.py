"""Whole-model GPU benchmark: the engine against the card's own ceilings and against HF transformers.

Owns: one run that reports, for one model on one device,
- the ceilings: device-to-device copy bandwidth (bytes read + written per second)
  and the bf16 matmul rate (8192^3), measured here, not taken from a datasheet;
- decode steps at batch 1, 8, 64, 256 with ~1024 tokens of context, against
  (weight bytes read + KV bytes read) / copy bandwidth. Two times per batch: the
  captured forward alone (graph replay) and the whole engine step (schedule, inputs,
  forward, sampling, bookkeeping);
- prefill of 8 x 1024-token prompts in one step, against 2 x params x tokens / matmul rate
  (the int8 rate for a W8A8 model, e.g. ``--model dummy:llama-3-8b-w8a8``);
- the paged decode attention kernel alone (batch 64 x context 4096; ``bench.kernels``);
- offline throughput (256 prompts x 1024 in, 128 out, ignore_eos) in output tokens/s,
  next to HF transformers ``generate`` on the same architecture and dtype with random
  weights on the same device, in the same run (HF on a subset of the prompts, in one
  batch, because it is slow; the output says how many).

Run: ``pdserve bench gpu`` (defaults: ``--model dummy:llama-3-8b --dtype bfloat16
--device-type cuda``). ``--device-type cpu`` with a small model and small sizes
smoke-tests the same code paths without a GPU. Lifecycle: one engine for the
engine phases, deleted before the HF model is built (both would not fit).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from pdserve.bench.offline import _prompts
from pdserve.common.sampling_params import SamplingParams


@dataclass(frozen=True)
class Ceilings:
    copy_bytes_per_s: float
    matmul_flops_per_s: float
    int8_ops_per_s: float = 0.0  # int8 x int8 -> int32 matmul (the prefill ceiling of a W8A8 model)


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pdserve bench gpu", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dummy:llama-3-8b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device-type", default="cuda")
    p.add_argument("--context", type=int, default=1024, help="decode context and prompt length")
    p.add_argument("--decode-batches", default="1,8,64,256")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--prefill-prompts", type=int, default=8)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--hf-prompts", type=int, default=64, help="prompts HF generate runs (one batch)")
    p.add_argument("--max-prefill-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--attention-kernel", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each step before reading the previous one's tokens (default: on for CUDA)")
    p.add_argument("--profile", action="store_true",
                   help="print the kernels of a decode forward and of a prefill step, and the host functions of "
                        "decode engine steps")
    p.add_argument("--json", default="", help="also write the figures to this file")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _median_ms(fn, device_type: str, reps: int = 10, warmup_ms: int = 25) -> float:
    if device_type == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=max(200, warmup_ms), return_mode="median")
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_ceilings(device: torch.device, matmul_n: int) -> Ceilings:
    """Copy: 1 GiB device-to-device, read + written bytes. Matmul: bf16 n^3 on random data;
    on CUDA also int8 n^3 (``torch._int_mm``, cuBLAS)."""
    int8 = _int8_ops_per_s(device, matmul_n) if device.type == "cuda" else 0.0
    return Ceilings(_copy_bytes_per_s(device), _matmul_flops_per_s(device, matmul_n), int8)


def _copy_bytes_per_s(device: torch.device) -> float:
    src = torch.randn(1 << 29 if device.type == "cuda" else 1 << 24, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), device.type)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def _matmul_flops_per_s(device: torch.device, n: int) -> float:
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=device) for _ in range(2))
    ms = _median_ms(lambda: a @ b, device.type, warmup_ms=1000)  # long warm-up: clocks ramp from idle
    return 2 * n ** 3 / (ms * 1e-3)


def weight_bytes_read(model) -> tuple[int, int]:
    """(parameters, bytes a decode step reads): every weight except an untied embedding table,
    of which a step reads only its batch's rows."""
    params = sum(p.numel() for p in model.parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head is not None:
        emb = model.model.embed_tokens.weight
        total -= emb.numel() * emb.element_size()
    return params, total


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts model's routed experts (zeros for a dense model): a decode
    step reads only the experts its tokens pick, a token computes only its top-k."""
    params: int  # every expert of every sparse layer
    bytes: int
    num_experts: int
    top_k: int

    def active_share(self, tokens: int) -> float:
        """Expected share of the experts a batch of ``tokens`` reads (uniform routing)."""
        if not self.num_experts:
            return 0.0
        return 1.0 - (1.0 - self.top_k / self.num_experts) ** tokens


def routed_experts(model) -> Experts:
    from pdserve.engine.layers.moe import FusedMoE

    layers = [m for m in model.modules() if isinstance(m, FusedMoE)]
    if not layers:
        return Experts(0, 0, 0, 0)
    tensors = [t for m in layers for t in (m.w13, m.w2)]
    return Experts(sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors),
                   layers[0].num_experts, layers[0].top_k)


def _add(engine, tag: str, prompts: list[list[int]], max_tokens: int) -> list[str]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, params)
    return ids


def bench_decode(llm, batch: int, args, vocab: int, ceil: Ceilings, weight_bytes: int,
                 experts: Experts = Experts(0, 0, 0, 0)) -> dict:
    """Fill `batch` sequences to ~context tokens, then time steady decode steps. For an MoE
    model the roofline counts the experts the batch is expected to read, not all."""
    weight_bytes = weight_bytes - experts.bytes + int(experts.bytes * experts.active_share(batch))
    engine = llm.engine
    ids = _add(engine, f"decode{batch}", _prompts(batch, args.context, vocab, args.seed + batch),
               args.max_model_len)
    while any(engine.requests[r].num_output_tokens == 0 for r in ids):
        engine.step()
    step_ms = []
    for _ in range(args.decode_steps):
        t0 = time.perf_counter()
        engine.step()
        step_ms.append((time.perf_counter() - t0) * 1e3)
    contexts = [engine.requests[r].num_tokens for r in ids]
    graphs = engine.local_rank().graphs
    padded = graphs.padded_size(batch) if graphs is not None else 0
    fwd_ms = _median_ms(lambda: graphs.replay(padded), args.device_type) if padded else float("nan")
    if args.profile and padded:
        _profile(engine, lambda: graphs.replay(padded))
    for r in ids:
        engine.abort(r)
    while engine.has_unfinished():  # NOTE: a step launched before the aborts is still in flight
        engine.step()
    kv = sum(contexts) * engine.block_bytes() // engine.config.block_size
    roof_ms = (weight_bytes + kv) / ceil.copy_bytes_per_s * 1e3
    step = statistics.median(step_ms)
    return {"batch": batch, "mean_context": sum(contexts) / batch, "graph_batch": padded,
            "weight_gb": weight_bytes / 1e9, "kv_gb": kv / 1e9, "roofline_ms": roof_ms,
            "forward_ms": fwd_ms, "step_ms": step, "forward_pct": 100 * roof_ms / fwd_ms,
            "step_pct": 100 * roof_ms / step}


def _kernel_table(run, reps: int) -> None:
    """Kernel time per kernel name over ``reps`` calls of ``run``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            run()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30), flush=True)


def _profile(engine, replay, steps: int = 8) -> None:
    """Kernel time per kernel name over a few graph replays; host time per function over engine steps."""
    import cProfile
    import io
    import pstats

    _kernel_table(replay, 3)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(steps):
        engine.step()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(12)
    print(buf.getvalue(), flush=True)


def bench_prefill(llm, args, vocab: int, ceil: Ceilings, params: int, reps: int = 3,
                  experts: Experts = Experts(0, 0, 0, 0)) -> dict:
    """One step that prefills `prefill_prompts` fresh prompts of `context` tokens (an MoE
    model's tokens each compute their top-k experts only)."""
    if experts.num_experts:
        params = params - experts.params + experts.params * experts.top_k // experts.num_experts
    engine = llm.engine
    n = args.prefill_prompts
    times = [_prefill_step(engine, n, args, vocab, rep) for rep in range(reps)]
    if args.profile and args.device_type == "cuda":
        print(f"kernels of one prefill step ({n} x {args.context} tokens):", flush=True)
        _kernel_table(lambda: _prefill_step(engine, n, args, vocab, reps), 1)
    tokens = n * args.context
    roof_ms = 2 * params * tokens / ceil.matmul_flops_per_s * 1e3
    best = min(times)
    run = _prefill_flops_run(engine, n, args.context, experts)
    return {"prompts": n, "tokens": tokens, "roofline_ms": roof_ms, "step_ms": best,
            "steps_ms": times, "pct": 100 * roof_ms / best, "flops_run": run,
            "tflops_achieved": run / (best * 1e-3) / 1e12}


def _prefill_step(engine, n: int, args, vocab: int, rep: int) -> float:
    """Milliseconds of one engine step that prefills ``n`` fresh prompts (and samples once each)."""
    ids = _add(engine, f"prefill{rep}", _prompts(n, args.context, vocab, args.seed + 1000 + rep), 1)
    engine.synchronize()
    t0 = time.perf_counter()
    outs = engine.step()  # ends with the sampled tokens' fetch
    ms = (time.perf_counter() - t0) * 1e3
    if len(outs) != n or engine.has_unfinished():
        raise RuntimeError(f"prefill of {n} x {args.context} did not fit one step: raise --max-prefill-tokens")
    assert not any(r in engine.requests for r in ids)
    return ms


def _prefill_flops_run(engine, n: int, length: int, experts: Experts) -> float:
    """FLOPs the prefill step really does: every layer's matmuls on every token (its top-k
    experts only), the LM head on the n sampled rows only, and causal attention (QK^T and PV)."""
    model, m = engine.local_rank().model, engine.model_config
    layer_params = sum(p.numel() for name, p in model.named_parameters() if name.startswith("model.layers."))
    if experts.num_experts:
        layer_params -= experts.params - experts.params * experts.top_k // experts.num_experts
    attention = 4 * m.num_heads * m.head_dim * (length * (length + 1) // 2) * n * m.num_layers
    return 2.0 * layer_params * n * length + 2.0 * m.vocab_size * m.hidden_size * n + attention


def bench_attention_kernel(ceil: Ceilings) -> dict:
    from pdserve.bench.kernels import kv_bytes, make_batch, time_decode

    batch = make_batch([1] * 64, [4096] * 64)
    ms = time_decode(batch, None)
    bw = kv_bytes(batch) / (ms * 1e-3)
    return {"batch": 64, "context": 4096, "kv_gb": kv_bytes(batch) / 1e9, "us": ms * 1e3,
            "gb_per_s": bw / 1e9, "pct": 100 * bw / ceil.copy_bytes_per_s}


def bench_offline(llm, args, vocab: int) -> dict:
    prompts = _prompts(args.num_prompts, args.context, vocab, args.seed + 7)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    n = sum(len(o.token_ids) for o in outs)
    return {"prompts": args.num_prompts, "prompt_len": args.context, "output_len": args.output_len,
            "output_tokens": n, "seconds": elapsed, "tok_per_s": n / elapsed}


def bench_hf(args, vocab: int) -> dict:
    from pdserve.bench.offline import run_hf

    hf_args = argparse.Namespace(model=args.model, dtype=args.dtype, device_type=args.device_type,
                                 hf_batch_size=args.hf_prompts, output_len=args.output_len)
    prompts = _prompts(args.hf_prompts, args.context, vocab, args.seed + 7)
    elapsed, n = run_hf(hf_args, prompts)
    return {"prompts": args.hf_prompts, "batch": args.hf_prompts, "output_tokens": n, "seconds": elapsed,
            "tok_per_s": n / elapsed}


def _int8_ops_per_s(device: torch.device, n: int) -> float:
    a, b = (torch.randint(-127, 128, (n, n), dtype=torch.int8, device=device) for _ in range(2))
    bt = b.t()  # NOTE: cuBLAS int8 wants the second operand column-major
    ms = _median_ms(lambda: torch._int_mm(a, bt), device.type, warmup_ms=1000)
    return 2 * n ** 3 / (ms * 1e-3)


def run_engine_phases(args, vocab: int, ceil: Ceilings) -> dict:
    from pdserve.engine import LLM

    per_seq_blocks = -(-(args.context + args.output_len) // 16)
    llm = LLM(args.model, dtype=args.dtype, device_type=args.device_type,
              num_blocks=args.num_prompts * per_seq_blocks + 64, max_batch_size=args.num_prompts,
              max_prefill_tokens=args.max_prefill_tokens, max_model_len=args.max_model_len,
              async_scheduling=args.async_scheduling)
    model = llm.engine.local_rank().model
    params, weight_bytes = weight_bytes_read(model)
    experts = routed_experts(model)
    quantization = llm.engine.model_info()["quantization"]
    if quantization:  # NOTE: a W8A8 model's prefill runs on the int8 tensor cores
        ceil = Ceilings(ceil.copy_bytes_per_s, ceil.int8_ops_per_s or ceil.matmul_flops_per_s, ceil.int8_ops_per_s)
    out = {"params": params, "weight_bytes_read": weight_bytes, "decode": [], "quantization": quantization,
           "experts": {"num": experts.num_experts, "top_k": experts.top_k, "bytes": experts.bytes}}
    for b in (int(x) for x in args.decode_batches.split(",")):
        out["decode"].append(bench_decode(llm, b, args, vocab, ceil, weight_bytes, experts))
        print(_decode_line(out["decode"][-1]), flush=True)
    out["prefill"] = bench_prefill(llm, args, vocab, ceil, params, experts=experts)
    print(_prefill_line(out["prefill"]), flush=True)
    out["offline"] = bench_offline(llm, args, vocab)
    print(f"offline pdserve: {out['offline']['tok_per_s']:.0f} tok/s", flush=True)
    return out


def _decode_line(d: dict) -> str:
    return (f"decode B={d['batch']:3d} (graph {d['graph_batch']:3d}) ctx~{d['mean_context']:.0f}: "
            f"roofline {d['roofline_ms']:6.2f} ms ({d['weight_gb']:.2f} GB weights + {d['kv_gb']:.2f} GB KV) | "
            f"forward {d['forward_ms']:6.2f} ms = {d['forward_pct']:4.1f}% | "
            f"engine step {d['step_ms']:6.2f} ms = {d['step_pct']:4.1f}%")


def _prefill_line(p: dict) -> str:
    return (f"prefill {p['prompts']} x {p['tokens'] // p['prompts']}: {p['step_ms']:.1f} ms vs "
            f"{p['roofline_ms']:.1f} ms (2 x params x tokens / matmul rate) = {p['pct']:.1f}%; "
            f"FLOPs actually run {p['flops_run'] / 1e12:.1f} T at {p['tflops_achieved']:.0f} TFLOP/s")


def _free_device_memory(device_type: str) -> None:
    gc.collect()
    if device_type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def main(argv: list[str]) -> int:
    args = _args(argv)
    from pdserve.common.model_source import resolve_model
    from pdserve.engine.models.loader import load_config
    from pdserve.engine.platforms import get_platform

    platform = get_platform(args.device_type)
    device = platform.device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{date} device={name} torch {torch.__version__} model={args.model} dtype={args.dtype}", flush=True)
    torch.manual_seed(args.seed)
    ceil = measure_ceilings(device, 8192 if device.type == "cuda" else 1024)
    print(f"copy {ceil.copy_bytes_per_s / 1e9:,.0f} GB/s (read + write); "
          f"bf16 matmul {ceil.matmul_flops_per_s / 1e12:,.1f} TFLOP/s; int8 matmul {ceil.int8_ops_per_s / 1e12:,.1f} TOP/s",
          flush=True)
    result = {"date": date, "device": name, "model": args.model, "dtype": args.dtype,
              "copy_gb_per_s": ceil.copy_bytes_per_s / 1e9, "matmul_tflops": ceil.matmul_flops_per_s / 1e12,
              "int8_tops": ceil.int8_ops_per_s / 1e12}
    if args.attention_kernel and device.type == "cuda":
        result["attention_kernel"] = bench_attention_kernel(ceil)
        _free_device_memory(args.device_type)
    vocab = load_config(resolve_model(args.model)).vocab_size
    result.update(run_engine_phases(args, vocab, ceil))
    _free_device_memory(args.device_type)
    if not args.skip_hf and not result["quantization"]:  # NOTE: HF has no random-weight W8A8 model to compare
        result["hf"] = bench_hf(args, vocab)
    _print_summary(result)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


def _print_summary(r: dict) -> None:
    print(f"\n== {r['model']} {r['dtype']} on {r['device']}, {r['date']} ==")
    print(f"copy bandwidth {r['copy_gb_per_s']:,.0f} GB/s (read + write), "
          f"bf16 matmul {r['matmul_tflops']:,.1f} TFLOP/s")
    print(f"params {r['params'] / 1e9:.2f} B; weight bytes read per decode step {r['weight_bytes_read'] / 1e9:.2f} GB")
    e = r.get("experts", {})
    if e.get("num"):
        print(f"experts: {e['num']} per sparse layer, top-{e['top_k']}, {e['bytes'] / 1e9:.2f} GB in all; a decode "
              "step's roofline counts the share its batch is expected to read under uniform routing")
    for d in r["decode"]:
        print(_decode_line(d))
    print(_prefill_line(r["prefill"]))
    if "attention_kernel" in r:
        a = r["attention_kernel"]
        print(f"paged decode attention B=64 x ctx 4096: {a['us']:.0f} us, {a['gb_per_s']:,.0f} GB/s "
              f"= {a['pct']:.1f}% of copy")
    o = r["offline"]
    print(f"offline {o['prompts']} prompts x {o['prompt_len']} in, {o['output_len']} out: pdserve "
          f"{o['output_tokens']} tokens in {o['seconds']:.2f} s = {o['tok_per_s']:,.0f} tok/s")
    if "hf" in r:
        h = r["hf"]
        print(f"HF transformers generate ({h['prompts']} of the prompts, one batch of {h['batch']}): "
              f"{h['output_tokens']} tokens in {h['seconds']:.2f} s = {h['tok_per_s']:,.0f} tok/s; "
              f"ratio pdserve / HF = {o['tok_per_s'] / h['tok_per_s']:.1f}x")
