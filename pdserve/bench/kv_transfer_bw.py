"""KV transfer bandwidth: one prompt's KV blocks written between two processes.

Owns: the benchmark only. For each KV shape it starts a receiver process (a KV
worker that keeps calling ``progress()``), builds a sender agent in this process,
and times whole-prompt WRITEs (one ``write_blocks`` for all layers) and
layer-wise WRITEs (one per layer, posted back to back) for three placements of
the destination blocks, with prepared and direct descriptor lists. Next to each
it times a same-process torch copy of the same bytes (contiguous ``copy_`` and
the indexed gather/scatter the placement implies), and reports descriptors per
whole-prompt write and the cost of ``write_blocks`` itself (build + post).

With ``--device cuda`` both KV tensors live in GPU memory (NIXL registers them
as VRAM): by default both processes use the same GPU (``cuda:0``);
``--recv-device cuda:1`` puts the receiver on a second GPU. The torch baselines
then run on the GPU, synchronized around each sample.

Run: ``python -m pdserve.bench.kv_transfer_bw [--tokens 4096] [--iters 5] [--device cuda]
[--shapes "Llama-3-8B bf16" ...]``.
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from dataclasses import asdict, dataclass, replace
from multiprocessing.connection import Connection
from typing import Callable

import torch

from pdserve.engine.kv_transfer.base import KVLayout, KVTransferAgent, TransferHandle, TransferState


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
    """Random non-zero contents on ``layout.device``; ``uniform_`` in place keeps a
    1 GB cache cheap to fill."""
    device = torch.device(layout.device)
    gen = torch.Generator(device).manual_seed(seed)
    kv = torch.empty(layout.shape, dtype=getattr(torch, layout.dtype), device=device)
    return kv.uniform_(0.5, 1.5, generator=gen)


def sync_for(*devices: str) -> Callable[[], None] | None:
    """A callable that waits for the GPUs among ``devices`` (None when all are CPU)."""
    cuda = sorted({torch.device(d) for d in devices if torch.device(d).type == "cuda"}, key=str)
    if not cuda:
        return None

    def sync() -> None:
        for d in cuda:
            torch.cuda.synchronize(d)

    return sync


# ---- receiver process -------------------------------------------------------------


def receiver(conn: Connection, name: str, layout_fields: dict, model: str) -> None:
    from pdserve.engine.kv_transfer.nixl_connector import NixlKVTransferAgent

    layout = KVLayout(**layout_fields)
    kv = make_kv(layout, 2)
    if kv.is_cuda:
        torch.cuda.synchronize(kv.device)  # filled before the peer may write into it
    agent = NixlKVTransferAgent(name, kv, model)
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


def timed(fn: Callable[[], None], iters: int, sync: Callable[[], None] | None = None) -> Timing:
    """Median and best of ``iters`` runs after one warm-up; ``sync`` (GPU work)
    is called before the clock starts and before it stops."""
    sync = sync or (lambda: None)
    fn()  # warm-up: connection set-up, page faults
    sync()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
        sync()
    return Timing(statistics.median(samples), min(samples))


def bench_shape(shape: Shape, tokens: int, block_size: int, prepped: bool, iters: int,
                device: str = "cpu", recv_device: str | None = None) -> list[dict]:
    from pdserve.engine.kv_transfer.nixl_connector import NixlConfig, NixlKVTransferAgent

    count = tokens // block_size
    layout = KVLayout(shape.num_layers, 2 * count, block_size, shape.num_kv_heads, shape.head_dim, shape.dtype,
                      device)
    recv_layout = replace(layout, device=recv_device or device)
    tag = "p" if prepped else "d"
    ctx = multiprocessing.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=receiver, args=(child, f"recv-{tag}", asdict(recv_layout), "bench"), daemon=True)
    proc.start()
    try:
        kv = make_kv(layout, 1)
        sync = sync_for(device)
        if sync is not None:
            sync()
        agent = NixlKVTransferAgent(f"send-{tag}", kv, "bench", NixlConfig(prepped=prepped))
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


def torch_copies(layout: KVLayout, iters: int, recv_device: str | None = None) -> dict[str, Timing]:
    """Same-process torch baselines: contiguous ``copy_`` of the prompt's bytes, and
    the indexed copy each placement implies (``dst[:, ids] = src[:, ids]``). The
    source lives on ``layout.device``, the destination on ``recv_device``; GPU
    samples are synchronized on both."""
    recv_device = recv_device or layout.device
    a, b = make_kv(layout, 1), make_kv(replace(layout, device=recv_device), 2)
    sync = sync_for(layout.device, recv_device)
    count = layout.num_blocks // 2
    out = {"copy": timed(lambda: b[:, count:].copy_(a[:, :count]), iters, sync)}
    src = torch.arange(count, device=a.device)
    for placement in PLACEMENTS:
        dst = torch.tensor(destination_blocks(placement, count), device=b.device)
        out[placement] = timed(lambda: b.index_copy_(1, dst, a.index_select(1, src).to(b.device)), iters, sync)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default="cpu",
                        help="where both KV tensors live: cpu (DRAM) or cuda[:N] (VRAM; 'cuda' means cuda:0)")
    parser.add_argument("--recv-device", default=None,
                        help="the receiver's device when it differs from --device, e.g. cuda:1")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="LABEL",
                        help=f"shapes to run (default all): {', '.join(repr(s.label) for s in SHAPES)}")
    args = parser.parse_args(argv)
    device = "cuda:0" if args.device == "cuda" else args.device
    recv_device = "cuda:0" if args.recv_device == "cuda" else (args.recv_device or device)
    shapes = SHAPES
    if args.shapes:
        unknown = set(args.shapes) - {s.label for s in SHAPES}
        if unknown:
            parser.error(f"unknown shapes {sorted(unknown)}; known: {[s.label for s in SHAPES]}")
        shapes = tuple(s for s in SHAPES if s.label in args.shapes)
    print(f"prompt {args.tokens} tokens, block_size {args.block_size}; GB/s = 1e9 B/s as median/best of {args.iters}")
    if device != "cpu" or recv_device != "cpu":
        names = {d: torch.cuda.get_device_name(d) for d in (device, recv_device) if d.startswith("cuda")}
        print(f"sender KV on {device}, receiver KV on {recv_device} ({'; '.join(f'{d}: {n}' for d, n in names.items())}); "
              f"torch {torch.__version__}")
    header = (f"{'shape':<18} {'MB':>6} {'lists':<8} {'dst blocks':<11} {'descs':>6} {'whole GB/s':>11} "
              f"{'layer GB/s':>11} {'torch idx':>11} {'torch copy':>11} {'submit ms':>9}")
    print(header)
    for shape in shapes:
        count = args.tokens // args.block_size
        layout = KVLayout(shape.num_layers, 2 * count, args.block_size, shape.num_kv_heads, shape.head_dim,
                          shape.dtype, device)
        torch_s = torch_copies(layout, args.iters, recv_device)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()  # the baselines' tensors go back before the agents allocate
        for prepped in (True, False):
            rows = bench_shape(shape, args.tokens, args.block_size, prepped, args.iters, device, recv_device)
            for r in rows:
                n = r["bytes"]
                print(f"{shape.label:<18} {n / 1e6:6.1f} {'prepped' if prepped else 'direct':<8} "
                      f"{r['placement']:<11} {r['descs']:>6} {r['whole'].gbps(n):>11} {r['layer'].gbps(n):>11} "
                      f"{torch_s[r['placement']].gbps(n):>11} {torch_s['copy'].gbps(n):>11} "
                      f"{r['submit_s'] * 1e3:9.2f}", flush=True)


if __name__ == "__main__":
    main()
