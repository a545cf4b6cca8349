"""Compiled CPU kernels: builds ``csrc/cpu_kernels.c`` with the host's C compiler, loads it with ctypes.

Owns: the build (once per source, compiler and CPU, cached on disk as a shared
library) and ``CpuKernels``, the typed wrappers around its entry points. Lifecycle:
``load_cpu_kernels()`` returns a ``CpuKernels`` or None when no C compiler with
OpenMP is available (callers then keep the pure-torch path); the object lives as
long as the backend holding it. The references these kernels are tested against
are in ``kernels/reference.py``.

The library is built with ``-march=native`` for the CPU it runs on, so the cache key
includes that CPU's model and flags; the build writes a temporary file and renames
it, so concurrent processes never load a half-written library.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.c"
_X86 = platform.machine().lower() in ("x86_64", "amd64")
FLAGS = ("-O3", "-march=native" if _X86 else "-mcpu=native", *(("-mprefer-vector-width=512",) if _X86 else ()),
         "-fno-math-errno", "-fopenmp", "-shared", "-fPIC")
_TYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}
_GROUP = {torch.float32: 1, torch.bfloat16: 2}  # k per 32-bit lane of a packed linear weight
_P, _I, _L, _F, _S = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float, ctypes.c_size_t


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pdserve" / "kernels"


def load_cpu_kernels(cache_dir: Path | None = None, extra_flags: tuple[str, ...] = ()) -> "CpuKernels | None":
    """The compiled kernels, building them first if needed; None (logged) without a compiler.

    ``extra_flags`` go after the default ones (tests build a portable variant with
    ``-mno-avx512f`` to cover the code paths for CPUs without AVX-512)."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("no C compiler found: CPU kernels fall back to pure torch")
        return None
    flags = FLAGS + extra_flags
    try:
        target = (cache_dir or default_cache_dir()) / f"cpu_kernels-{_build_key(compiler, flags)}.so"
        if not target.exists():
            _build(compiler, flags, target)
        return CpuKernels(ctypes.CDLL(str(target)))
    except (OSError, subprocess.CalledProcessError) as exc:
        log.warning("CPU kernels unavailable (%s): falling back to pure torch", exc)
        return None


def _build_key(compiler: str, flags: tuple[str, ...]) -> str:
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join((compiler, *flags)).encode())
    h.update(subprocess.run([compiler, "--version"], capture_output=True).stdout)
    h.update(_cpu_signature().encode())
    return h.hexdigest()[:16]


def _cpu_signature() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    wanted = ("model name", "flags")
    return "|".join(sorted({ln for ln in lines if ln.split(":")[0].strip() in wanted}))


def _build(compiler: str, flags: tuple[str, ...], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class CpuKernels:
    """Typed entry points of the compiled library; tensors are checked before each call."""

    def __init__(self, lib: ctypes.CDLL):
        self._lib = lib
        lib.pd_attention_scratch_floats.restype = ctypes.c_size_t
        lib.pd_attention_scratch_floats.argtypes = [_I, _I, _I, _I]
        signatures = {
            "paged_attention": [_P, _L, _P, _S, _P, _I, _P, _P, _P, _I, _I, _I, _I, _I, _F, _P, _I],
            "rms_norm": [_P, _L, _P, _L, _P, _P, _P, _I, _I, _F, _I],
            "silu_and_mul": [_P, _L, _P, _I, _I, _I],
            "rotary_store": [_P, _L, _P, _L, _P, _L, _P, _P, _P, _S, _P, _I, _I, _I, _I, _I, _I],
            "quant_per_token": [_P, _L, _P, _P, _I, _I, _I],
            "rms_norm_quant": [_P, _L, _P, _L, _P, _P, _P, _P, _I, _I, _F, _I],
            "silu_and_mul_quant": [_P, _L, _P, _P, _I, _I, _I],
            "int8_linear": [_P, _L, _P, _P, _P, _P, _P, _L, _I, _I, _I, _I],
            "linear": [_P, _L, _P, _P, _P, _L, _I, _I, _I, _I],
            "lora_delta": [_P, _L, _P, _L, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _P, _I],
        }
        for name, argtypes in signatures.items():
            for suffix in _TYPES.values():
                fn = getattr(lib, f"pd_{name}_{suffix}")
                fn.restype = None
                fn.argtypes = argtypes
        for suffix in _TYPES.values():
            for layer in ("decoder_layer", "decoder_layer_w8a8"):
                fn = getattr(lib, f"pd_{layer}_{suffix}")
                fn.restype, fn.argtypes = None, [_P, _P, _P, _S]
            fn = getattr(lib, f"pd_moe_experts_{suffix}")
            fn.restype, fn.argtypes = None, [_P, _P, _I, _P, _S, _P, _S, _P, _P, _P, _I, _I, _I, _I]
        lib.pd_int8_prepack.restype = None
        lib.pd_int8_prepack.argtypes = [_P, _L, _I, _I, _P, _I]
        lib.pd_int8_gemm_vec.restype = ctypes.c_int
        lib.pd_int8_gemm_vec.argtypes = []
        # the vector int8 GEMM this build runs (None: the portable loop, slower than torch._int_mm)
        self.int8_gemm_vec = {2: "avx512_vnni", 1: "avx2"}.get(lib.pd_int8_gemm_vec())
        lib.pd_linear_vec.restype = ctypes.c_int
        lib.pd_linear_vec.argtypes = []
        vec = lib.pd_linear_vec()
        # the dtypes whose packed linear is vectorized (bf16: with the AVX512-BF16 dot products)
        self.linear_vec = frozenset(t for t, bit in ((torch.float32, 1), (torch.bfloat16, 2)) if vec & bit)

    def _fn(self, name: str, dtype: torch.dtype):
        return getattr(self._lib, f"pd_{name}_{_TYPES[dtype]}")

    @staticmethod
    def supports(dtype: torch.dtype) -> bool:
        return dtype in _TYPES

    def attention_scratch_floats(self, hq: int, hkv: int, d: int, block_size: int) -> int:
        """Float32 scratch one thread of ``paged_attention`` needs."""
        return self._lib.pd_attention_scratch_floats(hq, hkv, d, block_size)

    def decoder_layer(self, dtype: torch.dtype, weights: object, step: object, kv_layer_ptr: int,
                      block_stride: int, w8a8: bool = False) -> None:
        """One fused decoder layer (``w8a8``: int8 projections); the structs and their checks
        are ``cpu_layer.FusedDecoder``'s."""
        self._fn("decoder_layer_w8a8" if w8a8 else "decoder_layer", dtype)(weights, step, kv_layer_ptr, block_stride)

    def paged_attention(self, q: torch.Tensor, kv_layer: torch.Tensor, query_start_loc: torch.Tensor,
                        seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float) -> torch.Tensor:
        """As ``reference.paged_attention_ref``: causal attention of variable-length query
        chunks, each the last rows of its sequence's context, read in place from the cache.

        q [T, Hq, D] (rows may be strided, heads contiguous); kv_layer [N, 2, bs, Hkv, D] of
        q's dtype, each block contiguous (the block dim may be strided); query_start_loc
        [B+1], seq_lens [B], block_tables [B, W], all int32. Returns [T, Hq, D].
        """
        t, hq, d = q.shape
        bs, hkv = kv_layer.shape[2], kv_layer.shape[3]
        _require(q.dtype == kv_layer.dtype and q.dtype in _TYPES, f"dtypes {q.dtype}, {kv_layer.dtype}")
        _require(kv_layer.shape[4] == d and hq % hkv == 0, f"shapes q {tuple(q.shape)}, kv {tuple(kv_layer.shape)}")
        _require(all(x.dtype == torch.int32 for x in (query_start_loc, seq_lens, block_tables)),
                 "index dtypes (int32 start locations, lengths and tables)")
        b = seq_lens.shape[0]
        _require(query_start_loc.shape[0] == b + 1 and block_tables.shape[0] >= b, "a table row and length per sequence")
        _require(kv_layer.shape[0] == 0 or kv_layer[0].is_contiguous(), "KV layout (a block must be contiguous)")
        if q.stride(2) != 1 or q.stride(1) != d:
            q = q.contiguous()
        qsl, lens, tables = query_start_loc.contiguous(), seq_lens.contiguous(), block_tables.contiguous()
        out = torch.empty(t, hq, d, dtype=q.dtype)
        threads = torch.get_num_threads()
        scratch = torch.empty(threads * self.attention_scratch_floats(hq, hkv, d, bs), dtype=torch.float32)
        self._fn("paged_attention", q.dtype)(
            q.data_ptr(), q.stride(0), kv_layer.data_ptr(), kv_layer.stride(0), tables.data_ptr(), tables.shape[1],
            qsl.data_ptr(), lens.data_ptr(), out.data_ptr(), b, hq, hkv, d, bs, scale, scratch.data_ptr(), threads)
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``reference.rms_norm_ref`` for 2-D rows [T, n] (last dim contiguous)."""
        rows, n = x.shape
        _require(_rows_ok(x, n) and (residual is None or _rows_ok(residual, n) and residual.shape == x.shape),
                 "rms_norm rows")
        _require(x.dtype == weight.dtype and (residual is None or residual.dtype == x.dtype), "rms_norm dtypes")
        weight = weight.contiguous()
        out, res_out = torch.empty(rows, n, dtype=x.dtype), torch.empty(rows, n, dtype=x.dtype)
        res_ptr, res_stride = (0, 0) if residual is None else (residual.data_ptr(), residual.stride(0))
        self._fn("rms_norm", x.dtype)(x.data_ptr(), x.stride(0), res_ptr or None, res_stride, weight.data_ptr(),
                                      out.data_ptr(), res_out.data_ptr(), rows, n, eps, torch.get_num_threads())
        return out, res_out

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """As ``reference.silu_and_mul_ref`` for 2-D rows [T, 2n] (last dim contiguous)."""
        rows, n2 = x.shape
        _require(_rows_ok(x, n2) and n2 % 2 == 0, "silu_and_mul rows")
        out = torch.empty(rows, n2 // 2, dtype=x.dtype)
        self._fn("silu_and_mul", x.dtype)(x.data_ptr(), x.stride(0), out.data_ptr(), rows, n2 // 2,
                                          torch.get_num_threads())
        return out

    def rotary_store_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        cos_sin: torch.Tensor, kv_layer: torch.Tensor,
                        slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``reference.rotary_ref`` then ``store_kv_ref``, but q and k are rotated IN PLACE
        (and returned). q [T, Hq, D], k and v [T, Hkv, D]: heads contiguous within a token."""
        t, hq, d = q.shape
        hkv, bs = k.shape[1], kv_layer.shape[2]
        _require(all(x.stride(2) == 1 and x.stride(1) == d for x in (q, k, v)), "rotary q/k/v layout")
        _require(q.dtype == k.dtype == v.dtype == kv_layer.dtype, "rotary dtypes")
        _require(kv_layer.shape[0] == 0 or kv_layer[0].is_contiguous(), "KV layout (a block must be contiguous)")
        _require(cos_sin.dtype == torch.float32 and cos_sin.shape[1] == d, "cos_sin table")
        positions, slots = positions.to(torch.int64).contiguous(), slot_mapping.to(torch.int64).contiguous()
        cos_sin = cos_sin.contiguous()
        self._fn("rotary_store", q.dtype)(
            q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), positions.data_ptr(),
            cos_sin.data_ptr(), kv_layer.data_ptr(), kv_layer.stride(0), slots.data_ptr(), t, hq, hkv, d, bs,
            torch.get_num_threads())
        return q, k

    # ---- W8A8 -------------------------------------------------------------------------

    def quant_per_token(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``reference.quant_per_token_ref`` for 2-D rows [T, K] (last dim contiguous):
        (q int8 [T, K], scale float32 [T, 1]), equal to the reference's."""
        rows, n = x.shape
        _require(_rows_ok(x, n), "quant_per_token rows")
        q, scale = torch.empty(rows, n, dtype=torch.int8), torch.empty(rows, 1, dtype=torch.float32)
        self._fn("quant_per_token", x.dtype)(x.data_ptr(), x.stride(0), q.data_ptr(), scale.data_ptr(), rows, n,
                                             torch.get_num_threads())
        return q, scale

    def rms_norm_quant(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As ``reference.rms_norm_quant_ref`` for 2-D rows [T, n]: (q, scale, x + residual);
        without a residual the third item is x itself (no copy)."""
        rows, n = x.shape
        _require(_rows_ok(x, n) and (residual is None or _rows_ok(residual, n) and residual.shape == x.shape),
                 "rms_norm_quant rows")
        _require(x.dtype == weight.dtype and (residual is None or residual.dtype == x.dtype), "rms_norm_quant dtypes")
        weight = weight.contiguous()
        q, scale = torch.empty(rows, n, dtype=torch.int8), torch.empty(rows, 1, dtype=torch.float32)
        res_out = x if residual is None else torch.empty(rows, n, dtype=x.dtype)
        res_ptr, res_stride = (None, 0) if residual is None else (residual.data_ptr(), residual.stride(0))
        self._fn("rms_norm_quant", x.dtype)(x.data_ptr(), x.stride(0), res_ptr, res_stride, weight.data_ptr(),
                                            q.data_ptr(), scale.data_ptr(), res_out.data_ptr(), rows, n, eps,
                                            torch.get_num_threads())
        return q, scale, res_out

    def silu_and_mul_quant(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``reference.silu_and_mul_quant_ref`` for 2-D rows [T, 2n]: (q [T, n], scale [T, 1])."""
        rows, n2 = x.shape
        _require(_rows_ok(x, n2) and n2 % 2 == 0, "silu_and_mul_quant rows")
        q, scale = torch.empty(rows, n2 // 2, dtype=torch.int8), torch.empty(rows, 1, dtype=torch.float32)
        self._fn("silu_and_mul_quant", x.dtype)(x.data_ptr(), x.stride(0), q.data_ptr(), scale.data_ptr(), rows,
                                                n2 // 2, torch.get_num_threads())
        return q, scale

    def prepack_int8_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """What a W8A8 layer should hold as its weight on this CPU; call once, at load.

        The int8 weight [N, K] packed (``pack_int8_weight``) where this build's GEMM is a
        vector one (AVX512-VNNI or AVX2), else ``weight`` itself: then ``CpuBackend.int8_linear``
        multiplies with ``torch._int_mm``, faster than the portable C loop.
        """
        return self.pack_int8_weight(weight) if self.int8_gemm_vec else weight

    def pack_int8_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """An int8 weight [N, K] (an nn.Linear's layout) packed for ``int8_linear``, in any build.

        Returns int8 [ceil(N/16), ceil(K/4) + 1, 64]: per block of 16 output columns,
        ceil(K/4) groups of [16 columns][4 k] bytes (zero past N and K), then 16 int32
        holding 128 * each column's sum. The same layout for every build of the library.
        """
        _require(weight.dim() == 2 and weight.dtype == torch.int8 and weight.stride(1) == 1, "int8 weight layout")
        n, k = weight.shape
        packed = torch.empty(-(-n // 16), -(-k // 4) + 1, 64, dtype=torch.int8)
        self._lib.pd_int8_prepack(weight.data_ptr(), weight.stride(0), n, k, packed.data_ptr(),
                                  torch.get_num_threads())
        return packed

    @staticmethod
    def is_packed_int8(weight: torch.Tensor) -> bool:
        """Whether ``weight`` is a ``pack_int8_weight`` result (not a plain [N, K] weight)."""
        return weight.dim() == 3 and weight.dtype == torch.int8 and weight.shape[2] == 64

    def int8_linear(self, q: torch.Tensor, q_scale: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor,
                    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """As ``reference.int8_linear_ref`` with the weight from ``pack_int8_weight``: q int8
        [T, K] (last dim contiguous), q_scale [T, 1], weight_scale [N] or [N, 1] (N is read
        from it), bias [N] or None; out_dtype float32 or bfloat16. Exact int32 sums and a
        float64 epilogue: the result equals the reference's."""
        rows, k = q.shape
        n = weight_scale.numel()
        _require(q.dtype == torch.int8 and q.stride(1) == 1 and q_scale.numel() == rows, "int8_linear activations")
        _require(self.is_packed_int8(packed) and packed.is_contiguous() and packed.shape[0] == -(-n // 16)
                 and packed.shape[1] == -(-k // 4) + 1, "int8_linear packed weight (see pack_int8_weight)")
        _require(out_dtype in _TYPES and (bias is None or bias.numel() == n), "int8_linear output dtype or bias")
        q_scale, weight_scale = _f32_vector(q_scale), _f32_vector(weight_scale)
        bias32 = None if bias is None else _f32_vector(bias)
        out = torch.empty(rows, n, dtype=out_dtype)
        self._fn("int8_linear", out_dtype)(q.data_ptr(), q.stride(0), q_scale.data_ptr(), packed.data_ptr(),
                                           weight_scale.data_ptr(), None if bias32 is None else bias32.data_ptr(),
                                           out.data_ptr(), out.stride(0), rows, n, k, torch.get_num_threads())
        return out

    # ---- dense linear over a packed weight ---------------------------------------------

    def prepack_linear_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """What a float32 / bfloat16 linear layer should hold as its weight on this CPU; call once,
        at load: ``pack_linear_weight(weight)`` where this build's ``linear`` for its dtype is
        vectorized (``linear_vec``), else ``weight`` itself, for torch's ``F.linear`` (the
        portable C loop and bf16 without AVX512-BF16 are tested, not chosen)."""
        ok = weight.dim() == 2 and weight.dtype in self.linear_vec and weight.device.type == "cpu"
        return self.pack_linear_weight(weight) if ok else weight

    def prepack_expert_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """What a sparse MLP should hold as its stacked experts [E, N, K] on this CPU: each expert
        packed (``pack_linear_weight``; [E, N, KG, G]) where this build's ``linear`` for the dtype
        is vectorized, for ``moe_experts``; else ``weights`` itself."""
        ok = weights.dim() == 3 and weights.dtype in self.linear_vec and weights.device.type == "cpu"
        return torch.stack([self.pack_linear_weight(w) for w in weights]) if ok else weights

    @staticmethod
    def is_packed_experts(weights: torch.Tensor) -> bool:
        return weights.dim() == 4 and CpuKernels.is_packed_linear(weights[0])

    def moe_experts(self, rows: torch.Tensor, offsets: torch.Tensor, w13: torch.Tensor,
                    w2: torch.Tensor) -> torch.Tensor:
        """Each (token, expert) pair's ``down(silu(gate) * up)``: rows [P, H] sorted by expert
        (expert e's rows ``offsets[e]:offsets[e + 1]``, int32 [E + 1]), w13 / w2 from
        ``prepack_expert_weights`` of [E, 2I, H] / [E, H, I]. Returns [P, H] in rows' dtype.
        One call: the experts' GEMMs share one parallel region per projection."""
        experts, inter2, _, _ = w13.shape
        p, hidden = rows.shape
        _require(w13.dtype == w2.dtype == rows.dtype and rows.is_contiguous() and w13.is_contiguous()
                 and w2.is_contiguous() and w2.shape[:2] == (experts, hidden) and offsets.numel() == experts + 1
                 and offsets.dtype == torch.int32, "moe_experts operands (see prepack_expert_weights)")
        inter = inter2 // 2
        h = torch.empty(p, inter2, dtype=rows.dtype)
        act = torch.empty(p, inter, dtype=rows.dtype)
        out = torch.empty(p, hidden, dtype=rows.dtype)
        self._fn("moe_experts", rows.dtype)(
            rows.data_ptr(), offsets.data_ptr(), experts, w13.data_ptr(), w13[0].numel(), w2.data_ptr(),
            w2[0].numel(), h.data_ptr(), act.data_ptr(), out.data_ptr(), p, hidden, inter, torch.get_num_threads())
        return out

    @staticmethod
    def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
        """A float32 or bfloat16 weight [N, K] (an nn.Linear's layout) packed for ``linear``, in any build.

        Returns a new tensor of shape [N, KG, G], G = 2 (bf16) or 1 (f32), KG = ceil(K / G),
        whose elements are ordered in blocks of 16 columns (output features): per block its KG
        groups, each [16 columns][G k] (k past K zero); the last block holds the N mod 16
        remaining columns alike, [w columns][G k] per group, so nothing is padded past N. Not a
        view of the weight: only the shape (N, KG) is meaningful to torch.
        """
        _require(weight.dim() == 2 and weight.dtype in _TYPES, "linear weight layout (2-D, float32 or bfloat16)")
        n, k = weight.shape
        g = _GROUP[weight.dtype]
        kg = -(-k // g)
        w = torch.nn.functional.pad(weight, (0, kg * g - k)).view(n, kg, g)
        full = n - n % 16
        blocks = w[:full].view(full // 16, 16, kg, g).transpose(1, 2)  # [NB, KG, 16, G]
        tail = w[full:].transpose(0, 1)  # [KG, N mod 16, G]
        return torch.cat([blocks.reshape(-1), tail.reshape(-1)]).view(n, kg, g)

    @staticmethod
    def unpack_linear_weight(packed: torch.Tensor, k: int) -> torch.Tensor:
        """The [N, K] weight that ``pack_linear_weight`` packed (``k``: its input features)."""
        _require(CpuKernels.is_packed_linear(packed) and -(-k // packed.shape[2]) == packed.shape[1],
                 "packed linear weight (see pack_linear_weight)")
        n, kg, g = packed.shape
        full = n - n % 16
        flat = packed.reshape(-1)
        blocks = flat[:full * kg * g].view(full // 16, kg, 16, g).transpose(1, 2).reshape(full, kg * g)
        tail = flat[full * kg * g:].view(kg, n - full, g).transpose(0, 1).reshape(n - full, kg * g)
        return torch.cat([blocks, tail])[:, :k].contiguous()

    @staticmethod
    def is_packed_linear(weight: torch.Tensor) -> bool:
        """Whether ``weight`` is a ``pack_linear_weight`` result (not a plain [N, K] weight)."""
        return weight.dim() == 3 and weight.dtype in _GROUP and weight.shape[2] == _GROUP[weight.dtype]

    def linear(self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ weight.T (+ bias)`` with the weight from ``pack_linear_weight``: x [M, K] of the
        weight's dtype (last dim contiguous), bias [N] or None; returns [M, N]. float32 sums
        (a single row sums even and odd k pairs apart), bias added in float32, one rounding to
        the dtype at the end."""
        m, k = x.shape
        n, kg, g = packed.shape
        # NOTE: few and cheap checks: at M = 1 a call is a few microseconds of work
        _require(x.dtype == packed.dtype and g == _GROUP.get(x.dtype) and kg == -(-k // g) and x.stride(1) == 1
                 and packed.is_contiguous(), "linear input or packed weight (see pack_linear_weight)")
        if bias is not None:
            _require(bias.dtype == x.dtype and bias.numel() == n, "linear bias")
            bias = bias.contiguous()
        out = torch.empty(m, n, dtype=x.dtype)
        self._fn("linear", x.dtype)(x.data_ptr(), x.stride(0), packed.data_ptr(),
                                    None if bias is None else bias.data_ptr(), out.data_ptr(), n, m, n, k,
                                    torch.get_num_threads())
        return out

    # ---- LoRA ---------------------------------------------------------------------------

    def lora_delta(self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   sorted_tokens: torch.Tensor, slot_start: torch.Tensor, slot_count: torch.Tensor,
                   part_ends: tuple[int, ...], *, slot_rank: torch.Tensor | None = None) -> None:
        """As ``reference.lora_delta_ref``, in place on y [T, N]: every slot and part of one layer in
        one call. x [T, K] (rows may be strided, as y's), a [S, P * R, K], b [S, N, R], all of y's
        dtype; sorted_tokens [T], slot_start and slot_count [S] int32 (``group_by_slot``'s);
        part_ends: the column where each of the P parts ends (the last N). slot_rank [S] int32:
        each slot's real rank, the kernel reading only the first slot_rank[s] rows of each part
        of a[s] and the first slot_rank[s] values of each row of b[s] (as if the rest were zero),
        and leaving the rows of a rank-0 slot's tokens as they are; None: R for every slot. The
        token indices and the ranks are not checked: they must be rows of y and x, and in [0, R]."""
        # NOTE: few and cheap checks: a decode step calls this for every wrapped layer
        _require(y.dim() == 2 and a.dim() == 3 and b.dim() == 3, "lora_delta ranks (y 2-D, a and b 3-D)")
        t, n = y.shape
        s, pr, k = a.shape
        r = b.shape[2]
        _require(x.dtype == y.dtype == a.dtype == b.dtype and y.dtype in _TYPES, "lora_delta dtypes")
        _require(x.dim() == 2 and x.shape == (t, k) and x.stride(1) == 1 and y.stride(1) == 1 and a.is_contiguous()
                 and b.is_contiguous() and b.shape[:2] == (s, n) and pr == len(part_ends) * r
                 and part_ends[-1] == n, "lora_delta shapes or layouts")
        _require(all(i.dtype == torch.int32 and i.is_contiguous() for i in (sorted_tokens, slot_start, slot_count))
                 and slot_start.numel() == slot_count.numel() == s, "lora_delta slots (int32, one per A)")
        _require(slot_rank is None or (slot_rank.dtype == torch.int32 and slot_rank.is_contiguous()
                                       and slot_rank.numel() == s), "lora_delta slot_rank (int32, one per A)")
        ends = (ctypes.c_int32 * len(part_ends))(*part_ends)
        self._fn("lora_delta", y.dtype)(y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0), a.data_ptr(),
                                        b.data_ptr(), sorted_tokens.data_ptr(), slot_start.data_ptr(),
                                        slot_count.data_ptr(), ends, len(part_ends), n, k, r, s,
                                        None if slot_rank is None else slot_rank.data_ptr(), torch.get_num_threads())


def _f32_vector(t: torch.Tensor) -> torch.Tensor:
    """t's elements as contiguous float32 ([N] and [N, 1] alike); t itself when it already is
    (a per-token call saves the copies: they cost more than a small GEMM)."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.reshape(-1).float().contiguous()


def _rows_ok(x: torch.Tensor, n: int) -> bool:
    return x.dim() == 2 and x.shape[1] == n and x.stride(1) == 1 and x.dtype in _TYPES


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"CPU kernel: unsupported {what}")
