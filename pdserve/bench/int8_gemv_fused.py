"""W8A8 decode: the fused GEMVs of ``kernels/int8_gemv_fused.py`` against the ops they replace.

Owns: the benchmark only. Llama-3-8B shapes, M = 1 and 2 rows, bf16 activations:
- o_proj: ``quant_per_token`` + ``int8_gemv`` (two launches) against ``int8_gemv_dynamic``
  (one, the row max found by each program);
- MLP: ``int8_gemv`` (gate_up) + ``silu_and_mul_quant`` + ``int8_gemv`` (down) against
  ``int8_gemv_silu`` + ``int8_gemv_dynamic`` with the recorded row max (two launches and a
  memset);
each fused launch shape of a small sweep, every one first checked to give the unfused
result bit for bit (a mismatch stops the run). Timing as ``pdserve.bench.int8_gemv``: CUDA
graphs of 20 calls over weight copies larger than the L2, medians of event-timed replays.

Prints a table per (part, M) and one JSON line (``int8_gemv_fused_best``).

Run: ``python3 -m pdserve.bench.int8_gemv_fused`` (needs CUDA).
"""
from __future__ import annotations

import argparse
import json
import torch

from pdserve.bench.int8_gemv import GRAPH_CALLS, Shape, time_calls
from pdserve.kernels.int8 import quant_per_token, silu_and_mul_quant
from pdserve.kernels.int8_gemv import int8_gemv
from pdserve.kernels.int8_gemv_fused import FusedGemvConfig, int8_gemv_dynamic, int8_gemv_silu

HIDDEN, INTER, Q_OUT = 4096, 14336, 4096
CONFIGS = [FusedGemvConfig(block_n=bn, block_k=bk) for bn, bk in ((4, 2048), (8, 1024), (8, 4096), (16, 2048))] + [
    FusedGemvConfig(block_n=8, block_k=2048, num_warps=8)]


def _o_part(m: int, sweep: bool) -> dict:
    o = Shape(HIDDEN, Q_OUT)
    x = torch.randn(m, Q_OUT, dtype=torch.bfloat16, device="cuda")

    def unfused(w: torch.Tensor) -> torch.Tensor:
        q, s = quant_per_token(x)
        return int8_gemv(q, s, w, o.w_scale, None, torch.bfloat16)

    def fused(w: torch.Tensor, cfg: FusedGemvConfig | None) -> torch.Tensor:
        return int8_gemv_dynamic(x, w, o.w_scale, None, config=cfg)

    expect = unfused(o.w[0])
    base = time_calls([lambda w=w: unfused(w) for w in o.rotation()])
    results = {"unfused": base}
    for cfg in _configs(sweep):
        if not torch.equal(fused(o.w[0], cfg), expect):
            raise SystemExit(f"o_proj fused {cfg} differs from the unfused ops")
        results[_label(cfg)] = time_calls([lambda w=w, c=cfg: fused(w, c) for w in o.rotation()])
    return results


def _mlp_part(m: int, sweep: bool) -> dict:
    gate_up, down = Shape(2 * INTER, HIDDEN), Shape(HIDDEN, INTER)
    q = torch.randint(-127, 128, (m, HIDDEN), dtype=torch.int8, device="cuda")
    q_scale = torch.rand(m, 1, device="cuda") * 0.01 + 1e-4
    pairs = [(gate_up.w[i % len(gate_up.w)], down.w[i % len(down.w)]) for i in range(GRAPH_CALLS)]

    def unfused(wgu: torch.Tensor, wd: torch.Tensor) -> torch.Tensor:
        g = int8_gemv(q, q_scale, wgu, gate_up.w_scale, None, torch.bfloat16)
        hq, hs = silu_and_mul_quant(g)
        return int8_gemv(hq, hs, wd, down.w_scale, None, torch.bfloat16)

    def fused(wgu: torch.Tensor, wd: torch.Tensor, cfg: FusedGemvConfig | None) -> torch.Tensor:
        h, amax = int8_gemv_silu(q, q_scale, wgu, gate_up.w_scale, torch.bfloat16, config=cfg)
        return int8_gemv_dynamic(h, wd, down.w_scale, None, amax, config=cfg)

    expect = unfused(*pairs[0])
    results = {"unfused": time_calls([lambda p=p: unfused(*p) for p in pairs])}
    for cfg in _configs(sweep):
        if not torch.equal(fused(*pairs[0], cfg), expect):
            raise SystemExit(f"MLP fused {cfg} differs from the unfused ops")
        results[_label(cfg)] = time_calls([lambda p=p, c=cfg: fused(*p, c) for p in pairs])
    return results


def _configs(sweep: bool) -> list[FusedGemvConfig | None]:
    return [None] + (CONFIGS if sweep else [])


def _label(cfg: FusedGemvConfig | None) -> str:
    if cfg is None:
        return "fused default"
    return f"fused n{cfg.block_n} k{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m pdserve.bench.int8_gemv_fused")
    parser.add_argument("--no-sweep", action="store_true", help="time the default launch shape only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}")
    best = {}
    for part, run in (("o_proj", _o_part), ("mlp", _mlp_part)):
        for m in (1, 2):
            results = run(m, not args.no_sweep)
            base = results["unfused"]
            for label, us in sorted(results.items(), key=lambda kv: kv[1]):
                print(f"{part:7s} M={m}  {label:32s} {us:8.1f} us  {base / us:5.2f}x", flush=True)
            top = min((kv for kv in results.items() if kv[0] != "unfused"), key=lambda kv: kv[1])
            best[f"{part}/{m}"] = {"unfused_us": base, "best": top[0], "best_us": top[1]}
    print(json.dumps({"int8_gemv_fused_best": best}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
