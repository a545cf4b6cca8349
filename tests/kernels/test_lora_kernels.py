"""``lora_delta`` (the segmented shrink/expand LoRA kernels) against the torch reference and a
float64 loop over tokens: mixed slots with base-model tokens (-1), adapters of smaller ranks
zero-padded in the stacks, the parts of one merged output in one call, K splits; on the GPU at a
Llama-3-8B layer's shapes and replayed in a CUDA graph with other slots."""
from __future__ import annotations

import pytest
import torch

from pdserve.kernels.lora import lora_delta
from pdserve.kernels.reference import group_by_slot, lora_delta_ref

DTYPES = [torch.float32, torch.bfloat16]


def _stacks(num_slots: int, max_rank: int, k: int, n: int, dtype: torch.dtype, device: torch.device,
            ranks: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A [S, R, K] and B [S, N, R]; slot s holds an adapter of rank ranks[s] zero-padded to R."""
    a = torch.zeros(num_slots, max_rank, k, dtype=dtype, device=device)
    b = torch.zeros(num_slots, n, max_rank, dtype=dtype, device=device)
    for s in range(num_slots):
        r = max_rank if ranks is None else ranks[s % len(ranks)]
        a[s, :r] = torch.randn(r, k, device=device).to(dtype) / k ** 0.5
        b[s, :, :r] = torch.randn(n, r, device=device).to(dtype)
    return a, b


def _expected(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              token_slots: torch.Tensor) -> torch.Tensor:
    """float64, one token at a time."""
    out = y.double().clone()
    for t, s in enumerate(token_slots.tolist()):
        if s >= 0:
            out[t] += (x[t].double() @ a[s].double().T) @ b[s].double().T
    return out


def _slots(tokens: int, num_slots: int, kind: str, device: torch.device) -> torch.Tensor:
    if kind == "none":
        return torch.full((tokens,), -1, dtype=torch.int32, device=device)
    if kind == "one":
        return torch.full((tokens,), num_slots - 1, dtype=torch.int32, device=device)
    return torch.randint(-1, num_slots, (tokens,), dtype=torch.int32, device=device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["mixed", "one", "none"])
@pytest.mark.parametrize("tokens,k,n,num_slots,ranks,splits,columns", [
    (1, 32, 24, 2, [8], None, None),
    (19, 40, 72, 4, [16, 4, 8], None, None),
    (37, 96, 40, 3, [2, 16], 3, 16),  # K splits; several expand programs per row block
    (6, 48, 100, 9, [4, 16], 2, 32),  # more slots than tokens; a column range past N's last tile
])
def test_lora_delta_matches_the_references(tokens, k, n, num_slots, ranks, splits, columns, kind, dtype, device,
                                           check_close):
    x = torch.randn(tokens, k, dtype=dtype, device=device)
    a, b = _stacks(num_slots, 16, k, n, dtype, device, ranks)
    token_slots = _slots(tokens, num_slots, kind, device)
    y0 = (0.1 * torch.randn(tokens, n, device=device)).to(dtype)
    grouped = group_by_slot(token_slots, num_slots)
    out, ref = y0.clone(), y0.clone()
    lora_delta(out, x, a, b, *grouped, splits=splits, block_k=16 if splits else None, columns=columns,
               block_n=16 if columns else 64)
    lora_delta_ref(ref, x, a, b, *grouped)
    base = token_slots < 0
    assert torch.equal(out[base], y0[base]) and torch.equal(ref[base], y0[base])
    expected = _expected(y0, x, a, b, token_slots)
    if kind != "none":
        check_close(out, expected, dtype, "triton")
        check_close(ref, expected, dtype, "reference")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sizes,columns", [((32, 16, 16), None), ((40, 24, 8), 16), ((24, 0, 40, 17), 16)])
def test_lora_delta_into_the_parts_of_a_merged_output(sizes, columns, dtype, device, check_close):
    """q, k, v (or gate, up) parts of one [T, sum N_p] output in one call: part p adds its own
    rank rows of A times its B rows into its columns only (parts not a multiple of the tile
    wide, an empty part, column ranges that end at a part's end)."""
    tokens, k, num_slots, rank = 13, 48, 3, 8
    x = torch.randn(tokens, k, dtype=dtype, device=device)
    token_slots = _slots(tokens, num_slots, "mixed", device)
    grouped = group_by_slot(token_slots, num_slots)
    y = (0.1 * torch.randn(tokens, sum(sizes), device=device)).to(dtype)
    stacks = [_stacks(num_slots, rank, k, n, dtype, device, [8, 4]) for n in sizes]
    a, b = torch.cat([s[0] for s in stacks], 1), torch.cat([s[1] for s in stacks], 1)
    ends = tuple(int(e) for e in torch.tensor(sizes).cumsum(0))
    expected, offset = y.double().clone(), 0
    for n, (a_p, b_p) in zip(sizes, stacks):
        expected[:, offset:offset + n] = _expected(expected[:, offset:offset + n], x, a_p, b_p, token_slots)
        offset += n
    ref = y.clone()
    lora_delta(y, x, a, b, *grouped, ends, columns=columns, block_n=16 if columns else 128)
    lora_delta_ref(ref, x, a, b, *grouped, ends)
    check_close(y, expected, dtype, "triton")
    check_close(ref, expected, dtype, "reference")


def test_group_by_slot_layout():
    token_slots = torch.tensor([2, -1, 0, 2, 2, -1, 0], dtype=torch.int32)
    sorted_tokens, start, count = group_by_slot(token_slots, 4)
    assert sorted_tokens.tolist() == [2, 6, 0, 3, 4, 1, 5]  # slot 0, slot 2 (step order), then the base tokens
    assert start.tolist() == [0, 2, 2, 5] and count.tolist() == [2, 0, 3, 0]
    assert sorted_tokens.dtype == start.dtype == count.dtype == torch.int32


def test_lora_delta_rejects_bad_shapes(device):
    x = torch.randn(4, 8, device=device)
    a, b = _stacks(2, 4, 8, 6, torch.float32, device)
    grouped = group_by_slot(torch.zeros(4, dtype=torch.int32, device=device), 2)
    with pytest.raises(ValueError, match="shapes disagree"):
        lora_delta(torch.zeros(4, 7, device=device), x, a, b, *grouped)
    with pytest.raises(ValueError, match="contiguous last dim"):
        lora_delta(torch.zeros(6, 4, device=device).t(), x, a, b, *grouped)
    with pytest.raises(ValueError, match="part_ends"):
        lora_delta(torch.zeros(4, 6, device=device), x, a, b, *grouped, (4, 5))
    with pytest.raises(ValueError, match="shapes disagree"):  # 2 parts need A rows of 2 x B's rank
        lora_delta(torch.zeros(4, 6, device=device), x, a, b, *grouped, (4, 6))


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [64, 512])
@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)])
def test_lora_delta_at_llama3_8b_shapes(tokens, k, n, device, check_close):
    dtype, num_slots = torch.bfloat16, 16
    x = torch.randn(tokens, k, dtype=dtype, device=device)
    a, b = _stacks(num_slots, 16, k, n, dtype, device, [16, 8])
    token_slots = _slots(tokens, num_slots, "mixed", device)
    grouped = group_by_slot(token_slots, num_slots)
    y0 = (0.1 * torch.randn(tokens, n, device=device)).to(dtype)
    out, ref = y0.clone(), y0.clone()
    lora_delta(out, x, a, b, *grouped)
    lora_delta_ref(ref, x, a, b, *grouped)
    base = token_slots < 0
    assert torch.equal(out[base], y0[base])
    expected = ref.double()  # bf16 rounding as the reference's; the float64 loop is too slow here
    check_close(out, expected, dtype)


@pytest.mark.gpu
def test_lora_delta_replays_in_a_cuda_graph_with_other_slots(device, check_close):
    tokens, k, n, num_slots, dtype = 64, 1024, 512, 8, torch.bfloat16
    x = torch.randn(tokens, k, dtype=dtype, device=device)
    a, b = _stacks(num_slots, 16, k, n, dtype, device)
    buffers = [t.clone() for t in group_by_slot(_slots(tokens, num_slots, "none", device), num_slots)]
    y = torch.zeros(tokens, n, dtype=dtype, device=device)
    lora_delta(y, x, a, b, *buffers)  # compile before capturing
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y.zero_()
        lora_delta(y, x, a, b, *buffers)
    for kind in ("mixed", "one", "none"):
        token_slots = _slots(tokens, num_slots, kind, device)
        for buf, new in zip(buffers, group_by_slot(token_slots, num_slots)):
            buf.copy_(new)
        graph.replay()
        expected = _expected(torch.zeros(tokens, n, device=device), x, a, b, token_slots)
        if kind == "none":
            assert not y.any()
        else:
            check_close(y, expected, dtype, kind)
