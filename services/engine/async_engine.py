"""asyncio front of the engine, for servers: many concurrent generate streams, one step loop.

Owns: the step loop task, the worker thread the model is loaded and run on (so the
event loop never blocks on a forward pass), the per-request output queues, and the commands
(add, abort) queued for the engine. Lifecycle: ``AsyncEngine(config)`` loads the
model; ``await start()`` launches the loop; ``generate()`` streams outputs;
``await stop()`` aborts what is left and ends the loop.

Timestamps for the worker's request metrics: a request added here is stamped
``first_scheduled_time`` (the start of the first step that scheduled it) and
each ``StreamOutput`` carries it; a remote reservation is stamped when its
blocks are reserved (the prefill order goes out right after).

NOTE: the ``LLMEngine`` is touched only between steps, by the loop task: commands
from other coroutines are queued and applied there, so no lock is needed.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import torch

from pdserve.common.sampling_params import SamplingParams
from pdserve.common.tokenizer import Tokenizer, load_tokenizer
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import EngineOutput, LLMEngine
from pdserve.engine.executor import RankFailure
from pdserve.engine.kv_connector import LayerSender
from pdserve.engine.plan import KVSendOrder
from pdserve.engine.request import Request, Status, TokenLogprob

log = logging.getLogger(__name__)

LOCKSTEP_IDLE_PAUSE = 0.002  # seconds between the empty steps of an idle replica that shares MoE layers


@dataclass
class StreamOutput:
    """New tokens of one request since its previous yield (several under load)."""
    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    logprobs: list[TokenLogprob] | None = None
    scheduled_time: float | None = None  # ``Request.first_scheduled_time``; None until scheduled


@dataclass
class _Stream:
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    done: bool = False
    req: Request | None = None  # the engine's request, once added


class AsyncEngine:
    def __init__(self, config: EngineConfig):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdserve-step")
        # NOTE: loaded on the thread that runs the steps: every OpenMP parallel region of the
        # engine then starts from one thread, so one OpenMP team exists; a second team (from a
        # load on the event loop's thread) makes libgomp count more threads than cores and stop
        # spinning at barriers, which doubled the CPU decode step
        self.engine = self._pool.submit(LLMEngine, config).result()
        self._streams: dict[str, _Stream] = {}
        self._commands: list[Callable[[], None]] = []
        self._unscheduled: dict[str, Request] = {}  # added, not stamped first_scheduled_time yet
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stats = self.engine.stats()
        self._tokenizer: Tokenizer | None = None
        self.broken = asyncio.Event()  # set when a rank died: this engine serves nothing any more

    # ---- lifecycle ----------------------------------------------------------
    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="pdserve-step-loop")

    async def stop(self) -> None:
        for rid in list(self._streams):
            self.abort(rid)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=True)
        self.engine.close()

    # ---- requests -----------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       adapter: str | None = None) -> AsyncIterator[StreamOutput]:
        """Stream a request's tokens; closing the iterator early aborts it (blocks freed)."""
        if self.broken.is_set():
            raise RuntimeError("the engine is broken (a rank process died); this worker is stopping")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = self._streams[request_id] = _Stream()
        self._submit(lambda: self._add(request_id, list(prompt_token_ids), params, adapter=adapter))
        async for out in self._drain(request_id, stream):
            yield out

    async def _drain(self, request_id: str, stream: _Stream) -> AsyncIterator[StreamOutput]:
        try:
            while not stream.done:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                merged = self._merge(item, stream)
                yield merged
        finally:
            if not stream.done:
                self.abort(request_id)
            self._streams.pop(request_id, None)
            self._unscheduled.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Idempotent; the stream (if any) ends with finish_reason 'abort'."""
        self._submit(lambda: self._apply_abort(request_id))

    # ---- disaggregation -------------------------------------------------------
    async def reserve_remote(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                             adapter: str | None = None) -> tuple[list[int], int] | None:
        """Decode side: (block ids, tokens cached here) for a prompt a peer computes; None if full now."""
        return await self._call(lambda: self._reserve(request_id, list(prompt_token_ids), params, adapter))

    async def admit_remote(self, request_id: str, first_token: int) -> AsyncIterator[StreamOutput]:
        """Decode side: the KV has landed; stream the rest (first output holds first_token)."""
        stream = self._streams[request_id] = _Stream()
        self._submit(lambda: self._admit(request_id, first_token, stream))
        async for out in self._drain(request_id, stream):
            yield out

    async def cancel_remote(self, request_id: str) -> bool:
        """Decode side: free a reservation once no peer can write into it any more."""
        return await self._call(lambda: self.engine.cancel_remote(request_id))

    async def prefill_held(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                           kv_send: KVSendOrder | None = None,
                           adapter: str | None = None) -> tuple[int, list[int], int]:
        """Prefill side: compute the prompt, sample one token, keep the blocks.

        Returns (first token, block ids, prompt tokens that were prefix-cache hits).
        The blocks stay allocated until ``release_held``, which the caller must call
        in every case (also after an error or a cancellation; it is idempotent).
        With ``kv_send`` the ranks send the KV themselves (a tensor-parallel engine).
        """
        stream = self._streams[request_id] = _Stream()
        one = params.replace(max_tokens=1)
        self._submit(lambda: self._add(request_id, list(prompt_token_ids), one, hold_kv=True, kv_send=kv_send,
                                       adapter=adapter))
        last = None
        async for last in self._drain(request_id, stream):
            pass
        if last is None or last.finish_reason == "abort" or not last.new_token_ids:
            raise RuntimeError(f"prefill of {request_id!r} was aborted")
        blocks = await self._call(lambda: self.engine.blocks_of(request_id))
        return last.new_token_ids[-1], blocks, last.num_cached_tokens

    async def load_adapter(self, name: str, path: str) -> None:
        """Load a LoRA adapter between steps; ValueError naming the problem."""
        await self._call(lambda: self.engine.load_adapter(name, path))

    async def unload_adapter(self, name: str) -> None:
        """New requests for it are refused at once; its slot is freed when its last request ends."""
        await self._call(lambda: self.engine.unload_adapter(name))

    def adapters(self) -> list[str]:
        return sorted(self.engine.adapters)

    def release_held(self, request_id: str) -> None:
        self._submit(lambda: self.engine.release_held(request_id))

    def attach_layer_sender(self, sender: LayerSender) -> None:
        """The KV connector's worker side that sends each layer as it is written (before ``start``)."""
        self.engine.attach_layer_sender(sender)

    async def call(self, fn: Callable[[LLMEngine], object]):
        """Run ``fn(llm_engine)`` between steps (on the loop's terms) and return its result."""
        return await self._call(lambda: fn(self.engine))

    async def _call(self, fn: Callable[[], object]):
        """Run fn on the engine between steps and return its result (or raise its error)."""
        fut = asyncio.get_running_loop().create_future()

        def command() -> None:
            if fut.cancelled():
                return  # NOTE: the caller gave up before fn ran; setting a result would kill the loop
            try:
                fut.set_result(fn())
            except Exception as exc:  # handed to the awaiting caller
                fut.set_exception(exc)
        self._submit(command)
        return await fut

    # ---- introspection ------------------------------------------------------
    def stats(self) -> dict:
        return dict(self._stats)

    @property
    def kv_cache(self) -> torch.Tensor | None:
        """This process's KV-cache shard (what its KV transfer agent registers)."""
        return self.engine.kv_cache

    def kv_links(self) -> list:
        """Each rank process's KV pipe (``rank_agents.RankAgents``); empty for one in-process rank."""
        return self.engine.kv_links()

    @property
    def device_type(self) -> str:
        return self.engine.device.type

    @property
    def model_info(self) -> dict:
        return self.engine.model_info()

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.engine.source)
        return self._tokenizer

    # ---- the loop -----------------------------------------------------------
    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.append(command)
        self._wake.set()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._apply_commands()
            if not self.engine.has_unfinished():
                self._wake.clear()
                if not self.engine.lockstep:
                    if not self._commands:
                        await self._wake.wait()
                    continue
                # NOTE: replicas sharing MoE layers step together: an idle one keeps taking
                # (empty) steps, pausing a little between them, so that a busy one never waits long
                if not self._commands:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), LOCKSTEP_IDLE_PAUSE)
                self._apply_commands()
            started = time.monotonic()
            try:
                outputs = await loop.run_in_executor(self._pool, self.engine.step)
            except RankFailure as exc:  # NOTE: the group is gone: fail everything, let the owner stop
                self._fail_running(exc)
                self.broken.set()
                return
            except Exception as exc:  # NOTE: one failed step must not wedge every stream
                self._fail_running(exc)
                continue
            self._stamp_scheduled(started)
            self._dispatch(outputs)
            self._stats = self.engine.stats()

    def _apply_commands(self) -> None:
        commands, self._commands = self._commands, []
        for command in commands:
            command()
        if commands:
            self._stats = self.engine.stats()

    def _add(self, rid: str, ids: list[int], params: SamplingParams, hold_kv: bool = False,
             kv_send: KVSendOrder | None = None, adapter: str | None = None) -> None:
        stream = self._streams.get(rid)
        if stream is None:
            return  # the caller went away before the request was admitted
        try:
            stream.req = self.engine.add_request(rid, ids, params, hold_kv=hold_kv, kv_send=kv_send, adapter=adapter)
        except ValueError as exc:
            stream.queue.put_nowait(exc)
            return
        self._unscheduled[rid] = stream.req

    def _stamp_scheduled(self, step_started: float) -> None:
        """Stamp the requests the step just run scheduled for the first time (running, or
        already finished with a token); drop the ones that ended unscheduled."""
        for rid, req in list(self._unscheduled.items()):
            if req.status is Status.RUNNING or req.num_output_tokens > 0:
                req.first_scheduled_time = step_started
            elif not req.finished:
                continue
            del self._unscheduled[rid]

    def _reserve(self, rid: str, ids: list[int], params: SamplingParams,
                 adapter: str | None) -> tuple[list[int], int] | None:
        reserved = self.engine.reserve_remote(rid, ids, params, adapter)
        if reserved is not None:
            req = self.engine.requests[rid]
            req.first_scheduled_time = req.arrival_time  # NOTE: the peer's prefill begins with the order sent next
        return reserved

    def _admit(self, rid: str, first_token: int, stream: _Stream) -> None:
        stream.req = self.engine.requests.get(rid)
        stream.queue.put_nowait(self.engine.admit_remote(rid, first_token))

    def _apply_abort(self, rid: str) -> None:
        req = self.engine.requests.get(rid)
        if not self.engine.abort(rid):
            return
        stream = self._streams.get(rid)
        if stream is not None:
            stream.queue.put_nowait(EngineOutput(rid, [], "abort", req.num_prompt_tokens,
                                                 max(req.num_cached_tokens, 0)))

    def _fail_running(self, exc: Exception) -> None:
        log.exception("engine step failed; failing the requests it held")
        error = RuntimeError(f"the engine step failed: {type(exc).__name__}: {exc}")
        for rid in self.engine.fail_all():
            stream = self._streams.get(rid)
            if stream is not None:
                stream.queue.put_nowait(error)
        self._stats = self.engine.stats()

    def _dispatch(self, outputs: list[EngineOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.req_id)
            if stream is not None:
                stream.queue.put_nowait(out)

    @staticmethod
    def _merge(first: EngineOutput, stream: _Stream) -> StreamOutput:
        merged = StreamOutput(first.req_id, list(first.new_token_ids), first.finish_reason,
                              first.num_prompt_tokens, first.num_cached_tokens, list(first.logprobs) or None,
                              stream.req.first_scheduled_time if stream.req is not None else None)
        while merged.finish_reason is None and not stream.queue.empty():
            nxt = stream.queue.get_nowait()
            if isinstance(nxt, BaseException):
                stream.queue.put_nowait(nxt)
                break
            merged.new_token_ids += nxt.new_token_ids
            merged.finish_reason = nxt.finish_reason
            if nxt.logprobs:
                merged.logprobs = (merged.logprobs or []) + list(nxt.logprobs)
        stream.done = merged.finish_reason is not None
        return merged
