"""Offline latency at a fixed number of requests in flight: TTFT, inter-token latency, and
at batch 1 the decode step against the bytes-read roofline of the machine.

Owns: the closed loop (``batch`` requests in the engine at a time; a finished one is
replaced by the next prompt at once), the per-token timestamps it records, their summary,
and the host's memory bandwidth measured in the same run (reading a buffer far larger
than any cache). At batch 1 a decode step reads every weight once (an untied embedding
table only by its rows) plus the request's KV, so ``(weight bytes + KV bytes) / read
bandwidth`` is the fastest any step can be.

Lifecycle: ``run(llm, prompts, batch, output_len, device_type)`` once per engine; it
leaves the engine empty.
"""
from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass

import torch

from pdserve.common.sampling_params import SamplingParams


@dataclass(frozen=True)
class LatencyReport:
    batch: int
    tokens: int
    seconds: float
    ttft_ms: list[float]
    itl_ms: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def lines(self) -> list[str]:
        itl = sorted(self.itl_ms)
        return [f"batch {self.batch}: {self.tokens} output tokens in {self.seconds:.2f} s = "
                f"{self.tokens_per_s:.1f} tok/s",
                f"  TTFT ms: median {statistics.median(self.ttft_ms):.1f}, max {max(self.ttft_ms):.1f}",
                f"  inter-token ms: median {statistics.median(itl):.2f}, p90 {_pct(itl, 0.9):.2f}, "
                f"p99 {_pct(itl, 0.99):.2f}"]


def run(llm, prompts: list[list[int]], batch: int, output_len: int, device_type: str) -> LatencyReport:
    """Keep ``batch`` of ``prompts`` in flight until all are done; timestamps per token."""
    engine, params = llm.engine, SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    waiting = deque(enumerate(prompts))
    added: dict[str, float] = {}
    stamps: dict[str, list[float]] = {}
    in_flight = 0
    t0 = time.perf_counter()
    while waiting or engine.has_unfinished():
        while waiting and in_flight < batch:
            i, prompt = waiting.popleft()
            engine.add_request(f"lat-{i}", prompt, params)
            added[f"lat-{i}"], stamps[f"lat-{i}"] = time.perf_counter(), []
            in_flight += 1
        for out in engine.step():
            stamps[out.req_id].extend([_now(device_type)] * len(out.new_token_ids))
            in_flight -= out.finish_reason is not None
    seconds = time.perf_counter() - t0
    ttft = [(s[0] - added[r]) * 1e3 for r, s in stamps.items()]
    itl = [(b - a) * 1e3 for s in stamps.values() for a, b in zip(s, s[1:])]
    return LatencyReport(batch, sum(len(s) for s in stamps.values()), seconds, ttft, itl)


def read_bandwidth(device_type: str, nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Bytes per second a reduction over ``nbytes`` reads (the best of ``reps``)."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device_type)
    buf.sum()
    best = float("inf")
    for _ in range(reps):
        t0 = _now(device_type)
        buf.sum()
        best = min(best, _now(device_type) - t0)
    return nbytes / best


def decode_roofline_ms(weight_bytes: int, kv_bytes_per_token: int, context: float, bandwidth: float) -> float:
    """The fastest batch-1 decode step: its weights and its KV read once at ``bandwidth``."""
    return (weight_bytes + kv_bytes_per_token * context) / bandwidth * 1e3


def _now(device_type: str) -> float:
    if device_type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


__all__ = ["LatencyReport", "decode_roofline_ms", "read_bandwidth", "run"]
