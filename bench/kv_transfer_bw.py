"""KV transfer bandwidth: one prompt's KV blocks written between two processes.

Owns: the benchmark only. For each KV shape it starts a receiver process (a KV
worker that keeps calling ``progress()``), builds a sender agent in this process,
and times whole-prompt WRITEs (one ``write_blocks`` for all layers) and
layer-wise WRITEs (one per layer, posted back to back) for three placements of
the destination blocks, with prepared and direct descriptor lists. Next to each
it times a same-process torch copy of the same bytes (contiguous ``copy_`` and
the indexed gather/scatter the placement implies), and reports descriptors per
whole-prompt write and the cost of ``write_blocks`` itself (build + post).

Run: ``python -m bench.kv_transfer_bw [--tokens 4096] [--iters 5]``.
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Callable

import torch

from services.engine.kv_transfer.base import KVLayout, KVTransferAgent, TransferHandle, TransferState


@dataclass(frozen=True)
class Shape:
    label: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str


SHAPES = (
    Shape("SmolLM2-135M fp32", 30, 3, 64, "float32"),
    Shape("SmolLM2-135M bf16", 30, 3, 64, "bfloat16"),
    Shape("Llama-3-8B bf16", 32, 8, 128, "bfloat16"),
)
PLACEMENTS = ("contiguous", "runs of 4", "scattered")


def destination_blocks(placement: str, count: int, seed: int = 0) -> list[int]:
    """Receiver block ids (its cache has 2 * count blocks): how fragmented its free list is."""
    if placement == "contiguous":
        return list(range(count, 2 * count))
    if placement == "scattered":
        return list(range(1, 2 * count, 2))  # no two adjacent: one descriptor per block per layer
    runs = torch.randperm(2 * count // 4, generator=torch.Generator().manual_seed(seed))[: count // 4]
    return [int(r) * 4 + i for r in runs for i in range(4)]


def make_kv(layout: KVLayout, seed: int) -> torch.Tensor:
    """Random non-zero contents; ``uniform_`` in place keeps a 1 GB cache cheap to fill."""
    gen = torch.Generator().manual_seed(seed)
    return torch.empty(layout.shape, dtype=getattr(torch, layout.dtype)).uniform_(0.5, 1.5, generator=gen)


# ---- receiver process -------------------------------------------------------------


def receiver(conn: Connection, name: str, layout_fields: dict, model: str) -> None:
    from services.engine.kv_transfer.nixl_connector import NixlKVTransferAgent

    layout = KVLayout(**layout_fields)
    agent = NixlKVTransferAgent(name, make_kv(layout, 2), model)
    conn.send(agent.metadata())
    peer_name, peer_md = conn.recv()
    agent.add_peer(peer_name, peer_md)
    conn.send("ready")
    while not conn.poll(0):
        agent.progress()  # NOTE: the receiver must progress for incoming data and notifications
    agent.close()


# ---- sender side --------------------------------------------------------------------


def finish(agent: KVTransferAgent, handles: list[TransferHandle], timeout: float = 60.0) -> None:
    """Spin on poll until all DONE (spinning keeps the timing tight)."""
    deadline = time.monotonic() + timeout
    for handle in handles:
        while (state := agent.poll(handle)) is not TransferState.DONE:
            if state is TransferState.FAILED or time.monotonic() > deadline:
                raise RuntimeError(f"transfer {handle.xfer_id} ended {state}")
        agent.release(handle)


@dataclass(frozen=True)
class Timing:
    median_s: float
    best_s: float

    def gbps(self, nbytes: int) -> str:
        """``median/best`` in GB/s: the best is what a quiet machine gets."""
        return f"{nbytes / self.median_s / 1e9:.2f}/{nbytes / self.best_s / 1e9:.2f}"


def timed(fn: Callable[[], None], iters: int) -> Timing:
    fn()  # warm-up: connection set-up, page faults
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return Timing(statistics.median(samples), min(samples))


def bench_shape(shape: Shape, tokens: int, block_size: int, prepped: bool, iters: int) -> list[dict]:
    from services.engine.kv_transfer.nixl_connector import NixlConfig, NixlKVTransferAgent

    count = tokens // block_size
    layout = KVLayout(shape.num_layers, 2 * count, block_size, shape.num_kv_heads, shape.head_dim, shape.dtype)
    tag = "p" if prepped else "d"
    ctx = multiprocessing.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=receiver, args=(child, f"recv-{tag}", asdict(layout), "bench"), daemon=True)
    proc.start()
    try:
        agent = NixlKVTransferAgent(f"send-{tag}", make_kv(layout, 1), "bench", NixlConfig(prepped=prepped))
        agent.add_peer(f"recv-{tag}", conn.recv())
        conn.send((agent.name, agent.metadata()))
        assert conn.recv() == "ready"
        rows = [measure(agent, f"recv-{tag}", layout, placement, iters) for placement in PLACEMENTS]
        agent.close()
        return rows
    finally:
        conn.send("stop")
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()


def measure(agent: KVTransferAgent, peer: str, layout: KVLayout, placement: str, iters: int) -> dict:
    count = layout.num_blocks // 2
    src, dst = list(range(count)), destination_blocks(placement, count)
    nbytes = layout.num_layers * count * layout.block_bytes
    descs: dict[str, int] = {}

    submit: list[float] = []

    def whole() -> None:
        start = time.perf_counter()
        handle = agent.write_blocks(peer, src, dst)
        submit.append(time.perf_counter() - start)
        descs["whole"] = handle.num_descs
        finish(agent, [handle])

    def layerwise() -> None:
        handles = [agent.write_blocks(peer, src, dst, layers=range(l, l + 1)) for l in range(layout.num_layers)]
        descs["layer"] = sum(h.num_descs for h in handles)
        finish(agent, handles)

    return {"placement": placement, "bytes": nbytes, "whole": timed(whole, iters),
            "layer": timed(layerwise, iters), "descs": descs["whole"], "layer_descs": descs["layer"],
            "submit_s": statistics.median(submit)}


def torch_copies(layout: KVLayout, iters: int) -> dict[str, Timing]:
    """Same-process torch baselines: contiguous ``copy_`` of the prompt's bytes, and
    the indexed copy each placement implies (``dst[:, ids] = src[:, ids]``)."""
    a, b = make_kv(layout, 1), make_kv(layout, 2)
    count = layout.num_blocks // 2
    out = {"copy": timed(lambda: b[:, count:].copy_(a[:, :count]), iters)}
    src = torch.arange(count)
    for placement in PLACEMENTS:
        dst = torch.tensor(destination_blocks(placement, count))
        out[placement] = timed(lambda: b.index_copy_(1, dst, a.index_select(1, src)), iters)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"prompt {args.tokens} tokens, block_size {args.block_size}; GB/s = 1e9 B/s as median/best of {args.iters}")
    header = (f"{'shape':<18} {'MB':>6} {'lists':<8} {'dst blocks':<11} {'descs':>6} {'whole GB/s':>11} "
              f"{'layer GB/s':>11} {'torch idx':>11} {'torch copy':>11} {'submit ms':>9}")
    print(header)
    for shape in SHAPES:
        count = args.tokens // args.block_size
        layout = KVLayout(shape.num_layers, 2 * count, args.block_size, shape.num_kv_heads, shape.head_dim,
                          shape.dtype)
        torch_s = torch_copies(layout, args.iters)
        for prepped in (True, False):
            rows = bench_shape(shape, args.tokens, args.block_size, prepped, args.iters)
            for r in rows:
                n = r["bytes"]
                print(f"{shape.label:<18} {n / 1e6:6.1f} {'prepped' if prepped else 'direct':<8} "
                      f"{r['placement']:<11} {r['descs']:>6} {r['whole'].gbps(n):>11} {r['layer'].gbps(n):>11} "
                      f"{torch_s[r['placement']].gbps(n):>11} {torch_s['copy'].gbps(n):>11} "
                      f"{r['submit_s'] * 1e3:9.2f}", flush=True)


if __name__ == "__main__":
    main()
