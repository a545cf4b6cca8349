"""One rank of the engine: its model slice, its KV-cache shard, its graphs, and the sampler.

Owns: the device it runs on, the model built with this rank's ``LayerContext``,
the KV cache shard (``[num_layers, num_blocks, 2, block_size, kv_heads_per_rank,
head_dim]``), the runner with its captured graphs, the sampler, the rank-side
state of every request it has been sent (``RankRequest``: sampling parameters,
its generator, the tokens it has seen, its block table) and the device tokens of
the last step it sampled (inputs of an overlapped next step).

Lifecycle: ``RankWorker(config, ...)`` loads the model -> ``block_bytes`` /
``blocks_that_fit`` size the cache -> ``allocate(num_blocks, max_model_len)``
allocates the shard and captures graphs (with LoRA on, every linear layer is wrapped
already: each size is captured with the adapter kernels, and without them for steps
where no row has an adapter) -> ``execute(plan)`` per step (applies
the plan's request changes and adapter swaps, writes each token's adapter slot,
tells the KV connector's layer sender which rows run, runs the model, launches
sampling) and ``collect(pending)`` (waits for that step's tokens) -> ``forget_all()`` after a
failed step. Only a rank that samples (rank 0) returns tokens. A replica whose MoE layers
are shared with other replicas (``ReplicaGroup``) starts every step with the group's
handshake, and steps with ``idle_step()`` when its engine has nothing to run.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from dataclasses import dataclass

import numpy as np
import torch

from pdserve.common.model_source import ModelSource
from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.batch import DeviceFeed
from pdserve.engine.dtypes import torch_dtype
from pdserve.common.kv_compat import rank_agent_name
from pdserve.engine.kv_connector import LayerSender
from pdserve.engine.kv_connector.rank_side import RankKVEndpoint
from pdserve.engine.layers import Communicator, LayerContext, SingleRank, prepare_weights
from pdserve.engine.layers.moe import FusedMoE
from pdserve.engine.lora import AdapterSlots, load_peft_adapter
from pdserve.engine.model_runner import ModelRunner, RunnerConfig, graph_batch_sizes
from pdserve.engine.models.loader import load_model
from pdserve.engine.models.model_config import ModelConfig
from pdserve.engine.models.registry import check_quantization
from pdserve.engine.plan import KVSendOrder, NewRequest, StepPlan
from pdserve.engine.quant import linear_methods
from pdserve.engine.platforms import get_platform
from pdserve.engine.sampler import PendingSample, SampleResult, Sampler

if TYPE_CHECKING:
    from pdserve.engine.executor.replica_group import ReplicaGroup
    from pdserve.engine.graphs import DecodeGraphs


@dataclass(frozen=True)
class RankConfig:
    """What one rank needs to build itself (derived once from ``EngineConfig``)."""
    device_type: str
    dtype: str
    block_size: int
    max_batch_size: int
    graphs: bool  # capture decode graphs where the platform has them
    compiled_cpu_kernels: bool
    seed: int
    tp_rank: int = 0
    tp_size: int = 1
    ep_size: int = 1  # 1, tp_size, or tp_size x dp_size: the ranks split the experts of MoE layers
    # dp_size > 1: replica dp_rank of dp_size sharing the MoE layers; their group meets on dp_port
    dp_rank: int = 0
    dp_size: int = 1
    dp_port: int = 0
    expert_all_to_all_tokens: int = 256  # EngineConfig's: where shared MoE layers switch to all-to-all
    ready_timeout: float = 600.0  # seconds the replicas may take to be ready together
    max_step_tokens: int = 2048  # the most tokens one step computes (the scheduler's max_prefill_tokens)
    enable_lora: bool = False
    max_loras: int = 4
    max_lora_rank: int = 64
    lora_targets: tuple[str, ...] | None = None  # the modules whose layers LoRA wraps; None: every linear layer
    samples: bool = True  # the rank that samples (rank 0); the others only run the forward
    collectives: str = "gloo"  # the torch.distributed backend between tp ranks ("gloo" | "nccl")
    device_index: int = 0  # which device of its type this rank runs on


@dataclass(eq=False)
class RankRequest:
    """A request as a rank knows it: enough to build its rows and to sample for it."""
    req_id: str
    params: SamplingParams
    num_prompt_tokens: int
    token_ids: list[int]
    block_ids: list[int]
    generator: torch.Generator | None = None
    kv_send: KVSendOrder | None = None
    adapter: str | None = None


class RankWorker:
    def __init__(self, config: RankConfig, source: ModelSource, model_config: ModelConfig,
                 comm: Communicator | None = None, replicas: ReplicaGroup | None = None):
        self.config = config
        self.model_config = model_config
        self.platform = get_platform(config.device_type)
        self.device = self.platform.device(config.device_index)
        self.replicas = replicas
        shared = dict(ep_rank=replicas.expert_rank, ep_comm=replicas.comm, replicas=replicas.size,
                      all_to_all_tokens=config.expert_all_to_all_tokens) if replicas else {}
        ctx = LayerContext(dtype=torch_dtype(config.dtype), tp_rank=config.tp_rank, tp_size=config.tp_size,
                           comm=comm or SingleRank(), quantization=linear_methods.for_checkpoint(model_config.quantization),
                           ep_size=config.ep_size, **shared)
        self.model = load_model(source, model_config, ctx, self.device, config.seed)
        self.backend = self.platform.backend(config.compiled_cpu_kernels)
        prepare_weights(self.model, self.backend)
        self.lora = self._adapter_slots(ctx.dtype) if config.enable_lora else None
        self.model.fuse_layers(self.backend)  # NOTE: after the adapters wrap their layers
        self.kv_heads = self.model.kv_heads_per_rank()
        self.kv_cache: torch.Tensor | None = None
        self.runner: ModelRunner | None = None
        self.sampler = Sampler(torch.Generator(device=self.device).manual_seed(config.seed), self.platform.new_event,
                               model_config.eos_token_ids)
        self.requests: dict[str, RankRequest] = {}
        self.layer_sender: LayerSender | None = None
        self._last_sampled: torch.Tensor | None = None

    @property
    def graphs(self) -> DecodeGraphs | None:
        """The captured decode graphs; None before ``allocate`` or without graphs."""
        return self.runner.graphs if self.runner is not None else None

    # ---- sizing and allocation -------------------------------------------------------
    def block_bytes(self) -> int:
        m = self.model_config
        item = torch.empty((), dtype=torch_dtype(self.config.dtype)).element_size()
        return m.num_layers * 2 * self.config.block_size * self.kv_heads * m.head_dim * item

    def blocks_that_fit(self, memory_fraction: float) -> int:
        """KV blocks that ``memory_fraction`` of the device's free memory holds."""
        free, _ = self.platform.memory_info(self.device)
        return int(free * memory_fraction) // self.block_bytes()

    @property
    def cache_tokens_per_seq(self) -> int:
        return self.platform.cache_tokens_per_seq

    def allocate(self, num_blocks: int, max_model_len: int) -> None:
        """Allocate the KV-cache shard, wire the runner and capture its graphs."""
        m, c = self.model_config, self.config
        shape = (m.num_layers, num_blocks, 2, c.block_size, self.kv_heads, m.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=torch_dtype(c.dtype), device=self.device)
        graphs = self.platform.supports_graphs and c.graphs
        runner_cfg = RunnerConfig(c.block_size, max_model_len, graph_batch_sizes(c.max_batch_size) if graphs else ())
        self.runner = ModelRunner(self.model, self.kv_cache, self.backend, self.platform, self.device, runner_cfg)
        self.runner.capture_graphs(self.lora.capturing if self.lora is not None else None)
        if self.replicas is not None:
            self.replicas.wait_for_all(c.ready_timeout)

    def _adapter_slots(self, dtype: torch.dtype) -> AdapterSlots:
        """LoRA slots (every linear layer wrapped now, before the graphs are captured) with room
        in their per-token buffers for the longest step and the largest captured batch."""
        c = self.config
        max_tokens = max(c.max_step_tokens, graph_batch_sizes(c.max_batch_size)[-1])
        targets = frozenset(c.lora_targets) if c.lora_targets is not None else None
        return AdapterSlots(self.model, c.max_loras, c.max_lora_rank, self.device, dtype, max_tokens,
                            pin_memory=self.platform.pin_memory and self.device.type != "cpu", targets=targets)

    # ---- steps -------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> PendingSample | None:
        """Run the plan's forward and queue sampling for its sampling rows (None if none sample)."""
        if self.replicas is not None:
            self.replicas.sync(sum(len(row.token_ids) for row in plan.rows))
        self._apply(plan)
        for slot, name in plan.adapter_swaps:
            self.lora.activate(slot, name)
        reqs = [self.requests[r.req_id] for r in plan.rows]
        for row, req in zip(plan.rows, reqs):
            req.token_ids.extend(row.token_ids)
            req.block_ids.extend(row.new_block_ids)
        tables = [r.block_ids for r in reqs]
        if self.lora is not None:
            self.lora.set_rows([self.lora.slot(r.adapter) for r in reqs], [row.num_new for row in plan.rows])
        hook = None
        if self.layer_sender is not None:
            hook = self.layer_sender.begin_step(plan.rows, tables, [r.kv_send for r in reqs])
        adapters = self.lora is not None and self.lora.active
        logits = self.runner.execute(plan.rows, tables, hook, self._feed(plan), adapters)
        sampled = [req for row, req in zip(plan.rows, reqs) if row.samples]
        if not sampled or not self.config.samples:
            return None
        pending = self.sampler.launch(logits, sampled)
        self._last_sampled = pending.tokens
        return pending

    @torch.inference_mode()
    def idle_step(self) -> bool:
        """A step with nothing of this replica's to run: when another replica runs one, join its
        MoE layers (their experts here serve its tokens). Returns whether any replica ran one."""
        if self.replicas is None or not self.replicas.sync(0):
            return False
        for layer in self.model.modules():
            if isinstance(layer, FusedMoE):
                layer.join_without_tokens(self.backend)
        return True

    def collect(self, pending: PendingSample) -> SampleResult:
        return self.sampler.collect(pending)

    def attach_layer_sender(self, sender: LayerSender | None) -> None:
        self.layer_sender = sender

    def open_kv_endpoint(self, worker_name: str, model: str) -> RankKVEndpoint:
        """Register this rank's KV shard with a transfer agent; the endpoint sends its KV."""
        from pdserve.engine.kv_transfer import NixlKVTransferAgent

        c = self.config
        agent = NixlKVTransferAgent(rank_agent_name(worker_name, c.tp_rank), self.kv_cache, model, tp_size=c.tp_size,
                                    tp_rank=c.tp_rank, total_kv_heads=self.model_config.num_kv_heads,
                                    quantization=check_quantization(self.model_config))
        endpoint = RankKVEndpoint(agent)
        self.attach_layer_sender(endpoint)
        return endpoint

    def load_adapter(self, name: str, path: str) -> str:
        """Register a LoRA adapter (host memory; plans put it in a device slot when needed);
        "" or why it was refused (nothing changed then)."""
        if self.lora is None:
            return "LoRA is not enabled on this engine (start it with enable_lora or adapters)"
        try:
            self.lora.register(load_peft_adapter(name, path, self.config.max_lora_rank))
        except ValueError as exc:
            return str(exc)
        return ""

    def unload_adapter(self, name: str) -> None:
        if self.lora is not None and name in self.lora.names:
            self.lora.unload(name)

    def forget_all(self) -> None:
        """After a failed step: no request of it is known any more."""
        self.requests.clear()
        self._last_sampled = None

    def synchronize(self) -> None:
        self.platform.synchronize(self.device)

    def _apply(self, plan: StepPlan) -> None:
        for rid in plan.finished:
            self.requests.pop(rid, None)
        for new in plan.new_requests:
            self.requests[new.req_id] = self._new_request(new)

    def _new_request(self, new: NewRequest) -> RankRequest:
        gen = None
        if new.params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(new.params.seed)
            for _ in range(new.draws_done):  # NOTE: the same noise stream as when served by one engine
                torch.empty(self.model_config.vocab_size, device=self.device).exponential_(generator=gen)
        return RankRequest(new.req_id, new.params, new.num_prompt_tokens, list(new.prefix_token_ids),
                           list(new.block_ids), gen, new.kv_send, new.adapter)

    def _feed(self, plan: StepPlan) -> DeviceFeed | None:
        if not plan.feed_dst or self._last_sampled is None:
            return None
        return DeviceFeed(self._last_sampled, np.array(plan.feed_dst, np.int64), np.array(plan.feed_src, np.int64))


__all__ = ["RankConfig", "RankRequest", "RankWorker"]
