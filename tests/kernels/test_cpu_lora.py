"""The compiled CPU LoRA delta (kernels/cpu.py ``lora_delta``, through ``CpuBackend.lora_delta``)
against the torch reference ``lora_delta_ref``.

Every build (native, AVX2, portable C). Cases: one part and merged parts (q/k/v of unequal
widths, gate/up), widths and K not a multiple of any vector width, parts wider than the
expand's 64-column tiles, ranks 1 to 64, slots with no tokens (their A and B NaN: never read),
base-model tokens (slot -1: their x rows NaN, their y rows left exactly as they were), one slot
with every token (prefill), one token per slot of 64 (decode), strided rows. Per-slot ranks
(``slot_rank``): ranks 0, 1, odd ones and R, the same result as without them where the stacks
are zero beyond each rank, and where they hold garbage there (never read). float32 close to
the reference; bfloat16 equal to it but in rare elements (see ``_check``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch

from pdserve.engine.backends.base import LoRAMapping
from pdserve.engine.backends.cpu_backend import CpuBackend
from pdserve.engine.platforms.cpu import CpuPlatform
from pdserve.kernels import reference as ref
from tests.kernels.cpu_builds import AVX2, PORTABLE, builds, built

BUILDS = builds({"portable": PORTABLE, "avx2": AVX2})
DTYPES = [torch.float32, torch.bfloat16]
RANKS = [1, 8, 16, 64]
CASES = {  # name -> (tokens, slots, how tokens map to slots, part_ends, K)
    "one part": (9, 3, "mixed", (37,), 33),
    "qkv": (11, 4, "mixed", (20, 29, 37), 33),
    "gate_up": (10, 3, "mixed", (24, 48), 40),
    "prefill": (300, 3, "one slot", (20, 29, 37), 64),
    "decode": (64, 64, "one each", (40, 52, 64), 48),
    "mostly base": (17, 5, "sparse", (16, 32), 17),
    "wide parts": (40, 3, "mixed", (70, 200), 130),  # parts over several 64-column tiles
}

pytestmark = pytest.mark.skipif(BUILDS["native"] is None, reason="no C compiler to build the CPU kernels")


@dataclass(frozen=True)
class Delta:
    """One layer's operands, the reference's result and the size of the sums behind it."""
    y: torch.Tensor
    x: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    token_slots: torch.Tensor
    part_ends: tuple[int, ...]
    expected: torch.Tensor
    magnitude: torch.Tensor  # float64: the delta of |x|, |A| and |B|

    def grouped(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return ref.group_by_slot(self.token_slots, self.a.shape[0])

    def mapping(self) -> LoRAMapping:
        return LoRAMapping(self.token_slots, *self.grouped())


def _token_slots(tokens: int, slots: int, kind: str) -> torch.Tensor:
    """Each token's slot (-1: the base model); but for one token per slot, slot 0 has none."""
    if kind == "one slot":
        return torch.full((tokens,), slots - 1, dtype=torch.int32)
    if kind == "one each":
        return torch.randperm(tokens).to(torch.int32) % slots
    values = torch.randint(-1, slots, (tokens,), dtype=torch.int32)
    if kind == "sparse":
        values = torch.where(torch.rand(tokens) < 0.7, -1, values)
    values[:2] = torch.tensor([-1, slots - 1])
    return torch.where(values == 0, -1, values)


@functools.cache
def _case(case: str, rank: int, dtype: torch.dtype) -> Delta:
    """Random operands (the stacks of slots without tokens NaN, as are the x rows of base-model
    tokens) and the reference's result, made once for every build: torch's bfloat16 matmuls of
    a few rows take milliseconds each here, and the decode case has 256."""
    tokens, slots, kind, part_ends, k = CASES[case]
    n, parts = part_ends[-1], len(part_ends)
    token_slots = _token_slots(tokens, slots, kind)
    a = (torch.randn(slots, parts * rank, k) / k ** 0.5).to(dtype)
    b = (torch.randn(slots, n, rank) / rank ** 0.5).to(dtype)
    unused = torch.ones(slots, dtype=torch.bool)
    unused[token_slots[token_slots >= 0].long()] = False
    a[unused], b[unused] = float("nan"), float("nan")
    x = torch.randn(tokens, k).to(dtype)
    x[token_slots < 0] = float("nan")
    y = torch.randn(tokens, n).to(dtype)
    grouped = ref.group_by_slot(token_slots, slots)
    expected, magnitude = y.clone(), torch.zeros(tokens, n, dtype=torch.float64)
    ref.lora_delta_ref(expected, x, a, b, *grouped, part_ends)
    ref.lora_delta_ref(magnitude, x.double().abs(), a.double().abs(), b.double().abs(), *grouped, part_ends)
    return Delta(y, x, a, b, token_slots, part_ends, expected, magnitude)


RANKED_R = 16
RANKED_CASES = {  # name -> (tokens of the slots of ranks 0, 1, 5, 12, R, random, random; base tokens, part_ends, K)
    "single": ((0, 0, 0, 1, 0, 0, 0), 0, (20, 29, 37), 33),  # one token in all
    "decode": ((1, 1, 1, 1, 1, 1, 0), 2, (24, 32, 100), 48),  # a part over two 64-column tiles
    "prefill": ((150, 20, 40, 140, 30, 25, 0), 9, (24, 32, 100), 48),  # over LORA_TOKENS per slot
}


@dataclass(frozen=True)
class Ranked:
    """A layer whose slots have ranks under R: the stacks zero beyond each rank (in ``delta``, the
    reference's result on them) and the same with garbage there, NaN in a quarter of it (0 * NaN
    is NaN: a read of the padding shows even where it meets zeros)."""
    delta: Delta
    slot_rank: torch.Tensor
    garbage_a: torch.Tensor
    garbage_b: torch.Tensor


def _garbage(shape: torch.Size) -> torch.Tensor:
    noise = torch.randn(shape) * 100
    return noise.masked_fill(torch.rand(shape) < 0.25, float("nan"))


@functools.cache
def _ranked_case(case: str, dtype: torch.dtype) -> Ranked:
    """The slots in random order, each with its tokens; the stacks of slots without tokens NaN."""
    counts, base, part_ends, k = RANKED_CASES[case]
    r, n, parts = RANKED_R, part_ends[-1], len(part_ends)
    ranks = torch.tensor([0, 1, 5, 12, r, *torch.randint(0, r + 1, (2,)).tolist()], dtype=torch.int32)
    order = torch.randperm(len(counts))
    ranks, counts = ranks[order].contiguous(), torch.tensor(counts)[order]
    slots = len(counts)
    token_slots = torch.cat([torch.arange(slots).repeat_interleave(counts), torch.full((base,), -1)])
    token_slots = token_slots[torch.randperm(len(token_slots))].to(torch.int32)
    a = (torch.randn(slots, parts * r, k) / k ** 0.5).to(dtype)
    b = (torch.randn(slots, n, r) / r ** 0.5).to(dtype)
    padding = torch.arange(r)[None, :] >= ranks[:, None]  # [S, R]: beyond the slot's rank
    padding_a, padding_b = padding.repeat(1, parts)[:, :, None], padding[:, None, :]
    garbage_a, garbage_b = (torch.where(m, _garbage(t.shape).to(dtype), t) for t, m in ((a, padding_a), (b, padding_b)))
    a, b = a.masked_fill(padding_a, 0), b.masked_fill(padding_b, 0)
    unused = counts == 0
    for t in (a, b, garbage_a, garbage_b):
        t[unused] = float("nan")
    x = torch.randn(len(token_slots), k).to(dtype)
    x[token_slots < 0] = float("nan")
    y = torch.randn(len(token_slots), n).to(dtype)
    grouped = ref.group_by_slot(token_slots, slots)
    expected, magnitude = y.clone(), torch.zeros(y.shape, dtype=torch.float64)
    ref.lora_delta_ref(expected, x, a, b, *grouped, part_ends)
    ref.lora_delta_ref(magnitude, x.double().abs(), a.double().abs(), b.double().abs(), *grouped, part_ends)
    return Ranked(Delta(y, x, a, b, token_slots, part_ends, expected, magnitude), ranks, garbage_a, garbage_b)


def _bf16_step(v: torch.Tensor) -> torch.Tensor:
    """The distance between bfloat16 neighbours at each |v| (float64)."""
    _, exponent = torch.frexp(v.abs().clamp_min(2.0 ** -120))
    return torch.ldexp(torch.ones_like(v), exponent - 8)


def _check(got: torch.Tensor, d: Delta) -> None:
    """Rows of base-model tokens as they were; float32 within 1e-5 of the reference. bfloat16:
    equal but in at most 1% of the elements (a rounding dropped or done wrong changes 2-50%),
    each within two steps of the result plus one step of the delta's terms: where a float32
    sum in another order rounds a shrunk value the other way, the delta moves by a step of one
    of its terms, more than a step of the result where the terms and y cancel."""
    base = d.token_slots < 0
    assert torch.equal(got[base], d.y[base]), "rows of base-model tokens changed"
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, d.expected, rtol=1e-5, atol=1e-5 * d.expected.abs().max().item())
        return
    diff = (got.double() - d.expected.double()).abs()
    largest = torch.stack([got.double().abs(), d.expected.double().abs(), d.y.double().abs()]).amax(0)
    allowed = 2 * _bf16_step(largest) + 2.0 ** -7 * d.magnitude
    differ = (diff > 0).double().mean().item()
    assert (diff <= allowed).all() and differ <= 0.01, \
        f"{differ:.2%} of the elements differ, by up to {(diff / allowed).max().item():.2f}x the allowance"


@pytest.mark.parametrize("build", sorted(BUILDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_lora_delta_matches_the_reference(case: str, rank: int, dtype: torch.dtype, build: str) -> None:
    d = _case(case, rank, dtype)
    got = d.y.clone()
    built(BUILDS, build).lora_delta(got, d.x, d.a, d.b, *d.grouped(), d.part_ends)
    _check(got, d)


@pytest.mark.parametrize("build", sorted(BUILDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_delta_on_strided_rows(dtype: torch.dtype, build: str) -> None:
    """x and y as column slices of wider rows (a fused layer's output, say)."""
    d = _case("qkv", 8, dtype)
    (t, k), n = d.x.shape, d.y.shape[1]
    wide_x, wide_y = torch.randn(t, k + 7).to(dtype), torch.randn(t, n + 5).to(dtype)
    wide_x[:, 3:3 + k], wide_y[:, 5:] = d.x, d.y
    built(BUILDS, build).lora_delta(wide_y[:, 5:], wide_x[:, 3:3 + k], d.a, d.b, *d.grouped(), d.part_ends)
    _check(wide_y[:, 5:], d)


def test_lora_delta_without_adapter_tokens_changes_nothing() -> None:
    d = _case("qkv", 8, torch.float32)
    got = d.y.clone()
    none = ref.group_by_slot(torch.full((d.y.shape[0],), -1, dtype=torch.int32), d.a.shape[0])
    built(BUILDS, "native").lora_delta(got, d.x, d.a, d.b, *none, d.part_ends)
    assert torch.equal(got, d.y)


def test_lora_delta_refuses_what_it_cannot_read() -> None:
    kernels, d = built(BUILDS, "native"), _case("qkv", 8, torch.float32)
    grouped = d.grouped()
    column_major_a = d.a.transpose(1, 2).contiguous().transpose(1, 2)
    bad = {"dtypes": (d.x.bfloat16(), d.a, grouped, d.part_ends),
           "shapes or layouts": (d.x, column_major_a, grouped, d.part_ends),
           "slots": (d.x, d.a, (grouped[0].long(), *grouped[1:]), d.part_ends)}
    for what, (x, a, g, ends) in bad.items():
        with pytest.raises(ValueError, match=f"lora_delta {what}"):
            kernels.lora_delta(d.y.clone(), x, a, d.b, *g, ends)
    with pytest.raises(ValueError, match="lora_delta shapes"):  # the parts must end at N
        kernels.lora_delta(d.y.clone(), d.x, d.a, d.b, *grouped, (20, 29, 36))


def test_cpu_backend_runs_the_compiled_delta(monkeypatch) -> None:
    backend = CpuPlatform().backend()  # as the engine chooses it
    assert isinstance(backend, CpuBackend)
    d = _case("gate_up", 16, torch.bfloat16)

    def no_reference(*args, **kwargs):
        raise AssertionError("the torch reference ran")

    monkeypatch.setattr(ref, "lora_delta_ref", no_reference)
    got = d.y.clone()
    backend.lora_delta(got, d.x, d.a, d.b, d.mapping(), d.part_ends)
    _check(got, d)


def test_cpu_backend_falls_back_for_float16(monkeypatch) -> None:
    backend = CpuBackend(built(BUILDS, "native"))
    d = _case("qkv", 8, torch.float16)
    calls = []
    reference = ref.lora_delta_ref
    monkeypatch.setattr(ref, "lora_delta_ref", lambda *args: calls.append(1) or reference(*args))
    got = d.y.clone()
    backend.lora_delta(got, d.x, d.a, d.b, d.mapping(), d.part_ends)
    assert calls == [1] and torch.equal(got, d.expected)


@pytest.mark.parametrize("build", sorted(BUILDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(RANKED_CASES))
def test_lora_delta_with_slot_ranks_matches_full_rank(case: str, dtype: torch.dtype, build: str) -> None:
    """Stacks zero beyond each slot's rank: with the ranks, as without them and as the reference;
    the tokens of a rank-0 slot left exactly as they were."""
    kernels, rc = built(BUILDS, build), _ranked_case(case, dtype)
    d = rc.delta
    full, got = d.y.clone(), d.y.clone()
    kernels.lora_delta(full, d.x, d.a, d.b, *d.grouped(), d.part_ends)
    kernels.lora_delta(got, d.x, d.a, d.b, *d.grouped(), d.part_ends, slot_rank=rc.slot_rank)
    _check(got, d)
    _check(got, Delta(d.y, d.x, d.a, d.b, d.token_slots, d.part_ends, full, d.magnitude))
    rank0 = (d.token_slots >= 0) & (rc.slot_rank[d.token_slots.clamp_min(0).long()] == 0)
    assert torch.equal(got[rank0], d.y[rank0]), "rows of a rank-0 slot's tokens changed"


@pytest.mark.parametrize("build", sorted(BUILDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(RANKED_CASES))
def test_lora_delta_never_reads_beyond_slot_ranks(case: str, dtype: torch.dtype, build: str) -> None:
    """Garbage (NaN in part) beyond each slot's rank: the result of the stacks zero there, to the
    bit (the same values summed in the same order), so the reference's."""
    kernels, rc = built(BUILDS, build), _ranked_case(case, dtype)
    d = rc.delta
    clean, got = d.y.clone(), d.y.clone()
    kernels.lora_delta(clean, d.x, d.a, d.b, *d.grouped(), d.part_ends, slot_rank=rc.slot_rank)
    kernels.lora_delta(got, d.x, rc.garbage_a, rc.garbage_b, *d.grouped(), d.part_ends, slot_rank=rc.slot_rank)
    _check(got, d)
    assert torch.equal(got, clean)


def test_lora_delta_refuses_bad_slot_ranks() -> None:
    kernels, rc = built(BUILDS, "native"), _ranked_case("decode", torch.float32)
    d = rc.delta
    for bad in (rc.slot_rank.long(), rc.slot_rank[:-1], rc.slot_rank.repeat_interleave(2)[::2]):
        with pytest.raises(ValueError, match="lora_delta slot_rank"):
            kernels.lora_delta(d.y.clone(), d.x, d.a, d.b, *d.grouped(), d.part_ends, slot_rank=bad)
