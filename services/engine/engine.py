"""The engine: one scheduler, one block table per request, and the ranks that execute; ``step()``
advances every request.

Owns: the requests it was given (by id) from ``add_request`` until they finish or
are aborted, the objects wired once in ``__init__`` (the executor with its ranks,
the KV block manager, the scheduler), what the ranks have been told of each
request (``_blocks_sent``; who departed since the last plan), and at most one
launched step whose tokens are not read yet. ``step()`` = schedule -> plan (a
``StepPlan``: plain data) -> launch (the executor runs and samples on the device)
-> complete (read the tokens, update the requests) and returns the new tokens of
each request that changed. Every block allocation is the scheduler's (through
the block manager); the ranks only read block ids from plans. Not thread-safe:
one caller drives it (the offline ``LLM`` or the asyncio wrapper's step loop).

Overlap (``async_scheduling``, on by default where the device runs behind the
host): before completing step N, the engine counts N as done, holds a place for
each sampled token and launches step N+1, whose inputs for those places come from
the device (``DeviceFeed``); the host's bookkeeping of N then runs while the
device computes N+1. Requests whose tokens the host must see before sampling
again (penalties, logprobs, a KV hand-off whose layers are sent as written) run
without overlap.
A request that ends at N also computes one wasted row in N+1, and its blocks
are freed once N+1 is done (``free_after``), so no later owner of a block meets a
write of the step in flight.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from pdserve.common.model_source import ModelSource, resolve_model
from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.config import EngineConfig, SchedulerConfig
from pdserve.engine.executor import Executor, InProcessExecutor, MultiprocExecutor, RankConfig, RankWorker
from pdserve.engine.executor.replica_group import ReplicaGroup
from pdserve.engine.kv_cache import KVCacheManager
from pdserve.engine.kv_connector import KVConnectorScheduler, LayerSender
from pdserve.engine.layers.linear import check_head_split
from pdserve.engine.models.loader import load_config
from pdserve.engine.models.model_config import ModelConfig
from pdserve.engine.models.registry import check_quantization
from pdserve.engine.plan import KVSendOrder, NewRequest, PlannedRow, StepPlan
from pdserve.engine.request import Request, TokenLogprob
from pdserve.engine.sampler import PendingSample
from pdserve.engine.lora.peft_format import adapter_target_modules
from pdserve.engine.lora.residency import AdapterResidency
from pdserve.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput

_HELD = 0  # token id standing in for a sampled token the host has not read yet


@dataclass
class EngineOutput:
    """What one request gained in one step."""
    req_id: str
    new_token_ids: list[int]
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class _Launched:
    """A step whose device work is queued and whose tokens are not read yet."""
    out: SchedulerOutput
    sampled: list[Request]  # the requests that sample, in the order of their rows
    places: list[int]  # where each sampled token goes in its request's token_ids
    sample: PendingSample | None
    advanced: bool = False  # requests already count the step as done (places held)
    free_after: list[str] = field(default_factory=list)  # requests whose blocks wait for this step

    @property
    def req_ids(self) -> set[str]:
        return {s.req.req_id for s in self.out.seqs}


@dataclass
class _Counters:
    tokens_computed_total: int = 0
    steps_total: int = 0
    preemptions_total: int = 0
    overlapped_steps_total: int = 0  # steps launched before the previous step's tokens were read
    expert_only_steps_total: int = 0  # steps this replica had no tokens but ran the MoE layers for others
    last_step_seconds: float = 0.0


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.source = resolve_model(config.model)
        self.model_config: ModelConfig = load_config(self.source)
        self.executor = _executor(config, self.source, self.model_config)
        num_blocks = config.num_blocks or self._auto_num_blocks()
        self.max_model_len = min(config.max_model_len or self.model_config.max_model_len,
                                 self.model_config.max_model_len, num_blocks * config.block_size)
        self.executor.allocate(num_blocks, self.max_model_len)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        sched_cfg = SchedulerConfig(config.max_batch_size, config.max_prefill_tokens, self.max_model_len)
        self.residency = AdapterResidency(config.max_loras) if config.lora_enabled else None
        self.scheduler = Scheduler(sched_cfg, self.kv, self.residency)
        self.overlap = config.tp == 1 and (config.async_scheduling if config.async_scheduling is not None
                                           else self.executor.supports_overlap)
        self._launched: _Launched | None = None
        self._replicas_busy = False  # another replica sharing the MoE layers ran the last step
        self._completing: _Launched | None = None  # the step ``step()`` is reading (kept for ``fail_all``)
        self._blocks_sent: dict[str, int] = {}  # requests the ranks know -> length of the table sent
        self._departed: list[str] = []  # requests the ranks may forget (told in the next plan)
        self.requests: dict[str, Request] = {}
        self.connector = KVConnectorScheduler(self.kv)
        self.counters = _Counters()
        self.eos_token_ids = self.model_config.eos_token_ids
        self.adapters: set[str] = set()  # LoRA adapters every rank has loaded (new requests may use them)
        self._unloading: set[str] = set()  # unloaded; their slots are freed once no request uses them
        for name, path in config.adapter_paths().items():
            self.load_adapter(name, path)

    # ---- sizing -------------------------------------------------------------
    def block_bytes(self) -> int:
        return self.executor.block_bytes()

    def _auto_num_blocks(self) -> int:
        by_memory = self.executor.blocks_that_fit(self.config.cache_memory_fraction)
        per_seq = self.executor.cache_tokens_per_seq
        tokens = self.config.max_batch_size * min(self.model_config.max_model_len, per_seq)
        return max(1, min(by_memory, -(-tokens // self.config.block_size)))

    @property
    def device(self) -> torch.device:
        return self.executor.device

    def attach_layer_sender(self, sender: LayerSender) -> None:
        """The worker side of the KV connector that sends each layer as it is written."""
        self.executor.attach_layer_sender(sender)

    def close(self) -> None:
        """Stop the rank processes, if any (idempotent)."""
        self.executor.close()

    def synchronize(self) -> None:
        """Wait until the device has finished all queued work."""
        self.executor.synchronize()

    @property
    def kv_cache(self) -> torch.Tensor | None:
        """The KV cache of this process's rank (what an in-process transport registers or tests poke);
        None when the ranks run in their own processes (see ``kv_links``)."""
        return self.executor.kv_cache

    def local_rank(self) -> RankWorker:
        """The rank running in this process (tp = 1): its model, graphs and adapter slots, for
        benchmarks and tools; ValueError when the ranks run in processes of their own."""
        return self.executor.local_rank()

    def kv_links(self) -> list:
        """Each rank process's KV command/event pipe (empty when the one rank is in this process)."""
        return self.executor.kv_links()

    # ---- requests -----------------------------------------------------------
    def add_request(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    hold_kv: bool = False, kv_send: KVSendOrder | None = None, adapter: str | None = None) -> Request:
        """Validate and queue a request; ValueError with a clear message on bad input.

        With hold_kv the request's blocks outlive its end (until ``release_held``), so
        a peer can read or be sent its KV.
        """
        req = self._new_request(req_id, prompt_token_ids, params, adapter)
        req.hold_kv = hold_kv
        req.kv_send = kv_send
        self.scheduler.add(req)
        return req

    # ---- LoRA adapters ------------------------------------------------------
    def load_adapter(self, name: str, path: str) -> None:
        """Load a PEFT adapter on every rank; ValueError naming the problem (nothing loaded then)."""
        if not self.config.lora_enabled:
            raise ValueError("LoRA is not enabled on this engine: start it with enable_lora (or adapters)")
        if name in self.adapters or name in self._unloading or not name:
            raise ValueError(f"adapter {name!r} is already loaded" if name else "the adapter needs a name")
        held = self.adapters | self._unloading
        if len(held) >= self.config.lora_capacity:
            raise ValueError(f"adapter {name!r}: all max_cpu_loras={self.config.lora_capacity} adapters are loaded "
                             f"({sorted(held)}); unload one first")
        errors = [e for e in self.executor.load_adapter(name, path) if e]
        if errors:
            self.executor.unload_adapter(name)  # NOTE: ranks that took it give it back
            raise ValueError(errors[0])
        self.adapters.add(name)

    def unload_adapter(self, name: str) -> None:
        """Refuse new requests for ``name`` at once; its slot is freed when its last request ends."""
        if name not in self.adapters:
            raise ValueError(f"unknown adapter {name!r}; loaded: {sorted(self.adapters) or 'none'}")
        self.adapters.discard(name)
        self._unloading.add(name)
        self._free_unloaded()

    def _free_unloaded(self) -> None:
        if not self._unloading:
            return
        busy = {r.adapter for r in self.requests.values()}
        for name in sorted(self._unloading - busy):
            self.executor.unload_adapter(name)
            self.residency.forget(name)
            self._unloading.discard(name)

    def _new_request(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     adapter: str | None = None) -> Request:
        self._validate(req_id, prompt_token_ids, params)
        if adapter is not None and adapter not in self.adapters:
            raise ValueError(f"unknown adapter {adapter!r}; loaded: {sorted(self.adapters) or 'none'}")
        req = Request(req_id, list(prompt_token_ids), params, eos_token_ids=self.eos_token_ids,
                      max_model_len=self.max_model_len, adapter=adapter)
        self.requests[req_id] = req
        return req

    def _validate(self, req_id: str, ids: list[int], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise ValueError("params must be a SamplingParams")
        if req_id in self.requests:
            raise ValueError(f"request id {req_id!r} is already in use")
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens but the model's context is {self.max_model_len} "
                             "tokens (the prompt must leave room for at least one generated token)")
        vocab = self.model_config.vocab_size
        bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad!r} is out of range [0, {vocab})")

    def abort(self, req_id: str) -> bool:
        """Stop a request and free its blocks; False if it is unknown or already done.

        NOTE: a remote reservation is not touched here: a peer may still be writing
        into its blocks. The owner of the transfer calls ``cancel_remote`` once it is over.
        """
        if self.connector.is_arriving(req_id):
            return False
        req = self.requests.pop(req_id, None)
        if req is None or req.finished:
            return False
        self._end(req, "abort", free_kv=True)
        return True

    def _end(self, req: Request, reason: str, free_kv: bool) -> None:
        """Finish a request; blocks a launched step still writes are freed after it."""
        self._depart(req.req_id)
        in_flight = free_kv and self._launched is not None and req.req_id in self._launched.req_ids
        self.scheduler.finish(req, reason, free_kv=free_kv and not in_flight)
        if in_flight:
            self._launched.free_after.append(req.req_id)

    # ---- remote KV (disaggregated prefill) -----------------------------------
    def reserve_remote(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       adapter: str | None = None) -> tuple[list[int], int] | None:
        """Decode side: hold blocks for a prompt whose KV a peer will write.

        Returns (block ids covering the prompt, prompt tokens already cached here,
        whose blocks need not be sent), or None if the pool cannot hold it now.
        """
        if self.scheduler.blocked_on_kv:  # NOTE: queued requests wait for blocks: do not jump the queue
            return None
        req = self._new_request(req_id, prompt_token_ids, params, adapter)
        reserved = self.connector.reserve(req)
        if reserved is None:
            del self.requests[req_id]
        return reserved

    def admit_remote(self, req_id: str, first_token: int) -> EngineOutput:
        """Decode side: the prompt's KV has landed; decoding continues after first_token."""
        req = self.connector.landed(req_id)
        req.append_token(first_token)  # NOTE: the peer drew its noise: the plan's draws_done skips it
        if req.finish_reason is not None:
            self.scheduler.finish(req, req.finish_reason)
            self.requests.pop(req_id, None)
        else:
            self.scheduler.add(req, front=True)  # NOTE: it holds its blocks; running it frees them
        return EngineOutput(req_id, [first_token], req.finish_reason, req.num_prompt_tokens, req.num_cached_tokens)

    def cancel_remote(self, req_id: str) -> bool:
        """Decode side: drop a reservation whose transfer is over (done, failed or timed out)."""
        req = self.connector.cancel(req_id)
        if req is None:
            return False
        self.requests.pop(req_id, None)
        self.scheduler.finish(req, "abort")
        return True

    def release_held(self, req_id: str) -> bool:
        """Prefill side: the transfer of a finished request's KV is over; free its blocks."""
        return self.connector.release(req_id)

    def fail_all(self) -> list[str]:
        """After a step raised: end every queued and running request ("error") and free
        their blocks; returns their ids. A launched step is dropped unread once the
        device is past it. Remote reservations (not scheduled) stay with the transfers
        that own them; a prefill that keeps its KV stays with the connector for its owner."""
        dropped = [s for s in (self._completing, self._launched) if s is not None]
        self._completing = self._launched = None
        try:
            self.executor.synchronize()  # NOTE: nothing queued may write a freed block
        except Exception:  # the device itself failed: nothing of it runs any more
            pass
        for req_id in (rid for step in dropped for rid in step.free_after):
            self.kv.free(req_id)  # NOTE: ended while a dropped step ran; their blocks waited for it
        self.executor.forget_all()
        self._blocks_sent.clear()
        self._departed.clear()
        failed = []
        for req in list(self.scheduler.running) + list(self.scheduler.waiting):
            self.scheduler.finish(req, "error", free_kv=self.connector.on_finished(req))
            self.requests.pop(req.req_id, None)
            failed.append(req.req_id)
        return failed

    def has_unfinished(self) -> bool:
        """Work of this engine's, or (replicas sharing MoE layers) another replica's still stepping."""
        return self.scheduler.has_work() or self._launched is not None or self._replicas_busy

    @property
    def lockstep(self) -> bool:
        """Whether this engine steps in lockstep with other replicas (they share its MoE layers):
        its loop must keep calling ``step`` while idle, or the others wait for it."""
        return self.config.ep_spans_replicas

    # ---- the step -----------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[EngineOutput]:
        t0 = time.perf_counter()
        current, self._launched = self._launched, None
        if current is None:
            current = self._launch(self.scheduler.schedule(), None)
            if current is None:
                self._replicas_busy = self.lockstep and self.executor.idle_step()
                self.counters.expert_only_steps_total += self._replicas_busy
                return []
            self._replicas_busy = self.lockstep
        self._completing = current
        if self._may_overlap(current):
            ending = self._advance(current)
            self._launched = self._launch(self.scheduler.schedule(ending), current)
            self.counters.overlapped_steps_total += self._launched is not None
        outputs = self._complete(current)
        self._completing = None
        self._free_unloaded()
        self.counters.last_step_seconds = time.perf_counter() - t0
        return outputs

    def _launch(self, out: SchedulerOutput, previous: _Launched | None) -> _Launched | None:
        """Queue a scheduled step on the device (forward and sampling); None if nothing runs."""
        self.counters.preemptions_total += len(out.preempted)
        for rid in out.preempted:
            self._depart(rid)
        if not out.seqs:
            return None
        tables = [self.kv.blocks_of(s.req.req_id) for s in out.seqs]
        feed = self._feed(out, previous) if previous is not None else ((), ())
        sample = self.executor.execute(self._plan(out, tables, feed))
        sampled = [s.req for s in out.seqs if s.samples]
        places = [s.start + s.num_new for s in out.seqs if s.samples]
        self.counters.steps_total += 1
        self.counters.tokens_computed_total += out.num_tokens
        return _Launched(out, sampled, places, sample)

    def _plan(self, out: SchedulerOutput, tables: list[list[int]],
              feed: tuple[tuple[int, ...], tuple[int, ...]]) -> StepPlan:
        """The step as plain data: new requests whole, the rest as token and block changes."""
        finished, self._departed = tuple(self._departed), []
        rows, new = [], []
        for seq, table in zip(out.seqs, tables):
            rid, req = seq.req.req_id, seq.req
            sent = self._blocks_sent.get(rid)
            if sent is None or sent > len(table):
                new.append(self._new_on_ranks(seq, table))
                added: tuple[int, ...] = ()
            else:
                added = tuple(table[sent:])
            self._blocks_sent[rid] = len(table)
            rows.append(PlannedRow(rid, seq.start, tuple(req.token_ids[seq.start:seq.start + seq.num_new]),
                                   seq.samples, added))
        swaps = self.residency.take_swaps() if self.residency is not None else ()
        return StepPlan(tuple(rows), tuple(new), finished, feed[0], feed[1], swaps)

    @staticmethod
    def _new_on_ranks(seq: ScheduledSeq, table: list[int]) -> NewRequest:
        req = seq.req
        seeded_draws = req.num_output_tokens if req.params.seed is not None and not req.params.greedy else 0
        return NewRequest(req.req_id, req.params, req.num_prompt_tokens, tuple(req.token_ids[:seq.start]),
                          tuple(table), seeded_draws, req.kv_send, req.adapter)

    def _depart(self, rid: str) -> None:
        """The ranks may forget ``rid`` (finished, aborted or preempted); told in the next plan."""
        if self._blocks_sent.pop(rid, None) is not None:
            self._departed.append(rid)

    @staticmethod
    def _feed(out: SchedulerOutput, previous: _Launched) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(rows of ``out``, rows of ``previous``'s samples): inputs only the device has."""
        if previous.sample is None:
            return (), ()
        row_of = {req.req_id: i for i, req in enumerate(previous.sampled)}
        dst, src, offset = [], [], 0
        for s in out.seqs:
            i = row_of.get(s.req.req_id)
            if i is not None and s.start == previous.places[i]:
                dst.append(offset)
                src.append(i)
            offset += s.num_new
        return tuple(dst), tuple(src)

    def _may_overlap(self, current: _Launched) -> bool:
        """Whether the next step can be launched before ``current``'s tokens are read."""
        if not self.overlap or not current.sampled:
            return False
        if len(current.sampled) != len(current.out.seqs) or len(self.scheduler.running) != len(current.sampled):
            return False  # NOTE: only whole decode/last-chunk steps, so the next step cannot preempt
        need = 0
        for req, place in zip(current.sampled, current.places):
            p = req.params
            if req.hold_kv or p.logprobs is not None or p.penalized:
                return False  # the host must see the token first (or a peer is sent this step's KV)
            need += self.kv.blocks_needed(req.req_id, place + 1)
        return need <= self.kv.pool.num_free

    def _advance(self, current: _Launched) -> frozenset[str]:
        """Count ``current`` as done and hold a place for each sampled token; returns the
        requests known to end with it (left out of the next step)."""
        for s in current.out.seqs:
            s.req.num_computed_tokens = s.start + s.num_new
        ending = set()
        for req, place in zip(current.sampled, current.places):
            req.token_ids.append(_HELD)
            if req.ends_by_length_at(place + 1):
                ending.add(req.req_id)
        current.advanced = True
        return frozenset(ending)

    def _complete(self, current: _Launched) -> list[EngineOutput]:
        """Read ``current``'s tokens (waiting for its work only) and update its requests."""
        result = self.executor.collect(current.sample) if current.sample is not None else None
        for req_id in current.free_after:  # NOTE: the device is past this step now
            self.kv.free(req_id)
        for seq in current.out.seqs:
            end = seq.start + seq.num_new
            if not current.advanced:
                seq.req.num_computed_tokens = end
            self.kv.commit_full_blocks(seq.req.req_id, seq.req.token_ids, end)
        outputs = []
        for i, (req, place) in enumerate(zip(current.sampled, current.places)):
            if req.finished:
                continue  # aborted while the step ran
            token = result.token_ids[i]
            if current.advanced:
                req.set_token(place, token)
            else:
                req.append_token(token)
            lp = result.logprobs[i]
            if lp is not None:
                req.logprobs.append(lp)
            if req.finish_reason is not None:
                del req.token_ids[place + 1:]  # a place held by the step in flight
                self._end(req, req.finish_reason, free_kv=self.connector.on_finished(req))
                self.requests.pop(req.req_id, None)
            outputs.append(EngineOutput(req.req_id, [token], req.finish_reason,
                                        req.num_prompt_tokens, max(req.num_cached_tokens, 0),
                                        [lp] if lp is not None else []))
        return outputs

    # ---- introspection ------------------------------------------------------
    def blocks_of(self, req_id: str) -> list[int]:
        """The block table of a request (a copy)."""
        return list(self.kv.blocks_of(req_id))

    def kv_stats(self) -> dict[str, int]:
        return self.kv.stats()

    def stats(self) -> dict[str, float | int]:
        kv = self.kv.stats()
        c = self.counters
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_blocks_free": kv["free"], "kv_blocks_used": kv["used"], "kv_blocks_cached": kv["cached"],
                "kv_blocks_total": kv["total"], "tokens_computed_total": c.tokens_computed_total,
                "steps_total": c.steps_total, "preemptions_total": c.preemptions_total,
                "overlapped_steps_total": c.overlapped_steps_total, "last_step_seconds": c.last_step_seconds,
                "expert_only_steps_total": c.expert_only_steps_total,
                "rank_seconds": self.executor.rank_seconds(), "lora_adapters_loaded": len(self.adapters),
                "lora_swaps_total": self.residency.swaps_total if self.residency is not None else 0,
                "lora_resident": sorted(self.residency.resident()) if self.residency is not None else []}

    def model_info(self) -> dict:
        m = self.model_config
        return {"model": self.config.model, "architecture": m.architecture, "dtype": self.config.dtype,
                "max_model_len": self.max_model_len, "vocab_size": m.vocab_size,
                "eos_token_ids": list(self.eos_token_ids), "block_size": self.config.block_size,
                "num_layers": m.num_layers, "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim,
                "num_blocks": self.kv.pool.num_blocks, "adapters": sorted(self.adapters),
                "quantization": check_quantization(m)}


def _executor(config: EngineConfig, source: ModelSource, model_config: ModelConfig) -> Executor:
    """One rank in this process for tp = 1; a process per rank otherwise. A replica sharing the
    MoE layers with other replicas joins their group (its rank processes do, with tp > 1)."""
    if config.dp != 1 and not config.ep_spans_replicas:
        raise ValueError(f"dp={config.dp}: one engine is one data-parallel replica; run replicas as workers "
                         "(pdserve worker --dp N starts N of them)")
    if config.ep_spans_replicas and not config.dp_port:
        raise ValueError(f"ep={config.ep} across dp={config.dp} replicas: dp_port (where the replicas meet) is not "
                         "set; pdserve worker --dp N --ep N sets it for the replicas it starts")
    check_expert_split(model_config, config.ep)  # NOTE: before any rank starts or group forms
    if config.tp == 1:
        return _in_process(config, source, model_config)
    check_head_split(model_config.num_heads, model_config.num_kv_heads, config.tp)
    return MultiprocExecutor(_rank_config(config), source, model_config, config.tp, step_timeout=config.rank_timeout)


def _in_process(config: EngineConfig, source: ModelSource, model_config: ModelConfig) -> InProcessExecutor:
    if not config.ep_spans_replicas:
        return InProcessExecutor(RankWorker(_rank_config(config), source, model_config))
    group = ReplicaGroup(config.dp_rank, config.dp, config.dp_port, config.rank_timeout)
    try:
        return InProcessExecutor(RankWorker(_rank_config(config), source, model_config, replicas=group), group)
    except BaseException:
        group.close()
        raise


def check_expert_split(model_config: ModelConfig, ep: int) -> None:
    """ValueError unless ``ep`` ranks can split the model's experts."""
    if ep > 1 and not model_config.num_experts:
        raise ValueError(f"ep={ep} needs a mixture-of-experts model; {model_config.architecture} has no experts")
    if ep > 1 and model_config.num_experts % ep:
        raise ValueError(f"ep={ep} must divide the number of experts ({model_config.num_experts})")


def _rank_config(config: EngineConfig) -> RankConfig:
    lora = config.lora_enabled
    # NOTE: gloo's collectives cannot be captured in a CUDA graph
    graphs = not config.enforce_eager and (config.tp == 1 or config.collectives == "nccl")
    return RankConfig(device_type=config.device_type, dtype=config.dtype, block_size=config.block_size,
                      max_batch_size=config.max_batch_size, graphs=graphs, collectives=config.collectives,
                      max_step_tokens=config.max_prefill_tokens,
                      enable_lora=lora, max_loras=config.max_loras, max_lora_rank=config.max_lora_rank,
                      lora_targets=lora_targets(config) if lora else None,
                      compiled_cpu_kernels=config.compiled_cpu_kernels, seed=config.seed, ep_size=config.ep,
                      **_replica_fields(config))


def lora_targets(config: EngineConfig) -> tuple[str, ...] | None:
    """The modules whose layers LoRA wraps: ``lora_target_modules``, else every module the
    adapters given at start train (read from their tensors' names); None: every linear layer."""
    if "all" in config.lora_target_modules:
        return None
    if config.lora_target_modules:
        return tuple(sorted(set(config.lora_target_modules)))
    paths = config.adapter_paths()
    if not paths:
        return None
    return tuple(sorted(set().union(*(adapter_target_modules(name, path) for name, path in paths.items()))))


def _replica_fields(config: EngineConfig) -> dict:
    """This replica's place among the replicas sharing the MoE layers (none: the defaults)."""
    if not config.ep_spans_replicas:
        return {}
    return dict(dp_rank=config.dp_rank, dp_size=config.dp, dp_port=config.dp_port,
                expert_all_to_all_tokens=config.expert_all_to_all_tokens)
