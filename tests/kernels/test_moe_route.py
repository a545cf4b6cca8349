"""``moe_route`` (the router's softmax, top-k and renormalisation in one launch) against
``reference.moe_route_ref`` (torch's softmax, topk and division)."""
from __future__ import annotations

import pytest
import torch

from pdserve.kernels.moe_route import MAX_EXPERTS, moe_route
from pdserve.kernels.reference import moe_route_ref

from .conftest import capture_without_sync

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (T, E, K): no tokens, one token, K from 1 to all experts, E off the powers of two (Qwen2-MoE: 60).
CASES = [(0, 8, 2), (1, 8, 2), (1, 128, 8), (5, 60, 4), (33, 8, 8), (7, 129, 3), (3, 4, 1), (2, 6, 6)]


def check_route(logits: torch.Tensor, top_k: int, renormalize: bool) -> None:
    weights, ids = moe_route(logits, top_k, renormalize)
    ref_w, ref_ids = moe_route_ref(logits.cpu(), top_k, renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert weights.shape == ids.shape == (logits.shape[0], top_k)
    assert torch.equal(ids.cpu(), ref_ids), f"experts {ids.cpu().tolist()} != {ref_ids.tolist()}"
    torch.testing.assert_close(weights.cpu(), ref_w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tokens,experts,top_k", CASES, ids=str)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_moe_route_matches_reference(tokens: int, experts: int, top_k: int, renormalize: bool, dtype: torch.dtype,
                                     device: torch.device) -> None:
    # distinct logits, exact in every dtype (with ties the order among equals is each one's own)
    rows = [torch.randperm(experts) for _ in range(tokens)]
    logits = torch.stack(rows) if rows else torch.empty(0, experts)
    logits = ((logits - experts // 2) / 16).to(dtype).to(device)
    check_route(logits, top_k, renormalize)


def test_moe_route_ties_and_infinities(device: torch.device) -> None:
    """Equal logits go to the lower expert id; -inf logits are chosen only when they must be,
    each at most once, with weight 0."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0, -1.0],
                           [float("-inf"), 2.0, float("-inf"), float("-inf"), 1.0, float("-inf")]], device=device)
    weights, ids = moe_route(logits, 4, False)
    assert ids[0].tolist() == [1, 2, 4, 0]
    assert ids[1, :2].tolist() == [1, 4] and len(set(ids[1].tolist())) == 4
    assert weights[1, 2:].tolist() == [0.0, 0.0]
    ref_w, _ = moe_route_ref(logits.cpu(), 4, False)
    torch.testing.assert_close(weights.cpu(), ref_w, rtol=1e-5, atol=1e-7)


def test_moe_route_strided_rows(device: torch.device) -> None:
    """Rows of a wider buffer (row stride > E)."""
    wide = torch.randn(9, 40, device=device)
    check_route(wide[:, 3:35], 4, True)


def test_moe_route_rejects_bad_input(device: torch.device) -> None:
    logits = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="top_k=9 of 8"):
        moe_route(logits, 9, False)
    with pytest.raises(ValueError, match="top_k=0"):
        moe_route(logits, 0, False)
    with pytest.raises(ValueError, match="contiguous last dim"):
        moe_route(logits.t(), 2, False)
    with pytest.raises(ValueError, match="float rows"):
        moe_route(torch.zeros(4, 8, dtype=torch.int32, device=device), 2, False)
    with pytest.raises(ValueError, match=f"at most {MAX_EXPERTS}"):
        moe_route(torch.randn(1, MAX_EXPERTS + 1, device=device), 2, False)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64, 8192])
def test_moe_route_large_and_graph_capture(tokens: int, device: torch.device) -> None:
    """Real sizes (Qwen3-30B-A3B: 128 experts, top-8), captured in a CUDA graph and replayed on
    new logits."""
    logits = torch.randn(tokens, 128, dtype=torch.bfloat16, device=device)
    graph, (weights, ids) = capture_without_sync(lambda: moe_route(logits, 8, True))
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    ref_w, ref_ids = moe_route_ref(logits, 8, True)
    # bf16 logits tie now and then: compare the chosen logits, not the ids, then the weights
    torch.testing.assert_close(logits.gather(1, ids), logits.gather(1, ref_ids), rtol=0, atol=0)
    torch.testing.assert_close(weights, ref_w, rtol=1e-5, atol=1e-7)
