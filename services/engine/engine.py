"""The engine: one model, one KV cache, one scheduler; ``step()`` advances every request.

Owns: the requests it was given (by id) from ``add_request`` until they finish or
are aborted, and the objects wired once in ``__init__`` (platform, model, cache,
scheduler, runner with its captured graphs, sampler). ``step()`` = schedule ->
execute -> sample -> update and returns the new tokens of each request that
changed. Not thread-safe: one caller drives it (the offline ``LLM`` or the asyncio
wrapper's step loop).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from services.common.model_source import resolve_model
from services.common.sampling_params import SamplingParams
from services.engine.config import EngineConfig, SchedulerConfig
from services.engine.kv_cache import KVCacheManager
from services.engine.model_runner import ModelRunner, RunnerConfig, graph_batch_sizes
from services.engine.models.loader import DTYPES, load_config, load_model
from services.engine.models.model_config import ModelConfig
from services.engine.platforms import get_platform
from services.engine.request import Request, Status, TokenLogprob
from services.engine.sampler import Sampler
from services.engine.scheduler import Scheduler, SchedulerOutput


@dataclass
class EngineOutput:
    """What one request gained in one step."""
    req_id: str
    new_token_ids: list[int]
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)


class LayerListener(Protocol):
    """Told which sequences a step runs, then called as each layer's KV is written."""

    def begin_step(self, out: SchedulerOutput, tables: list[list[int]]) -> Callable[[int], None] | None: ...


@dataclass
class _Counters:
    tokens_computed_total: int = 0
    steps_total: int = 0
    preemptions_total: int = 0
    last_step_seconds: float = 0.0


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.source = resolve_model(config.model)
        self.model_config: ModelConfig = load_config(self.source)
        self.platform = get_platform(config.device_type)
        self.device = self.platform.device()
        model = load_model(self.source, self.model_config, config.dtype, self.device, config.seed)
        num_blocks = config.num_blocks or self._auto_num_blocks()
        self.max_model_len = min(config.max_model_len or self.model_config.max_model_len,
                                 self.model_config.max_model_len, num_blocks * config.block_size)
        self.kv_cache = self._allocate_cache(num_blocks)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        sched_cfg = SchedulerConfig(config.max_batch_size, config.max_prefill_tokens, self.max_model_len)
        self.scheduler = Scheduler(sched_cfg, self.kv)
        graphs = self.platform.supports_graphs and not config.enforce_eager
        runner_cfg = RunnerConfig(config.block_size, self.max_model_len,
                                  graph_batch_sizes(config.max_batch_size) if graphs else ())
        self.runner = ModelRunner(model, self.kv_cache, self.platform.backend(), self.platform,
                                  self.device, runner_cfg)
        self.runner.capture_graphs()
        self.sampler = Sampler(torch.Generator(device=self.device).manual_seed(config.seed))
        self.requests: dict[str, Request] = {}
        self.remote: dict[str, Request] = {}  # decode side: blocks reserved, KV arriving from a peer
        self.held: dict[str, Request] = {}  # prefill side: finished, blocks kept until the transfer ends
        self.layer_listener: LayerListener | None = None
        self.counters = _Counters()
        self.eos_token_ids = self.model_config.eos_token_ids

    # ---- sizing -------------------------------------------------------------
    def block_bytes(self) -> int:
        m = self.model_config
        item = torch.empty((), dtype=DTYPES[self.config.dtype]).element_size()
        return m.num_layers * 2 * self.config.block_size * m.num_kv_heads * m.head_dim * item

    def _auto_num_blocks(self) -> int:
        free, _ = self.platform.memory_info(self.device)
        by_memory = int(free * self.config.cache_memory_fraction) // self.block_bytes()
        per_seq = self.platform.cache_tokens_per_seq
        tokens = self.config.max_batch_size * min(self.model_config.max_model_len, per_seq)
        return max(1, min(by_memory, -(-tokens // self.config.block_size)))

    def _allocate_cache(self, num_blocks: int) -> torch.Tensor:
        m, c = self.model_config, self.config
        shape = (m.num_layers, num_blocks, 2, c.block_size, m.num_kv_heads, m.head_dim)
        return torch.zeros(shape, dtype=DTYPES[c.dtype], device=self.device)

    # ---- requests -----------------------------------------------------------
    def add_request(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    hold_kv: bool = False) -> Request:
        """Validate and queue a request; ValueError with a clear message on bad input.

        With hold_kv the request's blocks outlive its end (until ``release_held``), so
        a peer can read or be sent its KV.
        """
        req = self._new_request(req_id, prompt_token_ids, params)
        req.hold_kv = hold_kv
        self.scheduler.add(req)
        return req

    def _new_request(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        self._validate(req_id, prompt_token_ids, params)
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        req = Request(req_id, list(prompt_token_ids), params, eos_token_ids=self.eos_token_ids,
                      max_model_len=self.max_model_len, generator=gen)
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
        if req_id in self.remote:
            return False
        req = self.requests.pop(req_id, None)
        if req is None or req.finished:
            return False
        self.scheduler.finish(req, "abort")
        return True

    # ---- remote KV (disaggregated prefill) -----------------------------------
    def reserve_remote(self, req_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> tuple[list[int], int] | None:
        """Decode side: hold blocks for a prompt whose KV a peer will write.

        Returns (block ids covering the prompt, prompt tokens already cached here,
        whose blocks need not be sent), or None if the pool cannot hold it now.
        """
        req = self._new_request(req_id, prompt_token_ids, params)
        cached = self.kv.match_prefix(req_id, req.token_ids)
        if not self.kv.allocate_slots(req_id, req.num_prompt_tokens):
            self.kv.free(req_id)
            del self.requests[req_id]
            return None
        req.num_cached_tokens = cached
        self.remote[req_id] = req
        return list(self.kv.blocks_of(req_id)), cached

    def admit_remote(self, req_id: str, first_token: int) -> EngineOutput:
        """Decode side: the prompt's KV has landed; decoding continues after first_token."""
        req = self.remote.pop(req_id)
        req.num_computed_tokens = req.num_prompt_tokens
        self.kv.commit_full_blocks(req_id, req.token_ids, req.num_computed_tokens)
        if req.generator is not None and not req.params.greedy:
            # NOTE: the peer drew this seed's first noise vector for first_token; skip it here
            # so a seeded request samples the same tokens as when served by one engine.
            torch.empty(self.model_config.vocab_size, device=self.device).exponential_(generator=req.generator)
        req.append_token(first_token)
        if req.finish_reason is not None:
            self.scheduler.finish(req, req.finish_reason)
            self.requests.pop(req_id, None)
        else:
            self.scheduler.add(req)
        return EngineOutput(req_id, [first_token], req.finish_reason, req.num_prompt_tokens, req.num_cached_tokens)

    def cancel_remote(self, req_id: str) -> bool:
        """Decode side: drop a reservation whose transfer is over (done, failed or timed out)."""
        req = self.remote.pop(req_id, None)
        if req is None:
            return False
        self.requests.pop(req_id, None)
        self.scheduler.finish(req, "abort")
        return True

    def release_held(self, req_id: str) -> bool:
        """Prefill side: the transfer of a finished request's KV is over; free its blocks."""
        req = self.held.pop(req_id, None)
        if req is None:
            return False
        self.kv.free(req_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step -----------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[EngineOutput]:
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        if not out.seqs:
            self.counters.preemptions_total += len(out.preempted)
            return []
        tables = [self.kv.blocks_of(s.req.req_id) for s in out.seqs]
        hook = None
        if self.layer_listener is not None:
            hook = self.layer_listener.begin_step(out, tables)
        logits = self.runner.execute(out, tables, hook)
        sampling = [s.req for s in out.seqs if s.samples]
        result = self.sampler.sample(logits, sampling) if sampling else None
        outputs = self._update(out, result)
        self.counters.steps_total += 1
        self.counters.tokens_computed_total += out.num_tokens
        self.counters.preemptions_total += len(out.preempted)
        self.counters.last_step_seconds = time.perf_counter() - t0
        return outputs

    def _update(self, out, result) -> list[EngineOutput]:
        for seq in out.seqs:
            seq.req.num_computed_tokens = seq.start + seq.num_new
            self.kv.commit_full_blocks(seq.req.req_id, seq.req.token_ids, seq.req.num_computed_tokens)
        outputs = []
        sampled = [s.req for s in out.seqs if s.samples]
        for i, req in enumerate(sampled):
            req.append_token(result.token_ids[i])
            lp = result.logprobs[i]
            if lp is not None:
                req.logprobs.append(lp)
            if req.finish_reason is not None:
                self.scheduler.finish(req, req.finish_reason, free_kv=not req.hold_kv)
                self.requests.pop(req.req_id, None)
                if req.hold_kv:
                    self.held[req.req_id] = req
            outputs.append(EngineOutput(req.req_id, [result.token_ids[i]], req.finish_reason,
                                        req.num_prompt_tokens, max(req.num_cached_tokens, 0),
                                        [lp] if lp is not None else []))
        return outputs

    # ---- introspection ------------------------------------------------------
    def kv_stats(self) -> dict[str, int]:
        return self.kv.stats()

    def stats(self) -> dict[str, float | int]:
        kv = self.kv.stats()
        c = self.counters
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_blocks_free": kv["free"], "kv_blocks_used": kv["used"], "kv_blocks_cached": kv["cached"],
                "kv_blocks_total": kv["total"], "tokens_computed_total": c.tokens_computed_total,
                "steps_total": c.steps_total, "preemptions_total": c.preemptions_total, "last_step_seconds": c.last_step_seconds}

    def model_info(self) -> dict:
        m = self.model_config
        return {"model": self.config.model, "architecture": m.architecture, "dtype": self.config.dtype,
                "max_model_len": self.max_model_len, "vocab_size": m.vocab_size,
                "eos_token_ids": list(self.eos_token_ids), "block_size": self.config.block_size,
                "num_layers": m.num_layers, "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim,
                "num_blocks": self.kv.pool.num_blocks}
