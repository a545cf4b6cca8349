"""``fused_moe`` (both paths: pairs for decode, grouped for prefill) against
``reference.fused_moe_ref`` on float64-upcast inputs, and the reference against a naive
per-token loop."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pdserve.kernels import moe
from pdserve.kernels.moe import MoeConfig, PairsConfig, align_pairs, default_config, fused_moe, use_pairs_path
from pdserve.kernels.reference import fused_moe_ref
from .conftest import HAS_CUDA
from .pairwise import pairwise_params

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
I32, I64 = torch.int32, torch.int64
# (T, E, K, H, I, id dtype): T=0, T=1, K 1..8, E 4..128 (most experts idle), H/I off the block sizes.
CASES = [
    (0, 4, 2, 64, 48, I64),
    (1, 8, 1, 64, 48, I32),
    (1, 128, 8, 40, 24, I64),
    (5, 4, 2, 40, 24, I32),
    (7, 16, 8, 64, 48, I64),
    (40, 8, 2, 64, 48, I32),
    (12, 128, 4, 40, 24, I32),
    (3, 64, 6, 72, 40, I64),
]
# The pairs path (T*K <= 64): T=1 with K=1 and K=8, up to 64 pairs, odd H and I, pairs sharing experts.
PAIRS_CASES = [
    (1, 8, 1, 64, 48, I32),
    (1, 128, 8, 37, 19, I64),
    (1, 16, 8, 72, 40, I32),
    (2, 64, 6, 40, 24, I64),
    (5, 16, 3, 33, 21, I32),
    (8, 128, 8, 40, 24, I64),
    (4, 4, 2, 24, 56, I32),  # 8 pairs on 4 experts: every expert shared (forced; the default is grouped)
]
# A small launch shape: several column steps and tiles, ragged last ones.
SMALL_PAIRS = PairsConfig(block_n=8, block_k=16, down_block_h=8, down_block_k=16)


def _case_id(value: object) -> str:
    if value is None:
        return "default"
    if value is SMALL_PAIRS:
        return "small"
    return "-".join(map(str, value)) if isinstance(value, tuple) else str(value)


def make_moe(tokens: int, experts: int, top_k: int, hidden: int, inter: int, dtype: torch.dtype,
             device: torch.device, ids_dtype: torch.dtype = torch.int64, used_experts: int | None = None
             ) -> tuple[torch.Tensor, ...]:
    """Inputs of unit scale; each token gets top_k distinct experts among the first used_experts."""
    # A strided row view: the kernels must honour x's row stride.
    x = torch.randn(tokens, hidden + 8, dtype=dtype, device=device)[:, 8:]
    w13 = (torch.randn(experts, 2 * inter, hidden, device=device) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device=device) / inter ** 0.5).to(dtype)
    used = used_experts or experts
    ids = torch.rand(tokens, used, device=device).argsort(dim=1)[:, :top_k].to(ids_dtype)
    weights = torch.softmax(torch.randn(tokens, top_k, device=device), dim=-1)
    return x, w13, w2, weights, ids


def ref64(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
          ids: torch.Tensor) -> torch.Tensor:
    return fused_moe_ref(x.double(), w13.double(), w2.double(), weights, ids)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,experts,top_k,hidden,inter,ids_dtype", CASES, ids=str)
def test_fused_moe(tokens: int, experts: int, top_k: int, hidden: int, inter: int, ids_dtype: torch.dtype,
                   dtype: torch.dtype, device: torch.device, check_close) -> None:
    x, w13, w2, weights, ids = make_moe(tokens, experts, top_k, hidden, inter, dtype, device, ids_dtype)
    out = torch.full((tokens, hidden), float("nan"), dtype=dtype, device=device)
    got = fused_moe(x, w13, w2, weights, ids, out=out)
    assert got.data_ptr() == out.data_ptr() and got.shape == (tokens, hidden)
    if tokens:
        check_close(got, ref64(x, w13, w2, weights, ids), dtype)


@pytest.mark.parametrize("case,config,dtype", pairwise_params((PAIRS_CASES, [None, SMALL_PAIRS], DTYPES),
                                                               full=HAS_CUDA), ids=_case_id)
def test_fused_moe_pairs(case: tuple, config: PairsConfig | None, dtype: torch.dtype, device: torch.device,
                         check_close) -> None:
    """The pairs path into a poisoned out= buffer; routing tensors column-major (strided)."""
    tokens, experts, top_k, hidden, inter, ids_dtype = case
    x, w13, w2, weights, ids = make_moe(tokens, experts, top_k, hidden, inter, dtype, device, ids_dtype)
    ids, weights = ids.t().contiguous().t(), weights.t().contiguous().t()
    if config is None:
        config = moe.default_pairs_config(x)
        assert use_pairs_path(ids.numel(), experts) == (experts >= ids.numel())
    out = torch.full((tokens, hidden), float("nan"), dtype=dtype, device=device)
    got = fused_moe(x, w13, w2, weights, ids, out=out, config=config)
    assert got.data_ptr() == out.data_ptr()
    check_close(got, ref64(x, w13, w2, weights, ids), dtype)


@pytest.mark.parametrize("top_k", [1, 2])
def test_fused_moe_grouped_strided_routing(top_k: int, device: torch.device, check_close) -> None:
    """The grouped path on routing tensors that are strided views (K=1 of a wider slice reshapes to a
    strided view, not a copy)."""
    x, w13, w2, weights, ids = make_moe(5, 8, top_k, 40, 24, torch.float32, device)
    wide = torch.stack([ids, ids + 1], dim=-1)[..., 0]  # [T, K] view with strides (2K, 2)
    assert not wide.is_contiguous()
    got = fused_moe(x, w13, w2, weights, wide, config=default_config(x, ids.numel(), 8))
    check_close(got, ref64(x, w13, w2, weights, ids), torch.float32)


def test_fused_moe_path_choice(device: torch.device, monkeypatch: pytest.MonkeyPatch, check_close) -> None:
    """Up to 64 pairs (and no more than E) skip the alignment; more pairs align."""
    assert use_pairs_path(1, 8) and use_pairs_path(64, 128) and use_pairs_path(8, 8)
    assert not use_pairs_path(65, 128) and not use_pairs_path(9, 8)
    calls = []
    monkeypatch.setattr(moe, "align_pairs", lambda *a: calls.append(a) or align_pairs(*a))
    for tokens, expect_align in [(1, False), (8, False), (9, True)]:
        x, w13, w2, weights, ids = make_moe(tokens, 128, 8, 32, 16, torch.float32, device)
        check_close(fused_moe(x, w13, w2, weights, ids), ref64(x, w13, w2, weights, ids), torch.float32)
        assert bool(calls) == expect_align, tokens
        calls.clear()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_moe_idle_experts(dtype: torch.dtype, device: torch.device, check_close) -> None:
    """Every token routed among the first 3 of 32 experts: most blocks and experts are idle."""
    x, w13, w2, weights, ids = make_moe(9, 32, 2, 64, 48, dtype, device, used_experts=3)
    ids = torch.where(ids == 1, 30, ids)  # an idle gap below a used expert
    got = fused_moe(x, w13, w2, weights, ids)
    assert got.dtype == dtype
    check_close(got, ref64(x, w13, w2, weights, ids), dtype)


@pytest.mark.parametrize("wide_partials", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_moe_prefill_blocks(dtype: torch.dtype, wide_partials: bool, device: torch.device,
                                  check_close) -> None:
    """A prefill launch shape: 64-row blocks, several for one expert, grouped launch order (the
    last group of row blocks partial); the pairs' partial sums in float32 or in x's dtype."""
    x, w13, w2, weights, ids = make_moe(70, 4, 2, 72, 40, dtype, device, used_experts=3)
    cfg = MoeConfig(block_m=64, block_n=32, block_k=32, group_m=4, num_warps=4, num_stages=1,
                    wide_partials=wide_partials)
    got = fused_moe(x, w13, w2, weights, ids, config=cfg)
    check_close(got, ref64(x, w13, w2, weights, ids), dtype)
    if dtype == torch.float32:  # x's dtype is float32: the same partials either way
        assert torch.equal(got, fused_moe(x, w13, w2, weights, ids, config=replace(cfg, wide_partials=True)))


@pytest.mark.parametrize("tokens,block_m", [(2, 16), (23, 16), (23, 64), (3000, 16)])
def test_align_pairs(tokens: int, block_m: int, device: torch.device) -> None:
    """One program (<= 64 pairs), several, and several of more than 64 pairs each."""
    experts, top_k = 10, 3
    _, _, _, _, ids = make_moe(tokens, experts, top_k, 8, 8, torch.float32, device, used_experts=7)
    sorted_ids, block_experts, num_padded = (t.cpu() for t in align_pairs(ids, experts, block_m))
    pairs = ids.numel()
    counts = torch.bincount(ids.reshape(-1).cpu(), minlength=experts)
    padded = ((counts + block_m - 1) // block_m * block_m).sum().item()
    assert num_padded.tolist() == [padded]
    assert sorted_ids.numel() >= padded and sorted_ids.numel() % block_m == 0
    assert block_experts.numel() == sorted_ids.numel() // block_m
    flat_ids = ids.reshape(-1).cpu().long()
    valid = sorted_ids[sorted_ids < pairs].long()
    assert torch.equal(valid, torch.argsort(flat_ids, stable=True)), "every pair once, stably sorted by expert"
    assert (sorted_ids[sorted_ids >= pairs] == pairs).all() and (sorted_ids[padded:] == pairs).all()
    block_of_row = torch.arange(padded) // block_m
    rows = sorted_ids[:padded]
    assert (block_experts[padded // block_m:] == experts).all()
    assert (flat_ids[rows[rows < pairs].long()] == block_experts[block_of_row[rows < pairs]]).all()
    assert (rows.view(-1, block_m) < pairs).any(dim=1).all(), "no block of padding only"


def test_fused_moe_rejects_bad_inputs(device: torch.device) -> None:
    x, w13, w2, weights, ids = make_moe(3, 4, 2, 16, 8, torch.float32, device)
    with pytest.raises(ValueError, match="out must be"):
        fused_moe(x, w13, w2, weights, ids, out=torch.empty(3, 16, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="out must be"):
        fused_moe(x, w13, w2, weights, ids, out=torch.empty(4, 16, device=device))
    with pytest.raises(ValueError, match="do not match"):
        fused_moe(x, w13, w2[:, :, :4], weights, ids)
    with pytest.raises(ValueError, match="topk_ids"):
        fused_moe(x, w13, w2, weights, ids[:2])
    with pytest.raises(ValueError, match="int32 or int64"):
        fused_moe(x, w13, w2, weights, ids.float())
    with pytest.raises(ValueError, match="share a dtype"):
        fused_moe(x, w13.half(), w2, weights, ids)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        fused_moe(x.double(), w13.double(), w2.double(), weights, ids)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_fused_moe_ref_matches_naive_loop(dtype: torch.dtype, device: torch.device) -> None:
    x, w13, w2, weights, ids = make_moe(6, 5, 3, 16, 12, dtype, device)
    compute = torch.promote_types(dtype, torch.float32)
    inter = w13.shape[1] // 2
    naive = torch.zeros(6, 16, dtype=compute, device=device)
    for t in range(6):
        for k in range(3):
            e = int(ids[t, k])
            gate = x[t].to(compute) @ w13[e, :inter].to(compute).T
            up = x[t].to(compute) @ w13[e, inter:].to(compute).T
            act = (gate * torch.sigmoid(gate) * up).to(dtype).to(compute)
            naive[t] += weights[t, k].to(compute) * (act @ w2[e].to(compute).T)
    torch.testing.assert_close(fused_moe_ref(x, w13, w2, weights, ids), naive.to(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 2, 7, 8, 9, 256, 2048])
def test_fused_moe_large(tokens: int, dtype: torch.dtype, device: torch.device, check_close) -> None:
    """A Qwen3-30B-A3B-like layer: E=128, K=8, H=2048, I=768 (pairs path up to T=8, then grouped
    decode and prefill launch shapes)."""
    x, w13, w2, weights, ids = make_moe(tokens, 128, 8, 2048, 768, dtype, device, torch.int32)
    check_close(fused_moe(x, w13, w2, weights, ids), ref64(x, w13, w2, weights, ids), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["pairs", "grouped"])
@pytest.mark.parametrize("tokens,experts,top_k", [(1, 128, 8), (8, 128, 8), (16, 8, 2), (3, 128, 1)])
def test_fused_moe_large_both_paths(tokens: int, experts: int, top_k: int, path: str, dtype: torch.dtype,
                                    device: torch.device, check_close) -> None:
    """Each path forced at decode sizes of the real layer (H=2048, I=768), int64 ids, experts shared."""
    x, w13, w2, weights, ids = make_moe(tokens, experts, top_k, 2048, 768, dtype, device, torch.int64)
    pairs = tokens * top_k
    config = moe.default_pairs_config(x) if path == "pairs" else default_config(x, pairs, experts)
    out = torch.full((tokens, 2048), float("nan"), dtype=dtype, device=device)
    fused_moe(x, w13, w2, weights, ids, out=out, config=config)
    check_close(out, ref64(x, w13, w2, weights, ids), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,pdl", [(1, None), (16, None), (40, None), (1, False), (4, True)], ids=str)
def test_fused_moe_no_host_sync_and_graph_capture(tokens: int, pdl: bool | None, device: torch.device,
                                                  check_close) -> None:
    """The whole call is capturable: no host sync, and a replay with new routing is right (pairs
    path at 4, 16 and 64 pairs, with and without PDL; grouped at 160). Two chained calls, the second
    reading the first's output, as layers do."""
    assert use_pairs_path(tokens * 4, 64) == (tokens <= 16)
    x, w13, w2, weights, ids = make_moe(tokens, 64, 4, 256, 128, torch.bfloat16, device, torch.int32)
    config = None
    if pdl is not None:
        if pdl and torch.cuda.get_device_capability(device)[0] < 9:
            pytest.skip("PDL needs Hopper or newer")
        config = replace(moe.default_pairs_config(x), pdl=pdl)
    out, out2 = torch.empty_like(x), torch.empty_like(x)

    def layers() -> None:
        fused_moe(x, w13, w2, weights, ids, out=out, config=config)
        fused_moe(out, w13, w2, weights, ids, out=out2, config=config)

    layers()  # compile outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layers()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layers()
    _, _, _, new_weights, new_ids = make_moe(tokens, 64, 4, 256, 128, torch.bfloat16, device, torch.int32)
    weights.copy_(new_weights)
    ids.copy_(new_ids)
    out.fill_(float("nan"))
    out2.fill_(float("nan"))
    graph.replay()
    check_close(out, ref64(x, w13, w2, weights, ids), torch.bfloat16)
    check_close(out2, ref64(out, w13, w2, weights, ids), torch.bfloat16, "second layer")
