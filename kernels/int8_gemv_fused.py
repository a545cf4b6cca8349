"""W8A8 decode GEMVs that take over the activation quantization around them (1-4 rows).

Owns two kernels and their launch shape (``FusedGemvConfig`` / ``default_fused_config``):

- ``int8_gemv_dynamic(x, weight, weight_scale, bias, amax=None)``: float rows x, quantized per
  token inside the GEMV (``quant_per_token`` then ``int8_gemv`` in one launch). Each
  program quantizes the activation words it multiplies as it goes; the row scale comes from
  ``amax`` (each row's max |x|, where the producer of x recorded it) or from a first pass
  over the row in every program (the row is small and read from L2).
- ``int8_gemv_silu(q, q_scale, weight, weight_scale)``: the gate_up GEMV of a W8A8 MLP with
  SiLU-and-mul in its epilogue: a program owns the same columns of the gate and the up half,
  writes ``h = silu(gate) * up`` in the activation dtype and records each row's max |h|
  with an atomic max (into a zeroed buffer it returns), which ``int8_gemv_dynamic`` then
  quantizes down_proj's input with.

Stateless; no host sync: both can be captured in a CUDA graph (the zeroed max buffer is a
memset node).

Why: at batch 1 a W8A8 decoder layer is ten launches where the bf16 one is nine; the
quantization passes (o_proj's input, SiLU-and-mul + quantize) are kernels of a few
microseconds each that read and write a row the GEMV reads again. Here they ride along in
the GEMVs, whose time is the weight stream. Measured on an H100 (``python3 -m
pdserve.bench.int8_gemv_fused``, Llama-3-8B shapes, one row): o_proj 10.7 -> 9.5 us, the
MLP 79.9 -> 71.9 us; the whole W8A8 decode step 4.22 -> 3.96 ms. At two rows the repeated
quantization work (every program quantizes the whole row) made o_proj slower (0.89x), so
the backend uses them at one row only.

Numerics: bit for bit the unfused ops' (``int8.quant_per_token`` / ``silu_and_mul_quant``,
then ``int8_gemv``): the same max (exact in any order), scale, IEEE division and
round-half-even (``int8._quantize``), the same int32 sums and epilogue arithmetic
(``int8._scaled_sums``), and gate / up rounded to the activation dtype before the SiLU as
the unfused GEMV's output is. Needs K % 4 == 0 and 4-byte aligned weight rows (the dp4a
words); ``fusable`` says whether a weight qualifies.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# NOTE: private helpers of int8 / int8_gemv shared on purpose: the fused kernels must round
# exactly as the ops they replace.
from pdserve.kernels.int8 import (_TL_DTYPE, _quantize, _row_scale, _rows_contiguous, _scaled_sums, _silu_epilogue,
                                  _store_rows, silu_outputs)
from pdserve.kernels.int8_gemv import _INTERPRETED, _WORD, MAX_ROWS, _block_m, _dot_step, _dp4a_ok, _load_step

_AMAX_CHUNK = 1024  # elements per step of the max pass over a row


@dataclass(frozen=True)
class FusedGemvConfig:
    """Launch shape: ``block_n`` weight rows per program (powers of two), ``block_k`` bytes of
    K per step (at least 4)."""

    block_n: int = 8
    block_k: int = 2048
    num_warps: int = 4
    num_stages: int = 3


def default_fused_config(m: int, n: int, k: int, device: torch.device) -> FusedGemvConfig:
    """Wider tiles than ``int8_gemv``'s (8 weight rows, not 4): every program quantizes the
    whole activation row again, so the column tiles set how often that work is repeated.
    NOTE: from ``python3 -m pdserve.bench.int8_gemv_fused`` on an H100 (Llama-3-8B shapes):
    within 3% of the fastest of its sweep at M = 1 (2048-byte steps) and M = 2 (1024); 4, 16
    or 32 rows per program and 4096-byte steps were slower. Off the GPU (the Triton
    interpreter: its cost is per program and per operation) 64 rows."""
    return FusedGemvConfig(block_n=8 if device.type == "cuda" else 64, block_k=2048 if m <= 1 else 1024)


def fusable(weight: torch.Tensor) -> bool:
    """Whether ``weight`` [N, K] int8 can be read as dp4a words (K % 4 == 0, aligned rows)."""
    return (weight.dim() == 2 and weight.dtype == torch.int8 and weight.shape[1] % _WORD == 0
            and weight.shape[1] > 0 and weight.stride(1) == 1 and weight.stride(0) % _WORD == 0
            and weight.storage_offset() % _WORD == 0)


def int8_gemv_dynamic(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      bias: torch.Tensor | None = None, amax: torch.Tensor | None = None, *,
                      config: FusedGemvConfig | None = None) -> torch.Tensor:
    """quant_per_token(x) then the int8 GEMV, in one launch: x [M, K] float (M <= 4) ->
    [M, N] in x's dtype. ``amax`` [M] float32: each row's max |x| if the producer knows it."""
    m, n, k = _check(x, weight, weight_scale, bias, floating=True)
    if amax is not None and (amax.numel() != m or amax.dtype != torch.float32):
        raise ValueError(f"amax must hold {m} float32 values, got {tuple(amax.shape)} {amax.dtype}")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    cfg = config or default_fused_config(m, n, k, x.device)
    x = _rows_contiguous(x)
    w_scale = weight_scale.reshape(-1).to(torch.float32).contiguous()
    bias = None if bias is None else bias.reshape(-1).contiguous()
    block_u = cfg.block_k // _WORD
    _gemv_dynamic_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, w_scale if amax is None else amax.reshape(-1).contiguous(), weight.view(torch.int32), w_scale,
        bias if bias is not None else w_scale, out, m, n, k // _WORD, x.stride(0), weight.stride(0) // _WORD,
        out.stride(0), BLOCK_M=_block_m(m), BLOCK_N=cfg.block_n, BLOCK_U=block_u, CHUNK=_AMAX_CHUNK,
        HAS_AMAX=amax is not None, HAS_BIAS=bias is not None, DP4A=_dp4a_ok(x.device), FAST=not _INTERPRETED,
        EVEN_K=(k // _WORD) % block_u == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def int8_gemv_silu(q: torch.Tensor, q_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   out_dtype: torch.dtype = torch.bfloat16, *, config: FusedGemvConfig | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up = q [M, K] int8 @ weight [2I, K] int8 .T (scaled, rounded to out_dtype), then
    h = silu(gate) * up: returns (h [M, I] out_dtype, amax [M] float32 = max |h| per row)."""
    m, n, k = _check(q, weight, weight_scale, None, floating=False)
    if q_scale.numel() != m:
        raise ValueError("q_scale needs M elements")
    h, amax = silu_outputs(m, weight, out_dtype)
    inter = h.shape[1]
    if m == 0 or inter == 0:
        return h, amax
    if not fusable(q):
        q = q.contiguous()
    cfg = config or default_fused_config(m, n, k, q.device)
    block_u = cfg.block_k // _WORD
    half = max(1, cfg.block_n // 2)  # gate rows and as many up rows: block_n weight rows a program
    _gemv_silu_kernel[(triton.cdiv(inter, half),)](
        q.view(torch.int32), q_scale.reshape(-1).to(torch.float32).contiguous(), weight.view(torch.int32),
        weight_scale.reshape(-1).to(torch.float32).contiguous(), h, amax, m, inter, k // _WORD,
        q.stride(0) // _WORD, weight.stride(0) // _WORD, h.stride(0), BLOCK_M=_block_m(m), BLOCK_N=half,
        BLOCK_U=block_u, DP4A=_dp4a_ok(q.device), EVEN_K=(k // _WORD) % block_u == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return h, amax


# ---- host helpers ---------------------------------------------------------------------

def _check(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
           floating: bool) -> tuple[int, int, int]:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"expected x [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"the fused GEMVs take at most {MAX_ROWS} rows, got M = {x.shape[0]}")
    if floating and x.dtype not in _TL_DTYPE:
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if not floating and x.dtype != torch.int8:
        raise ValueError(f"q must be int8, got {x.dtype}")
    if not fusable(weight):
        raise ValueError(f"weight must be int8 [N, K] with K % 4 == 0 and 4-byte aligned rows, got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    n = weight.shape[0]
    if weight_scale.numel() != n or (bias is not None and bias.numel() != n):
        raise ValueError("weight_scale and bias need N elements")
    return x.shape[0], n, x.shape[1]


# ---- kernels ----------------------------------------------------------------------------

@triton.jit
def _row_amax(x_base, K, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    """max |x| of each row [BLOCK_M] (x_base [BLOCK_M, 1] row pointers, K elements)."""
    offs = tl.arange(0, CHUNK)
    run = tl.zeros((BLOCK_M, CHUNK), dtype=tl.float32)
    for start in range(0, K, CHUNK):
        v = tl.load(x_base + (start + offs)[None, :], mask=(start + offs < K)[None, :], other=0.0)
        run = tl.maximum(run, tl.abs(v.to(tl.float32)))
    return tl.max(run, axis=1)


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _quantized_words(x_base, units, scale, k_ok, MASKED: tl.constexpr, FAST: tl.constexpr):
    """The activation words ``units`` [BU] of each row, quantized with ``scale`` [BM] and packed
    four int8 to an int32 (byte j = element 4 * unit + j, as the weight's words).

    The four elements of a word are loaded together ([BM, BU, 4], contiguous) and packed by an
    OR over that axis. ``FAST`` (compiled kernels): round-half-even in the float -> int
    conversion itself (cvt.rni), equal to ``int8._quantize``'s emulation, which the CPU
    interpreter runs (it has no libdevice)."""
    byte = tl.arange(0, 4)
    ptrs = x_base[:, :, None] + ((units * 4)[:, None] + byte[None, :])[None, :, :]
    if MASKED:
        v = tl.load(ptrs, mask=k_ok[:, :, None], other=0.0)
    else:
        v = tl.load(ptrs)
    v = v.to(tl.float32)
    s = scale[:, None, None]
    if FAST:
        q = libdevice.float2int_rn(tl.math.div_rn(v, s))
        q = tl.minimum(tl.maximum(q, -127), 127)
    else:
        q = _quantize(v, s).to(tl.int32)
    return tl.reduce((q & 0xFF) << (byte * 8)[None, None, :], 2, _bit_or)


@triton.jit
def _gemv_dynamic_kernel(
    x_ptr, amax_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, K_UNITS, stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr, CHUNK: tl.constexpr,
    HAS_AMAX: tl.constexpr, HAS_BIAS: tl.constexpr, DP4A: tl.constexpr, FAST: tl.constexpr, EVEN_K: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    us = tl.arange(0, BLOCK_U)
    # padding rows / columns read the last real one (unmasked loads, dropped at the store)
    x_rows = tl.minimum(rows, M - 1).to(tl.int64)
    x_base = (x_ptr + x_rows * stride_xm)[:, None]
    if HAS_AMAX:
        amax = tl.load(amax_ptr + x_rows)
    else:
        amax = _row_amax(x_base, K_UNITS * 4, BLOCK_M, CHUNK)
    scale = _row_scale(amax)
    w_ptrs = w_ptr + tl.minimum(cols, N - 1).to(tl.int64)[:, None] * stride_wn + us[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_U), dtype=tl.int32)
    for k0 in range(0, K_UNITS, BLOCK_U):
        k_ok = (k0 + us < K_UNITS)[None, :]
        xw = _quantized_words(x_base, k0 + us, scale, k_ok, not EVEN_K, FAST)
        acc = _dot_step(acc, xw, _load_step(w_ptrs, k_ok, EVEN_K), True, DP4A)
        w_ptrs += BLOCK_U
    y = _scaled_sums(tl.sum(acc, axis=2), scale, cols, N, w_scale_ptr, bias_ptr, HAS_BIAS)
    _store_rows(y, rows, cols, M, N, out_ptr, stride_om)


@triton.jit
def _gemv_silu_kernel(
    q_ptr, a_scale_ptr, w_ptr, w_scale_ptr, h_ptr, amax_ptr, M, INTER, K_UNITS, stride_qm, stride_wn, stride_hm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr, DP4A: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """Columns [c, c + BLOCK_N) of h: gate rows c.. and up rows INTER + c.. of the weight."""
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    us = tl.arange(0, BLOCK_U)
    q_rows = tl.minimum(rows, M - 1).to(tl.int64)
    g_rows = tl.minimum(cols, INTER - 1).to(tl.int64)
    q_ptrs = q_ptr + q_rows[:, None] * stride_qm + us[None, :]
    g_ptrs = w_ptr + g_rows[:, None] * stride_wn + us[None, :]
    u_ptrs = g_ptrs + INTER * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_U), dtype=tl.int32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_U), dtype=tl.int32)
    for k0 in range(0, K_UNITS, BLOCK_U):
        k_ok = (k0 + us < K_UNITS)[None, :]
        x = _load_step(q_ptrs, k_ok, EVEN_K)
        acc_g = _dot_step(acc_g, x, _load_step(g_ptrs, k_ok, EVEN_K), True, DP4A)
        acc_u = _dot_step(acc_u, x, _load_step(u_ptrs, k_ok, EVEN_K), True, DP4A)
        q_ptrs += BLOCK_U
        g_ptrs += BLOCK_U
        u_ptrs += BLOCK_U
    _silu_epilogue(tl.sum(acc_g, axis=2), tl.sum(acc_u, axis=2), rows, cols, M, INTER, a_scale_ptr, w_scale_ptr,
                   h_ptr, amax_ptr, stride_hm)
