"""The layers package: each split kind's weight loader slices a whole tensor for its rank, the
ranks' slices compose back to the whole layer, and two real gloo ranks compute what one rank does."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from pdserve.engine.backends.torch_backend import TorchBackend
from pdserve.engine.layers import (ColumnParallelLinear, LayerContext, MergedColumnParallelLinear, ParallelLMHead,
                                   QKVParallelLinear, RMSNorm, ReplicatedLinear, RowParallelLinear,
                                   VocabParallelEmbedding, init_dummy_weights, load_into)
from pdserve.engine.layers.loading import CheckpointTensor

BE = TorchBackend()


def _ranks(tp: int, build):
    return [build(LayerContext(tp_rank=r, tp_size=tp)) for r in range(tp)]


def test_column_parallel_rows_split_in_rank_order():
    w, b = torch.randn(8, 4), torch.randn(8)
    ranks = _ranks(2, lambda c: ColumnParallelLinear(4, 8, True, c))
    for layer in ranks:
        layer.load_weight("weight", w)
        layer.load_weight("bias", b)
    assert torch.equal(torch.cat([r.weight for r in ranks]), w)
    assert torch.equal(torch.cat([r.bias for r in ranks]), b)
    x = torch.randn(3, 4)
    assert torch.allclose(torch.cat([r(x, BE) for r in ranks], dim=1), x @ w.T + b, atol=1e-6)


def test_row_parallel_columns_split_and_partial_sums_add_up():
    w, b = torch.randn(5, 6), torch.randn(5)
    ranks = _ranks(3, lambda c: RowParallelLinear(6, 5, True, c))
    for layer in ranks:
        layer.load_weight("weight", w)
        layer.load_weight("bias", b)
        assert torch.equal(layer.bias, b)  # added once, after the reduction
    assert torch.equal(torch.cat([r.weight for r in ranks], dim=1), w)
    x = torch.randn(2, 6)
    partial = sum(r.method.apply(r, x[:, 2 * i:2 * i + 2], BE, None) for i, r in enumerate(ranks))
    assert torch.allclose(partial + b, x @ w.T + b, atol=1e-5)


def test_merged_column_parallel_splits_each_part_on_its_own():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    ranks = _ranks(2, lambda c: MergedColumnParallelLinear(4, [6, 6], False, c))
    for layer in ranks:
        layer.load_weight("weight", gate, 0)
        layer.load_weight("weight", up, 1)
    for r, layer in enumerate(ranks):
        assert torch.equal(layer.weight[:3], gate[3 * r:3 * r + 3])
        assert torch.equal(layer.weight[3:], up[3 * r:3 * r + 3])


@pytest.mark.parametrize("kv_heads,tp", [(4, 2), (2, 4), (1, 2)])
def test_qkv_splits_heads_and_replicates_kv_heads_when_fewer_than_ranks(kv_heads, tp):
    heads, d, hidden = 8, 2, 6
    q, k, v = torch.randn(heads * d, hidden), torch.randn(kv_heads * d, hidden), torch.randn(kv_heads * d, hidden)
    ranks = _ranks(tp, lambda c: QKVParallelLinear(hidden, d, heads, kv_heads, False, c))
    for layer in ranks:
        for part, t in (("q", q), ("k", k), ("v", v)):
            layer.load_weight("weight", t, part)
    per_q, per_kv = heads // tp, max(1, kv_heads // tp)
    assert all(layer.num_heads == per_q and layer.num_kv_heads == per_kv for layer in ranks)
    assert torch.equal(torch.cat([r.weight[:per_q * d] for r in ranks]), q)
    for r, layer in enumerate(ranks):
        kv_head = r * per_kv if kv_heads >= tp else r // (tp // kv_heads)
        k_rows = layer.weight[per_q * d:(per_q + per_kv) * d]
        assert torch.equal(k_rows, k[kv_head * d:(kv_head + per_kv) * d])
        assert torch.equal(layer.weight[(per_q + per_kv) * d:], v[kv_head * d:(kv_head + per_kv) * d])


def test_qkv_refuses_kv_heads_that_neither_split_nor_replicate():
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        QKVParallelLinear(8, 2, 6, 3, False, LayerContext(tp_rank=0, tp_size=2))
    with pytest.raises(ValueError, match="attention heads=6 cannot be split evenly over tp=4"):
        QKVParallelLinear(8, 2, 6, 4, False, LayerContext(tp_rank=0, tp_size=4))


def test_vocab_parallel_embedding_pads_the_last_rank():
    table = torch.randn(11, 4)
    ranks = _ranks(3, lambda c: VocabParallelEmbedding(11, 4, c))
    for layer in ranks:
        layer.load_weight("weight", table)
    assert [(r.start, r.end) for r in ranks] == [(0, 4), (4, 8), (8, 11)]
    assert torch.equal(ranks[2].weight[3], torch.zeros(4))
    assert torch.equal(torch.cat([r.weight for r in ranks])[:11], table)


def test_shape_mismatch_and_unknown_parts_are_clear_errors():
    layer = ColumnParallelLinear(4, 8, False, LayerContext())
    with pytest.raises(ValueError, match=r"shape \(8, 5\), expected \(8, 4\)"):
        layer.load_weight("weight", torch.randn(8, 5))
    with pytest.raises(ValueError, match="no tensor 'bias'"):
        layer.load_weight("bias", torch.randn(8))
    with pytest.raises(ValueError, match="no tensor"):
        MergedColumnParallelLinear(4, [2, 2], False, LayerContext()).load_weight("weight", torch.randn(2, 4), 2)


def test_load_into_names_the_misplaced_and_the_missing():
    model = torch.nn.ModuleDict({"a": ReplicatedLinear(2, 2, False, LayerContext()),
                                 "n": RMSNorm(2, 1e-6, LayerContext())})
    with pytest.raises(ValueError, match="'x.weight' has no place in Toy"):
        load_into(model, [CheckpointTensor("x.weight", "x", "weight", None, torch.ones(2))], "Toy")
    with pytest.raises(ValueError, match=r"missing 1 tensors, e.g. \['n.weight'\]"):
        load_into(model, [CheckpointTensor("a.weight", "a", "weight", None, torch.ones(2, 2))], "Toy")


def test_dummy_weights_are_the_same_model_at_every_tp():
    def build(ctx):
        return torch.nn.ModuleDict({"col": ColumnParallelLinear(4, 6, True, ctx),
                                    "norm": RMSNorm(4, 1e-6, ctx)})
    whole = build(LayerContext())
    init_dummy_weights(whole, 7, torch.device("cpu"))
    halves = _ranks(2, build)
    for half in halves:
        init_dummy_weights(half, 7, torch.device("cpu"))
    assert torch.equal(torch.cat([h["col"].weight for h in halves]), whole["col"].weight)
    assert torch.equal(halves[1]["norm"].weight, torch.ones(4))


# ---- two real ranks over gloo ---------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlp_and_head(ctx: LayerContext, gate_up, down, table, x, ids):
    up = MergedColumnParallelLinear(8, [12, 12], False, ctx)
    up.load_weight("weight", gate_up[:12], 0)
    up.load_weight("weight", gate_up[12:], 1)
    dn = RowParallelLinear(12, 8, False, ctx)
    dn.load_weight("weight", down)
    emb = VocabParallelEmbedding(10, 8, ctx)
    emb.load_weight("weight", table)
    head = ParallelLMHead(10, 8, ctx)
    head.load_weight("weight", table)
    h = dn(BE.silu_and_mul(up(x, BE)), BE)
    return h, emb(ids), head.logits(h, BE)


def _rank_main(rank: int, port: int, tensors, out_dir: str) -> None:
    import torch.distributed as dist

    from pdserve.engine.executor.collectives import ProcessGroupComm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ctx = LayerContext(tp_rank=rank, tp_size=2, comm=ProcessGroupComm())
        torch.save(_mlp_and_head(ctx, *tensors), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_compute_what_one_rank_does(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = (torch.randn(24, 8, generator=gen), torch.randn(8, 12, generator=gen),
               torch.randn(10, 8, generator=gen), torch.randn(3, 8, generator=gen), torch.tensor([0, 4, 9]))
    expected = _mlp_and_head(LayerContext(), *tensors)
    mp.start_processes(_rank_main, args=(_free_port(), tensors, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for a, b in zip(got, expected):
            assert torch.allclose(a, b, atol=1e-5), (rank, (a - b).abs().max())


def test_a_checkpoint_slice_reads_only_what_the_rank_keeps(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from pdserve.engine.layers.loading import CheckpointSlice

    whole = torch.randn(6, 8)
    save_file({"w": whole}, str(tmp_path / "m.safetensors"))
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as fh:
        part = CheckpointSlice(fh.get_slice("w")).narrow(0, 2, 3).narrow(1, 4, 4)
        assert part.shape == (3, 4) and torch.equal(part.read(), whole[2:5, 4:8])
        ranks = _ranks(2, lambda c: RowParallelLinear(8, 6, False, c))
        for layer in ranks:
            layer.load_weight("weight", CheckpointSlice(fh.get_slice("w")))
    assert torch.equal(torch.cat([r.weight for r in ranks], dim=1), whole)
