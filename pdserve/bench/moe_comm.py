"""How the MoE layers of data-parallel replicas exchange tokens: three schemes timed over gloo.

Owns: the benchmark only. Replicas that share the experts (``--dp N --ep N``) each hold
their own tokens; every MoE layer must bring each token to the ranks that own its top-k
experts and bring the partial outputs back. Timed per MoE layer, communication only (the
expert GEMMs are the same in every scheme), ``R`` processes on loopback:

- ``gather+allreduce`` (what pdserve does): all-gather every replica's tokens, each rank
  runs its experts on all of them, all-reduce the [R x T, H] outputs, keep its own rows;
- ``gather+reduce-scatter``: the same gather, then a reduce-scatter hands each rank only
  its own rows (half the bytes of the all-reduce);
- ``all-to-all``: exchange per-destination counts, send each token only to the ranks that
  own one of its experts (rows grouped by destination), send the partial outputs back the
  same way and add them up locally (the host learns the counts: not graph-capturable).

Routing is random top-k of E experts, split evenly over the ranks. Reported: the median
milliseconds of one layer's exchange per scheme and token count.

Run: ``python3 -m pdserve.bench.moe_comm [--ranks 2] [--hidden 2048] [--tokens 1,16,256,2048]``.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pdserve.engine.executor.collectives import ProcessGroupComm

SCHEMES = ("gather+allreduce", "gather+reduce-scatter", "all-to-all")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.moe_comm")
    p.add_argument("--ranks", type=int, default=2, help="replicas sharing the experts (processes)")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size (Qwen3-30B-A3B: 2048)")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--tokens", default="1,4,16,64,256,1024,2048", help="tokens per replica, comma-separated")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--reps", type=int, default=30, help="timed exchanges per point (median)")
    return p


def _gather_allreduce(x: torch.Tensor, rank: int, ranks: int) -> torch.Tensor:
    every = torch.empty(ranks * x.shape[0], x.shape[1], dtype=x.dtype)
    dist.all_gather_into_tensor(every, x)
    dist.all_reduce(every)  # NOTE: stands for the experts' partial outputs of every token
    return every[rank * x.shape[0]:(rank + 1) * x.shape[0]]


def _gather_reduce_scatter(x: torch.Tensor, rank: int, ranks: int) -> torch.Tensor:
    every = torch.empty(ranks * x.shape[0], x.shape[1], dtype=x.dtype)
    dist.all_gather_into_tensor(every, x)
    mine = torch.empty_like(x)
    dist.reduce_scatter_tensor(mine, every)
    return mine


def _all_to_all(x: torch.Tensor, owners: torch.Tensor, ranks: int) -> torch.Tensor:
    """owners [T, R] bool: which ranks own one of the token's experts. The engine's exchange
    (``ProcessGroupComm.all_to_all``, as the MoE layer calls it)."""
    comm = ProcessGroupComm()
    dest, token = owners.t().nonzero(as_tuple=True)  # rows grouped by destination rank
    send = torch.bincount(dest, minlength=ranks).tolist()
    arrived, recv = comm.all_to_all(x[token], send)
    back, _ = comm.all_to_all(arrived, recv, send)  # NOTE: stands for the partial outputs
    return torch.zeros_like(x).index_add_(0, token, back)


def _owners(tokens: int, experts: int, top_k: int, ranks: int, gen: torch.Generator) -> torch.Tensor:
    chosen = torch.rand(tokens, experts, generator=gen).topk(top_k, dim=1).indices
    owners = torch.zeros(tokens, ranks, dtype=torch.bool)
    owners.scatter_(1, chosen // (experts // ranks), True)
    return owners


def _check_same_result(runs: dict[str, Callable[[], torch.Tensor]], x: torch.Tensor, owners: torch.Tensor,
                       ranks: int) -> None:
    """Each scheme brings every copy of this rank's tokens back summed: R copies through the
    gathers, one per owning rank through the all-to-all."""
    copies = {"gather+allreduce": ranks, "gather+reduce-scatter": ranks}
    for name, run in runs.items():
        per_row = copies.get(name, owners.sum(1, keepdim=True))
        expected = (x.float() * per_row).to(x.dtype)
        if not torch.equal(run(), expected):
            raise AssertionError(f"{name}: the exchange lost or mixed up rows")


def _time(fn: Callable[[], object], reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _rank_main(rank: int, port: int, args: argparse.Namespace, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.ranks,
                            timeout=timedelta(seconds=120))
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(rank)
    try:
        warm = torch.zeros(64, args.hidden, dtype=dtype)
        for _ in range(10):  # NOTE: gloo's first calls set up its pairs: not part of any point
            _gather_allreduce(warm, rank, args.ranks)
        for tokens in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(tokens, args.hidden, generator=gen).to(dtype)
            owners = _owners(tokens, args.experts, args.top_k, args.ranks, gen)
            runs = {"gather+allreduce": lambda: _gather_allreduce(x, rank, args.ranks),
                    "gather+reduce-scatter": lambda: _gather_reduce_scatter(x, rank, args.ranks),
                    "all-to-all": lambda: _all_to_all(x, owners, args.ranks)}
            _check_same_result(runs, x, owners, args.ranks)
            row = {name: _time(runs[name], args.reps) for name in SCHEMES}
            if rank == 0:
                out[tokens] = (row, owners.sum().item() / tokens)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.experts % args.ranks:
        raise SystemExit(f"--ranks {args.ranks} must divide --experts {args.experts}")
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_main, args=(_free_port(), args, out), nprocs=args.ranks)
        results = dict(out)
    print(f"{args.ranks} replicas over gloo (loopback), hidden {args.hidden} {args.dtype}, top-{args.top_k} of "
          f"{args.experts} experts, {os.cpu_count()} cores; ms per MoE layer exchange (median of {args.reps})")
    print(f"{'tokens':>7} {'ranks/token':>11} " + " ".join(f"{s:>22}" for s in SCHEMES))
    for tokens in sorted(results):
        row, fanout = results[tokens]
        print(f"{tokens:>7} {fanout:>11.2f} " + " ".join(f"{row[s]:>22.3f}" for s in SCHEMES))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
