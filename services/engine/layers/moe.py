"""The experts of one sparse (mixture-of-experts) MLP, and how tokens are routed to them.

Owns: ``FusedMoE``, the experts' weights stacked per layer (``w13 [E, 2I, H]``: each
expert's gate rows then its up rows; ``w2 [E, H, I]``), their loaders (one checkpoint
tensor per expert and projection, sliced for this rank), and the routing of the router's
logits to them (the backend's ``route``: softmax in float32, top-k, renormalised where
the model says so). With tp each rank holds every expert's slice of the intermediate
size ``I``: gate_up is column-split, down row-split, and the partial sums are
all-reduced, as a dense MLP's are. With ep (= tp) each rank holds whole experts, a
``E / ep`` share; every rank has every token (attention's output is all-reduced),
so each computes the (token, expert) pairs of its own experts and the all-reduce
combines them. With ep across dp replicas (ep = dp x tp) each replica has only its
own tokens, and a layer exchanges them in one of two ways, chosen by the step's
largest replica (every rank learns all replicas' counts first, so all choose alike):
below ``all_to_all_tokens`` it gathers every replica's tokens and routing (padded to
the longest; with tp > 1 each replica's from its first rank, its other ranks holding
the same), computes its experts' pairs among all of them, sums every rank's outputs
and keeps its replica's rows; from there on (prefill) each token travels all-to-all
only to the ranks that own one of its experts (with tp > 1 a replica's tokens are
dealt out over its ranks) and comes back as one partial sum per rank (measured by
``pdserve.bench.moe_comm``: 1.2-1.5x faster from 256 tokens on gloo). A replica with
no tokens this step still joins (``join_without_tokens``), since the others need its
experts. The grouped expert computation is the backend's ``fused_moe`` (Triton on CUDA,
the torch reference elsewhere).

Lifecycle: built from a ``LayerContext``; weights loaded once, then ``prepare_weights``
(the backend's packing, e.g. per expert on the CPU); then only ``forward``
(every replica calls it for every MoE layer of a step, in layer order).
"""
from __future__ import annotations

import torch
from torch import nn

from pdserve.engine.backends.base import Backend
from pdserve.engine.layers.context import LayerContext, divide
from pdserve.engine.layers.loading import CheckpointSlice, Shard, WeightSpec, read


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool,
                 ctx: LayerContext):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok={top_k} must be in [1, num_experts={num_experts}]")
        self.ctx = ctx
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        ep = ctx.ep_size
        if ep > 1 and num_experts % ep:
            raise ValueError(f"ep={ep} must divide the number of experts ({num_experts})")
        self.local_experts = num_experts // ep
        self.first_expert = ctx.expert_rank * self.local_experts if ep > 1 else 0
        self.inter = intermediate_size if ep > 1 else divide(intermediate_size, ctx.tp_size,
                                                             "expert intermediate size")
        self.w13 = nn.Parameter(torch.empty(self.local_experts, 2 * self.inter, hidden_size, dtype=ctx.dtype),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(self.local_experts, hidden_size, self.inter, dtype=ctx.dtype),
                               requires_grad=False)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor, be: Backend) -> torch.Tensor:
        weights, ids = be.route(router_logits, self.top_k, self.renormalize)
        if self.ctx.experts_span_replicas:
            return self._across_replicas(x, weights, ids, be)
        if self.ctx.ep_size > 1:
            out = self._own_experts(x, weights, ids, be)
        else:
            out = be.fused_moe(x, self.w13, self.w2, weights, ids)
        return self.ctx.comm.all_reduce(out) if self.ctx.tp_size > 1 else out

    def prepare_weights(self, be: Backend) -> None:
        """Once, after loading: the experts in the form the backend's ``fused_moe`` reads fastest."""
        self.w13 = nn.Parameter(be.prepare_expert_weights(self.w13.data), requires_grad=False)
        self.w2 = nn.Parameter(be.prepare_expert_weights(self.w2.data), requires_grad=False)

    def join_without_tokens(self, be: Backend) -> None:
        """This replica has no tokens this step: compute its experts' share of the others'."""
        empty = torch.empty(0, self.hidden_size, dtype=self.ctx.dtype, device=self.w13.device)
        self.forward(empty, torch.empty(0, self.num_experts, dtype=empty.dtype, device=empty.device), be)

    def _across_replicas(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                         be: Backend) -> torch.Tensor:
        """Every replica's tokens through this rank's experts; this replica's rows of the sum.

        NOTE: the token counts are read on the host; expert parallelism across replicas runs on
        CPU ranks for now."""
        comm, tp = self.ctx.expert_comm, self.ctx.tp_size
        counts = comm.all_gather(torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device), 0).tolist()
        longest = max(counts)
        if longest == 0:
            return x
        if longest >= self.ctx.all_to_all_tokens:
            return self._all_to_all(x, weights, ids, be)
        pad = longest - x.shape[0]

        def gathered(t: torch.Tensor, value: float = 0.0) -> torch.Tensor:
            """Every replica's rows (from each one's first rank), [replicas * longest, ...]."""
            every = comm.all_gather(nn.functional.pad(t, (0, 0, 0, pad), value=value), 0)
            return every.view(-1, longest, *t.shape[1:])[::tp].reshape(-1, *t.shape[1:])
        # padding rows route to expert E, which no rank holds: they get no pairs
        ids_all = gathered(ids, value=self.num_experts)
        out = comm.all_reduce(self._own_experts(gathered(x), gathered(weights), ids_all, be))
        mine = self.ctx.expert_rank // tp * longest
        return out[mine:mine + x.shape[0]]

    def _all_to_all(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, be: Backend) -> torch.Tensor:
        """This replica's rows of the sum over every rank's experts, each token sent (with its
        routing) only to the ranks owning one of its experts and answered with their partial sums.

        NOTE: the counts are read on the host; expert parallelism across replicas runs on CPU ranks."""
        comm, tp = self.ctx.expert_comm, self.ctx.tp_size
        rows = torch.arange(x.shape[0], device=x.device)
        if tp > 1:  # the replica's tp ranks hold the same tokens: each sends every tp-th one
            rows = rows[rows % tp == self.ctx.tp_rank]
        owners = torch.zeros(rows.shape[0], self.ctx.ep_size, dtype=torch.bool, device=x.device)
        owners.scatter_(1, ids[rows] // self.local_experts, True)
        dest, pick = owners.t().nonzero(as_tuple=True)  # grouped by destination rank
        token = rows[pick]
        send = torch.bincount(dest, minlength=self.ctx.ep_size).tolist()
        got_x, recv = comm.all_to_all(x[token], send)
        # the routing travels as float32: expert ids are exact there (< 2^24)
        got_route, _ = comm.all_to_all(torch.cat([weights[token], ids[token].to(torch.float32)], dim=1), send, recv)
        k = ids.shape[1]
        partial = self._own_experts(got_x, got_route[:, :k], got_route[:, k:].to(torch.int64), be)
        back, _ = comm.all_to_all(partial, recv, send)
        out = torch.zeros_like(x).index_add_(0, token, back)
        return self.ctx.comm.all_reduce(out) if tp > 1 else out

    def _own_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, be: Backend) -> torch.Tensor:
        """This rank's experts' share: its (token, expert) pairs, one pair per row.

        NOTE: ``nonzero`` waits for the device; expert parallelism runs on CPU ranks for now."""
        local = ids - self.first_expert
        token, k = ((local >= 0) & (local < self.local_experts)).nonzero(as_tuple=True)
        out = torch.zeros_like(x)
        if token.numel():
            part = be.fused_moe(x[token], self.w13, self.w2, weights[token, k][:, None], local[token, k][:, None])
            out.index_add_(0, token, part)
        return out

    # ---- loading ---------------------------------------------------------------------------
    def weight_specs(self) -> tuple[WeightSpec, ...]:
        h, i = self.hidden_size, self.intermediate_size
        specs = []
        for e in range(self.num_experts):
            specs += [WeightSpec("w13", (e, 0), (i, h)), WeightSpec("w13", (e, 1), (i, h)),
                      WeightSpec("w2", (e, None), (h, i))]
        return tuple(specs)

    def load_weight(self, param: str, tensor: "torch.Tensor | CheckpointSlice", shard: Shard = None) -> None:
        """``w13`` part (expert, 0 gate | 1 up) [I, H] or ``w2`` part (expert, None) [H, I]."""
        if param not in ("w13", "w2") or not isinstance(shard, tuple) or not 0 <= shard[0] < self.num_experts:
            raise ValueError(f"FusedMoE has no tensor {param!r} (part {shard!r})")
        expert, part = shard
        h, i = self.hidden_size, self.intermediate_size
        expected = (i, h) if param == "w13" else (h, i)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"shape {tuple(tensor.shape)}, expected {expected}")
        expert -= self.first_expert
        if not 0 <= expert < self.local_experts:
            return  # NOTE: another rank's expert (expert parallelism)
        start = 0 if self.ctx.ep_size > 1 else self.ctx.tp_rank * self.inter
        if param == "w13":
            if part not in (0, 1):
                raise ValueError(f"FusedMoE w13 part {part!r}: expected 0 (gate) or 1 (up)")
            self.w13.data[expert, part * self.inter:(part + 1) * self.inter].copy_(read(tensor.narrow(0, start,
                                                                                                   self.inter)))
        else:
            self.w2.data[expert].copy_(read(tensor.narrow(1, start, self.inter)))


__all__ = ["FusedMoE"]
