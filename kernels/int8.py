"""W8A8 (SmoothQuant-style) int8 inference: Triton kernels for the quantized linear layers.

Owns: ``quant_per_token`` (dynamic per-row activation quantization; in 2-D tiles where the
row maxima are known), ``int8_gemm`` (int8 x int8 -> int32 on the tensor cores, with the
scales and bias applied in the epilogue),
``rms_norm_quant`` and ``silu_and_mul_quant`` (RMSNorm, resp. SiLU-and-mul, fused with the
quantization of their output), ``int8_gemm_silu`` (the gate_up GEMM of prefill-sized steps
with SiLU-and-mul in its epilogue), and ``Int8GemmConfig`` / ``default_gemm_config`` /
``k_splits``, the GEMM's launch shapes. Stateless; no call waits for the host, so all of them can be
captured in a CUDA graph.

GEMM: weight [N, K] row-major (``nn.Linear``), so both operands are K-major, as the int8
tensor-core instructions need. Decode shapes (M <= 64) stream the weight once: 16-64 row
tiles (one activation row tile), 16-64 weight rows per program, K slices summed by
``_sum_splits_kernel`` where the column tiles alone leave multiprocessors idle. Prefill
shapes: 128 x 256 (or smaller, by the tile count) output tiles in grouped launch order,
operands through TMA on Hopper (``_int8_gemm_tma_kernel``), else cp.async pointer loads.
``int8_gemm_silu``: a program owns the same columns of the gate and the up half (one
[2 x half-width] weight tile a step, one dot: the plain GEMM's speed) and writes only
h = silu(gate) * up, half the bytes of the gate_up output, and each row's max |h| (atomic
max), so the next op quantizes h in one pass instead of reading the gate_up output twice
(on an H100 the separate SiLU-and-mul-quantize pass of an 8,192-token step took ~0.5 ms a
layer, 14% of the W8A8 prefill step).

Numerics follow ``reference.py``'s W8A8 section: scale = max|row| / 127 (1 for a zero row),
q = round-half-even(x / scale) with IEEE divisions, so q and the scale equal the reference's
but where a value computed with a different float32 ``exp``/``rsqrt`` lands on the other side
of a rounding boundary. The fused ops round where the references round (the normed row and the
SiLU product to the activation dtype) before quantizing. The GEMM's int32 sums are exact; the
epilogue runs in float32 (acc * row scale * column scale + bias) and rounds once to out_dtype.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (Triton >= 3.4); without them the pointer kernel runs
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

# Rows up to this many elements are quantized from registers in one pass (16 warps, no
# register spills on sm_90); longer rows are walked twice in chunks (max, then quantize),
# the second pass reading them again from L2. SiLU-and-mul holds gate and up: half as many.
_ONE_PASS_MAX = 16384
_SILU_ONE_PASS_MAX = 8192
_TWO_PASS_CHUNK = 4096
# Tiles of the quantization with known row maxima: 8,192 elements, 32 a thread at 8 warps.
_KNOWN_BLOCK_M = 4
_KNOWN_BLOCK_N = 2048


@dataclass(frozen=True)
class Int8GemmConfig:
    """Launch shape of ``int8_gemm``.

    A program owns a ``block_m`` x ``block_n`` output tile and walks K ``block_k`` at a time;
    ``group_m`` row tiles share each column tile in launch order (weight tiles reused from L2).
    ``split_k`` > 1 cuts K into that many slices whose int32 partial sums a second kernel adds
    (decode shapes with few column tiles); 0 picks the count from the shape (``_pick_split_k``).
    ``tma``: operands loaded through TMA descriptors (Hopper and newer; needs K a multiple of 16
    and aligned operands, else the pointer kernel runs; not with K slices).
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    tma: bool = False


def default_gemm_config(m: int, n: int, k: int, device: torch.device) -> Int8GemmConfig:
    """The launch shape per M bucket.

    Up to 64 rows the weight streams once and the tile count decides: narrow column tiles
    (and K splits where they are still too few) so that every multiprocessor reads. Past that
    the tensor cores decide: the biggest tile that still leaves no multiprocessor idle.
    NOTE: chosen from the compiled kernels' resources (registers, shared memory, no spills on
    sm_90), not yet timed on a GPU: ``python3 -m pdserve.bench.int8 --sweep`` times the
    candidates against these.
    """
    sms = _multiprocessors(device)
    tma = _has_tma(device)
    if m <= 16:
        # 32 weight rows per program, 16 where that leaves a multiprocessor without one,
        # K slices where even that does
        block_n = 32 if triton.cdiv(n, 32) >= 2 * sms else 16
        tiles = triton.cdiv(n, block_n)
        split = 1 if tiles >= sms else _pick_split_k(tiles, k, 512, sms)
        return Int8GemmConfig(16, block_n, 512, group_m=1, split_k=split, num_warps=4, num_stages=4)
    if m <= 64:
        # as many weight rows as activation rows per program (the activation tile is read
        # from L2 by every program), K slices for about two programs per multiprocessor
        block_m = triton.next_power_of_2(m)
        tiles = triton.cdiv(n, 64)
        return Int8GemmConfig(block_m, 64, 256, group_m=1, split_k=_pick_split_k(tiles, k, 256, sms),
                              num_warps=4, num_stages=3)
    # the biggest tile that still gives every multiprocessor work (two waves for the biggest)
    if triton.cdiv(m, 128) * triton.cdiv(n, 256) >= 2 * sms:
        return Int8GemmConfig(128, 256, 128, group_m=8, num_warps=8, num_stages=3, tma=tma)
    if triton.cdiv(m, 128) * triton.cdiv(n, 128) >= sms:
        return Int8GemmConfig(128, 128, 128, group_m=8, num_warps=8, num_stages=4, tma=tma)
    return Int8GemmConfig(64, 128, 128, group_m=8, num_warps=4, num_stages=4, tma=tma)


def quant_per_token(x: torch.Tensor, *, amax: torch.Tensor | None = None,
                    out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] (float32/bf16/fp16) -> (q int8 [T, K], scale float32 [T, 1]), x ~= q * scale.

    ``amax`` [T] float32, each row's max |x| where its producer recorded it (``int8_gemm_silu``):
    then the rows need no reduction and are quantized in 2-D tiles, one pass at copy speed.
    """
    if x.dim() != 2:
        raise ValueError(f"expected x [T, K], got {tuple(x.shape)}")
    x = _rows_contiguous(x)
    q, scale = _quant_buffers(out, x.shape[0], x.shape[1], x.device)
    if amax is None:
        _launch_quant_rows(x, q, scale, x.shape[1], silu=False)
    else:
        _launch_quant_known(x, amax, q, scale)
    return q, scale


def silu_and_mul_quant(x: torch.Tensor, *, out: tuple[torch.Tensor, torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, 2I] (gate, then up) -> silu(gate) * up quantized per token: (q int8 [T, I], scale [T, 1])."""
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"expected x [T, 2I], got {tuple(x.shape)}")
    x = _rows_contiguous(x)
    inter = x.shape[1] // 2
    q, scale = _quant_buffers(out, x.shape[0], inter, x.device)
    _launch_quant_rows(x, q, scale, inter, silu=True)
    return q, scale


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
                   out: tuple[torch.Tensor, torch.Tensor] | None = None,
                   residual_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RMSNorm of x [T, H] (after adding residual, if given), quantized per token.

    Returns (q int8 [T, H], scale float32 [T, 1], new_residual); new_residual is x + residual
    (x itself without a residual), written to ``residual_out`` if given (it may alias
    ``residual`` for an in-place update). The normed row is rounded to its dtype
    (``promote(weight, x)``) before quantizing, as the unfused ``rms_norm`` + ``quant_per_token``.
    """
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"expected x [T, H] and weight [H], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    x = _rows_contiguous(x)
    rows, hidden = x.shape
    res_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    normed_dtype = torch.promote_types(weight.dtype, res_dtype)
    q, scale = _quant_buffers(out, rows, hidden, x.device)
    if residual is None:
        new_residual = x
    else:
        residual = _rows_contiguous(residual)
        new_residual = residual_out if residual_out is not None else torch.empty_like(x, dtype=res_dtype)
        if new_residual.shape != x.shape or new_residual.dtype != res_dtype or new_residual.stride(1) != 1:
            raise ValueError(f"residual_out must be {tuple(x.shape)} {res_dtype} with a contiguous last dim")
    if rows == 0 or hidden == 0:
        return q, scale, new_residual
    block = triton.next_power_of_2(hidden)
    _rms_norm_quant_kernel[(rows,)](
        x, residual if residual is not None else x, new_residual, weight.contiguous(), q, scale, eps,
        x.stride(0), 0 if residual is None else residual.stride(0), new_residual.stride(0), q.stride(0),
        HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None,
        NORMED_TY=_TL_DTYPE[normed_dtype], num_warps=_row_warps(block),
    )
    return q, scale, new_residual


def int8_gemm(q: torch.Tensor, q_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, *,
              out: torch.Tensor | None = None, config: Int8GemmConfig | None = None) -> torch.Tensor:
    """(q [M, K] int8 @ weight [N, K] int8 .T) * q_scale [M, 1] * weight_scale [N] (+ bias [N]) -> [M, N].

    q_scale and weight_scale are float32 (weight_scale may be [N, 1]); bias any float dtype;
    out_dtype float32, bfloat16 or float16. ``config`` overrides ``default_gemm_config``.
    """
    m, n, k = check_gemm_args(q, q_scale, weight, weight_scale, bias)
    out = out_buffer(out, m, n, out_dtype, q.device)
    if m == 0 or n == 0:
        return out
    q, weight = _rows_contiguous(q), _rows_contiguous(weight)
    q_scale = q_scale.reshape(-1).to(torch.float32).contiguous()
    weight_scale = weight_scale.reshape(-1).to(torch.float32).contiguous()
    bias = None if bias is None else bias.reshape(-1).contiguous()
    cfg = config or default_gemm_config(m, n, k, q.device)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    split, k_per_split = _k_slices(cfg, tiles, k, q.device)
    scales = (q_scale, weight_scale, bias if bias is not None else weight_scale)
    meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                HAS_BIAS=bias is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.tma and split == 1 and _tma_ok(q, weight):
        a_desc = TensorDescriptor(q, [m, k], [q.stride(0), 1], [cfg.block_m, cfg.block_k])
        w_desc = TensorDescriptor(weight, [n, k], [weight.stride(0), 1], [cfg.block_n, cfg.block_k])
        _int8_gemm_tma_kernel[(tiles,)](a_desc, w_desc, *scales, out, m, n, k, out.stride(0), **meta)
        return out
    partial = out if split == 1 else torch.empty((split, m, n), dtype=torch.int32, device=q.device)
    _int8_gemm_kernel[(tiles, split)](
        q, weight, *scales, partial, m, n, k, k_per_split, q.stride(0), weight.stride(0), partial.stride(-2),
        partial.stride(0) if split > 1 else 0, SPLIT=split > 1, EVEN_K=k % cfg.block_k == 0, **meta,
    )
    if split > 1:
        _sum_splits_kernel[(triton.cdiv(m, 16), triton.cdiv(n, 128))](
            partial, *scales, out, m, n, split, partial.stride(0), out.stride(0), BLOCK_M=16, BLOCK_N=128,
            HAS_BIAS=bias is not None, num_warps=4,
        )
    return out


def int8_gemm_silu(q: torch.Tensor, q_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   out_dtype: torch.dtype = torch.bfloat16, *, config: Int8GemmConfig | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up = q [M, K] int8 @ weight [2I, K] int8 .T (scaled, rounded to out_dtype), then
    h = silu(gate) * up: returns (h [M, I] out_dtype, amax [M] float32 = max |h| per row), the
    bits of ``int8_gemm`` followed by ``silu_and_mul_quant``'s h. ``config`` as ``int8_gemm``'s
    (its ``block_n`` covers gate and up columns together; no K slices)."""
    m, n, k = check_gemm_args(q, q_scale, weight, weight_scale, None)
    h, amax = silu_outputs(m, weight, out_dtype)
    inter = h.shape[1]
    if m == 0 or inter == 0:
        return h, amax
    q, weight = _rows_contiguous(q), _rows_contiguous(weight)
    q_scale = q_scale.reshape(-1).to(torch.float32).contiguous()
    weight_scale = weight_scale.reshape(-1).to(torch.float32).contiguous()
    # NOTE: one more pipeline stage than the plain GEMM's default: on an H100 at 8192 x 28672 x
    # 4096, 1.70 ms (4 stages) against 1.76 ms (3), the plain GEMM's own time 1.69 ms
    cfg = config or dataclasses.replace(default_gemm_config(m, n, k, q.device), num_stages=4)
    half = max(16, cfg.block_n // 2)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(inter, half)
    meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=half, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.tma and _tma_ok(q, weight):
        a_desc = TensorDescriptor(q, [m, k], [q.stride(0), 1], [cfg.block_m, cfg.block_k])
        # the weight as [2, I, K]: one load brings a tile's gate rows and its up rows
        w_desc = TensorDescriptor(weight, [2, inter, k], [inter * weight.stride(0), weight.stride(0), 1],
                                  [2, half, cfg.block_k])
        _gemm_silu_tma_kernel[(tiles,)](a_desc, w_desc, q_scale, weight_scale, h, amax, m, inter, k, h.stride(0),
                                        **meta)
    else:
        _gemm_silu_kernel[(tiles,)](q, weight, q_scale, weight_scale, h, amax, m, inter, k, q.stride(0),
                                    weight.stride(0), h.stride(0), EVEN_K=k % cfg.block_k == 0, **meta)
    return h, amax


# ---- host helpers ---------------------------------------------------------------------

def silu_outputs(m: int, weight: torch.Tensor, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs of a gate_up product with SiLU-and-mul fused in (this GEMM's and the fused
    GEMV's): h [M, I] out_dtype and a zeroed row max [M] float32, after checking that ``weight``
    is [2I, K] and out_dtype one the kernels write."""
    if weight.shape[0] % 2:
        raise ValueError(f"expected weight [2I, K] (gate rows, then up rows), got {tuple(weight.shape)}")
    if out_dtype not in _TL_DTYPE:
        raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    h = torch.empty((m, weight.shape[0] // 2), dtype=out_dtype, device=weight.device)
    return h, torch.zeros(m, dtype=torch.float32, device=weight.device)


_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def check_gemm_args(q: torch.Tensor, q_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    bias: torch.Tensor | None) -> tuple[int, int, int]:
    """(M, N, K) of an int8 GEMM's operands; ValueError naming what does not fit."""
    if q.dim() != 2 or weight.dim() != 2 or q.shape[1] != weight.shape[1]:
        raise ValueError(f"expected q [M, K] and weight [N, K], got {tuple(q.shape)} and {tuple(weight.shape)}")
    if q.dtype != torch.int8 or weight.dtype != torch.int8:
        raise ValueError(f"q and weight must be int8, got {q.dtype} and {weight.dtype}")
    m, k = q.shape
    n = weight.shape[0]
    if q_scale.numel() != m or weight_scale.numel() != n or (bias is not None and bias.numel() != n):
        raise ValueError("q_scale needs M, weight_scale and bias N elements")
    return m, n, k


def out_buffer(out: torch.Tensor | None, m: int, n: int, out_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The GEMM's output: ``out`` checked ([M, N] of out_dtype, contiguous rows), or a new one."""
    if out is None:
        return torch.empty((m, n), dtype=out_dtype, device=device)
    if out.shape != (m, n) or out.dtype != out_dtype or out.stride(1) != 1:
        raise ValueError(f"out must be {(m, n)} {out_dtype} with a contiguous last dim")
    return out


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _row_warps(block: int) -> int:
    return max(1, min(16, block // 512))


def _quant_buffers(out: tuple[torch.Tensor, torch.Tensor] | None, rows: int, cols: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if out is None:
        return (torch.empty((rows, cols), dtype=torch.int8, device=device),
                torch.empty((rows, 1), dtype=torch.float32, device=device))
    q, scale = out
    if q.shape != (rows, cols) or q.dtype != torch.int8 or q.stride(1) != 1:
        raise ValueError(f"q out must be {(rows, cols)} int8 with a contiguous last dim")
    if scale.shape != (rows, 1) or scale.dtype != torch.float32 or not scale.is_contiguous():
        raise ValueError(f"scale out must be a contiguous {(rows, 1)} float32 tensor")
    return q, scale


def _launch_quant_rows(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, cols: int, silu: bool) -> None:
    rows = x.shape[0]
    if rows == 0:
        return
    if cols == 0:
        scale.fill_(1.0)
        return
    one_pass = cols <= (_SILU_ONE_PASS_MAX if silu else _ONE_PASS_MAX)
    block = triton.next_power_of_2(cols) if one_pass else _TWO_PASS_CHUNK
    _quant_rows_kernel[(rows,)](
        x, q, scale, x.stride(0), q.stride(0), cols,
        BLOCK=block, ONE_PASS=one_pass, SILU=silu, num_warps=_row_warps(block) if one_pass else 8,
    )


def _launch_quant_known(x: torch.Tensor, amax: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    rows, cols = x.shape
    if amax.shape != (rows,) or amax.dtype != torch.float32:
        raise ValueError(f"amax must be [{rows}] float32, got {tuple(amax.shape)} {amax.dtype}")
    if rows == 0:
        return
    block_n = min(_KNOWN_BLOCK_N, triton.next_power_of_2(max(cols, 1)))
    grid = (triton.cdiv(rows, _KNOWN_BLOCK_M), max(1, triton.cdiv(cols, block_n)))
    _quant_known_kernel[grid](x, amax.contiguous(), q, scale, rows, cols, x.stride(0), q.stride(0),
                              BLOCK_M=_KNOWN_BLOCK_M, BLOCK_N=block_n, num_warps=8)


def k_splits(cfg: Int8GemmConfig, m: int, n: int, k: int, device: torch.device) -> int:
    """The number of K slices ``int8_gemm`` runs ``cfg`` with at this shape."""
    return _k_slices(cfg, triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), k, device)[0]


def _k_slices(cfg: Int8GemmConfig, tiles: int, k: int, device: torch.device) -> tuple[int, int]:
    """(slices, K per slice): ``cfg.split_k`` (or the pick for 0), at most one per ``block_k``
    step, each slice a whole number of steps and none empty."""
    split = cfg.split_k or _pick_split_k(tiles, k, cfg.block_k, _multiprocessors(device))
    split = max(1, min(split, triton.cdiv(k, cfg.block_k)))
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.block_k), split) * cfg.block_k
    return (triton.cdiv(k, k_per_split) if k else 1), k_per_split


def _pick_split_k(tiles: int, k: int, block_k: int, sms: int) -> int:
    """Slices of K that bring the programs to about two per multiprocessor, each of at least
    four ``block_k`` steps (shorter slices spend more on their ramp than they gain)."""
    max_split = max(1, triton.cdiv(k, block_k) // 4)
    return max(1, min(math.ceil(2 * sms / tiles), max_split))


def _multiprocessors(device: torch.device) -> int:
    return _cuda_multiprocessors(device.index) if device.type == "cuda" else 4


@functools.lru_cache(maxsize=None)
def _cuda_multiprocessors(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _has_tma(device: torch.device) -> bool:
    if TensorDescriptor is None:
        return False
    return device.type != "cuda" or _cuda_capability(device.index) >= (9, 0)


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _tma_ok(q: torch.Tensor, weight: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned bases and row strides (int8: K and the strides multiples of 16)."""
    return (TensorDescriptor is not None and q.shape[1] > 0
            and all(t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0 for t in (q, weight)))


# ---- kernels ----------------------------------------------------------------------------

@triton.jit
def _round_half_even(y):
    # torch.round rounds ties to even; libdevice's rint would too, but the CPU interpreter
    # has no libdevice. Exact for |y| < 2**22 (here |y| <= 127).
    r = tl.floor(y + 0.5)
    tie = (r - y) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _row_scale(amax):
    return tl.where(amax > 0.0, tl.math.div_rn(amax, 127.0), 1.0)


@triton.jit
def _quantize(v, scale):
    r = _round_half_even(tl.math.div_rn(v, scale))
    return tl.minimum(tl.maximum(r, -127.0), 127.0).to(tl.int8)


@triton.jit
def _row_values(x_row, offs, mask, cols, SILU: tl.constexpr):
    """A chunk of the row to quantize, float32: x itself, or silu(gate) * up rounded as the
    reference rounds (silu to x's dtype, then the product to x's dtype)."""
    if SILU:
        gate = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_row + cols + offs, mask=mask, other=0.0).to(tl.float32)
        return _silu_mul(gate, up, x_row.dtype.element_ty)
    return tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _silu_mul(gate, up, ty: tl.constexpr):
    """silu(gate) * up from float32 values of dtype ``ty``, rounded to ``ty`` where the reference
    rounds (the SiLU, then the product); returned in float32."""
    act = tl.math.div_rn(gate, 1.0 + tl.exp(-gate)).to(ty).to(tl.float32)
    return (act * up).to(ty).to(tl.float32)


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, scale_ptr, stride_x, stride_q, cols,
                       BLOCK: tl.constexpr, ONE_PASS: tl.constexpr, SILU: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    offs = tl.arange(0, BLOCK)
    if ONE_PASS:
        mask = offs < cols
        v = _row_values(x_row, offs, mask, cols, SILU)
        scale = _row_scale(tl.max(tl.abs(v), 0))
        tl.store(q_row + offs, _quantize(v, scale), mask=mask)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, cols, BLOCK):
            mask = start + offs < cols
            amax = tl.maximum(amax, tl.abs(_row_values(x_row, start + offs, mask, cols, SILU)))
        scale = _row_scale(tl.max(amax, 0))
        for start in range(0, cols, BLOCK):
            mask = start + offs < cols
            v = _row_values(x_row, start + offs, mask, cols, SILU)
            tl.store(q_row + start + offs, _quantize(v, scale), mask=mask)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _quant_known_kernel(x_ptr, amax_ptr, q_ptr, scale_ptr, M, N, stride_x, stride_q,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A [BLOCK_M, BLOCK_N] tile of x quantized with its rows' recorded max |x| (the first
    column tile also stores the rows' scales)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    scale = _row_scale(tl.load(amax_ptr + rows, mask=row_ok, other=0.0))
    mask = row_ok[:, None] & (cols < N)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    v = tl.load(x_ptr + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(q_ptr + r64 * stride_q + cols[None, :], _quantize(v, scale[:, None]), mask=mask)
    if tl.program_id(1) == 0:
        tl.store(scale_ptr + rows, scale, mask=row_ok)


@triton.jit
def _rms_norm_quant_kernel(
    x_ptr, res_ptr, res_out_ptr, w_ptr, q_ptr, scale_ptr, eps,
    stride_x, stride_res, stride_res_out, stride_q,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, NORMED_TY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        res_ty = res_out_ptr.dtype.element_ty
        x = x + tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0).to(tl.float32)
        x = x.to(res_ty)
        tl.store(res_out_ptr + row * stride_res_out + offs, x, mask=mask)
        x = x.to(tl.float32)
    else:
        res_ty = x_ptr.dtype.element_ty
    var = tl.sum(x * x, 0) / HIDDEN
    h = (x * tl.rsqrt(var + eps)).to(res_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    normed = (w * h).to(NORMED_TY).to(tl.float32)
    scale = _row_scale(tl.max(tl.abs(normed), 0))
    tl.store(q_ptr + row * stride_q + offs, _quantize(normed, scale), mask=mask)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program: GROUP_M row tiles per column tile in launch order."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    in_group = pid % per_group
    return first_m + in_group % group_rows, in_group // group_rows


@triton.jit
def _scaled_sums(acc, a_scale, cols, N, w_scale_ptr, bias_ptr, HAS_BIAS: tl.constexpr):
    """float32 acc [BM, BN] * a_scale [BM] * weight scales (+ bias) of ``cols``: the epilogue's
    arithmetic before the output rounding (the fused GEMVs of ``int8_gemv_fused`` share it)."""
    col_ok = cols < N
    w_scale = tl.load(w_scale_ptr + cols, mask=col_ok, other=0.0)
    y = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _store_rows(y, rows, cols, M, N, out_ptr, stride_om):
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (cols < N)[None, :])


@triton.jit
def _epilogue(acc, rows, cols, M, N, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, stride_om,
              HAS_BIAS: tl.constexpr):
    a_scale = tl.load(a_scale_ptr + rows, mask=rows < M, other=0.0)
    y = _scaled_sums(acc, a_scale, cols, N, w_scale_ptr, bias_ptr, HAS_BIAS)
    _store_rows(y, rows, cols, M, N, out_ptr, stride_om)


@triton.jit
def _int8_gemm_kernel(
    a_ptr, w_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr,
    M, N, K, k_per_split, stride_am, stride_wn, stride_om, stride_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
):
    """One output tile (one K slice of it with SPLIT: int32 partial sums to out_ptr[slice])."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    k_start = tl.program_id(1) * k_per_split
    k_len = tl.minimum(K - k_start, k_per_split)
    # Rows past M are masked: a decode tile of BLOCK_M >= 16 rows for M = 1 then reads one
    # row, not sixteen. Columns past N read the last weight row instead (unmasked loads; N
    # is nearly always a multiple of BLOCK_N), their results dropped at the store.
    row_ok = rows < M
    w_cols = tl.minimum(cols, N - 1).to(tl.int64)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + (k_start + ks)[None, :]
    w_ptrs = w_ptr + w_cols[None, :] * stride_wn + (k_start + ks)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, k_len, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0)
            w = tl.load(w_ptrs)
        else:
            k_ok = k0 + ks < k_len
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if SPLIT:
        part = out_ptr + tl.program_id(1).to(tl.int64) * stride_split
        part += rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
        tl.store(part, acc, mask=row_ok[:, None] & (cols < N)[None, :])
    else:
        _epilogue(acc, rows, cols, M, N, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, stride_om, HAS_BIAS)


@triton.jit
def _int8_gemm_tma_kernel(
    a_desc, w_desc, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, K, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """One output tile, operands through TMA (out-of-range rows, columns and K read as zeros)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        a = a_desc.load([off_m, k0])
        w = w_desc.load([off_n, k0])
        acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
    rows = off_m + tl.arange(0, BLOCK_M)
    cols = off_n + tl.arange(0, BLOCK_N)
    _epilogue(acc, rows, cols, M, N, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, stride_om, HAS_BIAS)


@triton.jit
def _silu_epilogue(acc_g, acc_u, rows, cols, M, INTER, a_scale_ptr, w_scale_ptr, h_ptr, amax_ptr, stride_hm):
    """h = silu(gate) * up from the int32 sums of the same columns of the gate and the up half
    (each scaled and rounded to h's dtype first, as the unfused GEMM stores them); writes h and
    raises each row's max |h| in amax (atomic max: the row's other column tiles do too)."""
    ty = h_ptr.dtype.element_ty
    a_scale = tl.load(a_scale_ptr + rows, mask=rows < M, other=0.0)
    gate = _scaled_sums(acc_g, a_scale, cols, INTER, w_scale_ptr, w_scale_ptr, False)
    up = _scaled_sums(acc_u, a_scale, cols, INTER, w_scale_ptr + INTER, w_scale_ptr, False)
    h = _silu_mul(gate.to(ty).to(tl.float32), up.to(ty).to(tl.float32), ty)
    _store_rows(h, rows, cols, M, INTER, h_ptr, stride_hm)
    ok = (rows < M)[:, None] & (cols < INTER)[None, :]
    tl.atomic_max(amax_ptr + rows, tl.max(tl.where(ok, tl.abs(h), 0.0), axis=1), mask=rows < M)


@triton.jit
def _gemm_silu_kernel(
    a_ptr, w_ptr, a_scale_ptr, w_scale_ptr, h_ptr, amax_ptr, M, INTER, K, stride_am, stride_wn, stride_hm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """Columns [c, c + BLOCK_N) of h for BLOCK_M rows: gate rows c.. and up rows INTER + c.. of
    the weight, side by side in one [BLOCK_K, 2 BLOCK_N] tile (one dot a step)."""
    pid_m, pid_n = _tile_ids(M, INTER, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    pair = tl.arange(0, 2 * BLOCK_N)
    w_rows = tl.minimum(pid_n * BLOCK_N + pair % BLOCK_N, INTER - 1) + (pair // BLOCK_N) * INTER
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + ks[None, :]
    w_ptrs = w_ptr + w_rows.to(tl.int64)[None, :] * stride_wn + ks[:, None]
    acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + ks < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & (EVEN_K | k_ok[None, :]), other=0)
        acc = tl.dot(a, tl.load(w_ptrs, mask=EVEN_K | k_ok[:, None], other=0), acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc_g, acc_u = _halves(acc, BLOCK_M, BLOCK_N)
    _silu_epilogue(acc_g, acc_u, rows, cols, M, INTER, a_scale_ptr, w_scale_ptr, h_ptr, amax_ptr, stride_hm)


@triton.jit
def _gemm_silu_tma_kernel(
    a_desc, w_desc, a_scale_ptr, w_scale_ptr, h_ptr, amax_ptr, M, INTER, K, stride_hm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``_gemm_silu_kernel`` with operands through TMA, the weight seen as [2, INTER, K] (rows
    past INTER read as zeros; their columns are not stored)."""
    pid_m, pid_n = _tile_ids(M, INTER, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        a = a_desc.load([off_m, k0])
        w = w_desc.load([0, off_n, k0]).reshape(2 * BLOCK_N, BLOCK_K)
        acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
    acc_g, acc_u = _halves(acc, BLOCK_M, BLOCK_N)
    rows = off_m + tl.arange(0, BLOCK_M)
    cols = off_n + tl.arange(0, BLOCK_N)
    _silu_epilogue(acc_g, acc_u, rows, cols, M, INTER, a_scale_ptr, w_scale_ptr, h_ptr, amax_ptr, stride_hm)


@triton.jit
def _halves(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_M, 2 BLOCK_N] sums -> the gate half and the up half, [BLOCK_M, BLOCK_N] each."""
    return acc.reshape(BLOCK_M, 2, BLOCK_N).permute(0, 2, 1).split()


@triton.jit
def _sum_splits_kernel(part_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, splits, stride_split,
                       stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    part = part_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]  # slices are contiguous [M, N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for _ in range(0, splits):
        acc += tl.load(part, mask=mask, other=0)
        part += stride_split
    _epilogue(acc, rows, cols, M, N, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, stride_om, HAS_BIAS)
