"""The executor of a tensor-parallel group: one process per rank, torch.distributed between them.

Owns: the rank processes (spawned at start, each with the child ends of two
pipes: the engine's calls, and the KV connector's commands and events, which a
rank serves between calls), the port their process group meets on, and their
shutdown. Every rank builds a
``RankWorker`` with its ``LayerContext`` (its slice of every layer, its shard of
the KV cache) and a ``ProcessGroupComm`` (gloo on CPU; on CUDA NCCL, rank i on
visible GPU i, or gloo with ranks sharing GPUs); rank 0 samples.

Lifecycle: ``MultiprocExecutor(...)`` spawns the ranks and waits until each has
loaded its model -> ``allocate`` -> per step ``execute(plan)`` sends the plan to
every rank and ``collect`` returns rank 0's sampled tokens -> ``close()`` (also
run when the executor is collected or the interpreter exits) stops every rank.

NOTE: any rank that exits or stops answering fails the executor: the pending call
raises ``RankFailure`` (a dead rank: within a poll interval; one alive but stuck,
e.g. stopped or spinning: within ``step_timeout`` seconds of a step, when its peers'
collectives time out and the engine stops waiting; start-up may take ``timeout``),
and every later call raises it at once; the engine fails its requests and the
worker process exits as a whole. A rank whose parent dies sees its pipe close and exits.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import weakref
from datetime import timedelta
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from typing import Any

from pdserve.common.model_source import ModelSource
from pdserve.engine.executor.rank import RankConfig
from pdserve.engine.models.model_config import ModelConfig
from pdserve.engine.plan import StepPlan
from pdserve.engine.sampler import SampleResult


class RankFailure(RuntimeError):
    """A rank process died or stopped answering: the tensor-parallel group is broken."""


class _Launched:
    """A plan the ranks are executing whose rank 0 answer carries sampled tokens."""


@dataclass(frozen=True)
class RankTiming:
    """One rank's share of one step: wall seconds, and those inside collectives."""
    step: float
    collective: float


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, tp: int, port: int, config: RankConfig, source: ModelSource,
               model_config: ModelConfig, conn: Connection, kv_conn: Connection, collective_timeout: float) -> None:
    """A rank process: join the group, build the rank, then serve calls until told to stop."""
    import torch
    import torch.distributed as dist

    from pdserve.engine.executor.collectives import ProcessGroupComm
    from pdserve.engine.executor.rank import RankWorker

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    replicas = None
    try:
        index = _device_index(rank, tp, config)
        if config.dp_size > 1:  # NOTE: the replicas share MoE layers: one group of every replica's ranks
            from pdserve.engine.executor.replica_group import ReplicaGroup

            replicas = ReplicaGroup(config.dp_rank, config.dp_size, config.dp_port, collective_timeout, rank, tp)
        else:
            extra = {"device_id": torch.device("cuda", index)} if config.collectives == "nccl" else {}
            dist.init_process_group(config.collectives, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                    world_size=tp, timeout=timedelta(seconds=collective_timeout), **extra)
        comm = replicas.tp_comm if replicas is not None else ProcessGroupComm()
        worker = RankWorker(replace(config, tp_rank=rank, tp_size=tp, samples=rank == 0, device_index=index), source,
                            model_config, comm, replicas)
        conn.send(("ready", None))
        _serve(worker, comm, conn, kv_conn)
    except Exception as exc:  # NOTE: reported to the engine, which fails the group
        try:
            conn.send(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))
        except OSError:
            pass
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _device_index(rank: int, tp: int, config: RankConfig) -> int:
    """The device of this rank, made the process's current one on CUDA: with NCCL GPU ``rank``
    of the visible ones (each rank its own), with gloo ``rank`` modulo their count."""
    if config.device_type != "cuda":
        return 0
    import torch

    count = torch.cuda.device_count()
    if config.collectives == "nccl" and count < tp:
        raise ValueError(f"tp={tp} with NCCL needs a GPU per rank, but {count} are visible "
                         "(tp_backend='gloo' lets the ranks share GPUs, without CUDA graphs)")
    index = rank if config.collectives == "nccl" else rank % max(count, 1)
    torch.cuda.set_device(index)
    return index


def _serve(worker: Any, comm: Any, conn: Connection, kv_conn: Connection) -> None:
    """Answer the engine's calls (a step's answer carries the rank's step and collective
    seconds); between them run the KV commands and forward the KV endpoint's events
    (polling it on a short timer while it has work or peers)."""
    endpoint = None
    while True:
        pace = None if endpoint is None else 0.001 if endpoint.busy else 0.005 if endpoint.has_peers else 0.1
        ready = wait([conn, kv_conn], pace)
        try:
            while kv_conn.poll():
                endpoint = _kv_command(worker, endpoint, kv_conn, kv_conn.recv())
            if conn in ready:
                method, args = conn.recv()
                if method == "stop":
                    return
                conn.send(("ok", _call(worker, comm, method, args)))
        except EOFError:
            return  # the engine's process is gone
        if endpoint is not None:
            for event in endpoint.poll():
                kv_conn.send(event)


def _kv_command(worker: Any, endpoint: Any, kv_conn: Connection, command: tuple) -> Any:
    """Apply one command of the worker's KV connector; returns the endpoint after it."""
    if command[0] == "open":
        try:
            endpoint = worker.open_kv_endpoint(*command[1:])
            kv_conn.send(("opened", endpoint.agent.metadata()))
        except Exception as exc:  # NOTE: reported; the worker refuses to serve P/D
            kv_conn.send(("open_error", f"{type(exc).__name__}: {exc}"))
    elif command[0] == "close":
        if endpoint is not None:
            worker.attach_layer_sender(None)
            endpoint.close()
        endpoint = None
    elif endpoint is not None:
        endpoint.handle(command)
    return endpoint


def _call(worker: Any, comm: Any, method: str, args: tuple) -> Any:
    if method == "execute":
        start, in_comm = time.perf_counter(), comm.seconds
        pending = worker.execute(*args)
        result = worker.collect(pending) if pending is not None else None
        return result, RankTiming(time.perf_counter() - start, comm.seconds - in_comm)
    attr = getattr(worker, method)
    return attr(*args) if callable(attr) else attr


class MultiprocExecutor:
    def __init__(self, config: RankConfig, source: ModelSource, model_config: ModelConfig, tp: int,
                 timeout: float = 600.0, step_timeout: float = 60.0):
        self._timeout = timeout
        self._device_type = config.device_type
        # NOTE: ranks that share one memory (the host's, or a GPU under gloo) each take their share of it
        self._sharing = 1 if config.collectives == "nccl" else tp
        # NOTE: the peers of a stuck rank raise first (collective timeout); the engine's own
        # deadline is later so that their message, which names the cause, is the one reported
        self._step_timeout = step_timeout * 1.5 + 1.0
        self._failed: str | None = None
        ctx = mp.get_context("spawn")
        port, self._conns, self._kv_conns, self._procs = _free_port(), [], [], []
        for rank in range(tp):
            parent, child = ctx.Pipe()
            kv_parent, kv_child = ctx.Pipe()
            proc = ctx.Process(target=_rank_main,
                               args=(rank, tp, port, config, source, model_config, child, kv_child, step_timeout),
                               name=f"pdserve-rank{rank}", daemon=True)
            proc.start()
            child.close()
            kv_child.close()
            self._conns.append(parent)
            self._kv_conns.append(kv_parent)
            self._procs.append(proc)
        self._finalizer = weakref.finalize(self, _stop, self._conns + self._kv_conns, self._procs)
        self._launched: _Launched | None = None
        self._timings = [RankTiming(0.0, 0.0)] * tp
        for rank in range(tp):
            self._receive(rank, self._timeout)  # "ready": loading the model may take long

    # ---- the executor interface ------------------------------------------------------------
    def block_bytes(self) -> int:
        return self._all("block_bytes")

    def blocks_that_fit(self, memory_fraction: float) -> int:
        return min(self._each("blocks_that_fit", memory_fraction / self._sharing))

    @property
    def cache_tokens_per_seq(self) -> int:
        return self._all("cache_tokens_per_seq")

    def allocate(self, num_blocks: int, max_model_len: int) -> None:
        # NOTE: replicas sharing MoE layers wait there for each other: the start-up timeout applies
        self._send_all("allocate", num_blocks, max_model_len)
        for rank in range(len(self._conns)):
            self._receive(rank, self._timeout)

    def idle_step(self) -> bool:
        return self._all("idle_step")

    def execute(self, plan: StepPlan) -> _Launched | None:
        self._send_all("execute", plan)
        if not any(r.samples for r in plan.rows):
            self._gather_step()
            return None
        self._launched = _Launched()
        return self._launched

    def collect(self, pending: _Launched) -> SampleResult:
        self._launched = None
        return self._gather_step()[0]

    def load_adapter(self, name: str, path: str) -> list[str]:
        """Each rank's answer: "" (loaded) or why it refused."""
        return self._each("load_adapter", name, path)

    def unload_adapter(self, name: str) -> None:
        self._each("unload_adapter", name)

    def local_rank(self) -> Any:
        raise ValueError(f"the {len(self._procs)} ranks run in processes of their own: none is in this process")

    def rank_seconds(self) -> list[tuple[float, float]]:
        """Per rank: (seconds in steps, of which in collectives) since the start."""
        return [(t.step, t.collective) for t in self._timings]

    def forget_all(self) -> None:
        if self._failed is None:
            self._each("forget_all")

    def synchronize(self) -> None:
        if self._failed is None:
            self._each("synchronize")

    def attach_layer_sender(self, sender: Any) -> None:
        raise ValueError("a tensor-parallel engine's ranks send KV themselves (kv_links)")

    @property
    def kv_cache(self) -> None:
        return None  # NOTE: each rank holds its shard in its own process

    def kv_links(self) -> list[Connection]:
        """Each rank's KV command/event pipe, in rank order (for ``rank_agents.RankAgents``)."""
        return list(self._kv_conns)

    @property
    def device(self) -> Any:
        """The ranks' device type (no index: this process never touches a GPU)."""
        import torch

        return torch.device(self._device_type)

    @property
    def supports_overlap(self) -> bool:
        return False

    def close(self) -> None:
        self._finalizer()

    # ---- pipes -----------------------------------------------------------------------------
    def _all(self, method: str, *args: Any) -> Any:
        """Call every rank; they must agree (rank 0's answer)."""
        return self._each(method, *args)[0]

    def _each(self, method: str, *args: Any) -> list[Any]:
        self._send_all(method, *args)
        return self._gather()

    def _send_all(self, method: str, *args: Any) -> None:
        self._check()
        if self._launched is not None:  # NOTE: a step launched and never collected (it failed): drain it
            self._launched = None
            self._gather_step()
        for rank, conn in enumerate(self._conns):
            try:
                conn.send((method, args))
            except OSError as exc:
                proc = self._procs[rank]
                proc.join(1.0)
                self._fail(f"rank {rank} exited with code {proc.exitcode}" if proc.exitcode is not None
                           else f"rank {rank} is gone ({exc})")

    def _gather(self) -> list[Any]:
        return [self._receive(rank) for rank in range(len(self._conns))]

    def _gather_step(self) -> list[Any]:
        answers = self._gather()
        self._timings = [RankTiming(total.step + t.step, total.collective + t.collective)
                         for total, (_, t) in zip(self._timings, answers)]
        return [value for value, _ in answers]

    def _receive(self, rank: int, timeout: float | None = None) -> Any:
        timeout = timeout or self._step_timeout
        conn, proc, deadline = self._conns[rank], self._procs[rank], time.monotonic() + timeout
        while not conn.poll(0.05):
            if not proc.is_alive():
                self._fail(f"rank {rank} exited with code {proc.exitcode}")
            if time.monotonic() > deadline:
                self._fail(f"rank {rank} did not answer within {timeout:.0f} s (alive but stuck)")
        try:
            status, value = conn.recv()
        except (EOFError, OSError):
            self._fail(f"rank {rank} exited with code {proc.exitcode}")
        if status == "error":  # NOTE: the reporter itself exits after reporting: its own message is the cause
            self._fail(self._dead_rank(skip=rank) or self._stuck_ranks(rank, value) or value)
        return value

    def _dead_rank(self, skip: int | None = None) -> str | None:
        """A rank (other than ``skip``) that has exited: the cause when the others report broken
        collectives."""
        time.sleep(0.2)  # NOTE: the survivors' collective fails as the dead rank's exit is being reaped
        for rank, proc in enumerate(self._procs):
            if rank != skip and not proc.is_alive():
                return self._last_words(rank) or f"rank {rank} exited with code {proc.exitcode}"
        return None

    def _last_words(self, rank: int) -> str | None:
        """The error an exited rank reported before leaving, if it did."""
        conn = self._conns[rank]
        try:
            while conn.poll(0):
                status, value = conn.recv()
                if status == "error":
                    return value
        except (EOFError, OSError):
            pass
        return None

    def _stuck_ranks(self, reporter: int, error: str) -> str | None:
        """Ranks that sent nothing while ``reporter``'s collective failed: alive but stuck."""
        silent = [r for r, conn in enumerate(self._conns) if r != reporter and not conn.poll(0.5)]
        if not silent:
            return None
        return f"rank {', '.join(map(str, silent))} stopped answering (alive but stuck); {error}"

    def _check(self) -> None:
        if self._failed is not None:
            raise RankFailure(self._failed)

    def _fail(self, why: str) -> None:
        self._failed = self._failed or why
        self._finalizer()
        raise RankFailure(f"tensor-parallel group failed: {self._failed}")


def _stop(conns: list[Connection], procs: list[mp.Process]) -> None:
    """Stop every rank: ask, then terminate, then kill; never leave one behind."""
    for conn in conns:
        try:
            conn.send(("stop", ()))
        except OSError:
            pass
    deadline = time.monotonic() + 5.0
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join(2.0)
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)
    for conn in conns:
        conn.close()


__all__ = ["MultiprocExecutor", "RankFailure"]
