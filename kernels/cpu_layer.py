"""Llama-family decoder layers, one compiled call each, on the CPU.

Owns: the C structs ``pd_decoder_layer_*`` reads (``csrc/cpu_kernels.c``): a layer's
weights and sizes (``_Weights``, or ``_W8A8Weights`` for int8 projections, made once per
layer at load; ``_LayerLoRA``, its projections' adapter stacks) and one step's rows,
positions, cache tables, adapter slots and workspace (``_Step``, made once per step and read
by every layer), and ``FusedDecoder``, a model's stack of such layers. A layer call runs
RMSNorm, the qkv projection, rotary + KV store, paged attention, the output projection,
RMSNorm, gate_up, SiLU-and-mul and down in that order on the same kernels the per-op path
calls (W8A8: with each projection's input quantized per token, in
the norm's or SiLU-and-mul's pass where the op-by-op path does so; a projection with LoRA
adapters: the step's delta added to its output, ``pd_lora_delta`` over the step's token
slots), so the result is the same to the bit; at batch 1 a dozen Python calls per layer
cost as much as the layer's work.

Lifecycle: ``FusedDecoder(kernels, layers)`` once after the weights are packed (each
layer any object with ``DecoderLayerWeights``' fields: ``pdserve.engine.backends.base``);
``run(...)`` per step returns the last layer's output and the residual stream (the model
applies its final norm). The decoder holds references to the weights it points at.
"""
from __future__ import annotations

import ctypes
from typing import Any, Callable, Sequence

import torch

from pdserve.kernels.cpu import CpuKernels

_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float


class _LoRAStacks(ctypes.Structure):
    _fields_ = [("a", _P), ("b", _P), ("ends", _P), ("parts", _I), ("r", _I)]


class _LayerLoRA(ctypes.Structure):
    _fields_ = [("qkv", _LoRAStacks), ("o", _LoRAStacks), ("gate_up", _LoRAStacks), ("down", _LoRAStacks)]


class _Weights(ctypes.Structure):
    _fields_ = [("input_norm", _P), ("post_norm", _P), ("qkv", _P), ("qkv_bias", _P), ("o", _P),
                ("o_bias", _P), ("gate_up", _P), ("down", _P), ("eps", _F), ("scale", _F), ("hidden", _I),
                ("hq", _I), ("hkv", _I), ("d", _I), ("inter", _I), ("lora", ctypes.POINTER(_LayerLoRA))]


class _W8A8Weights(ctypes.Structure):
    _fields_ = [("input_norm", _P), ("post_norm", _P), ("qkv", _P), ("o", _P), ("gate_up", _P), ("down", _P),
                ("qkv_scale", _P), ("o_scale", _P), ("gate_up_scale", _P), ("down_scale", _P), ("qkv_bias", _P),
                ("o_bias", _P), ("eps", _F), ("scale", _F), ("hidden", _I), ("hq", _I), ("hkv", _I), ("d", _I),
                ("inter", _I)]


class _Step(ctypes.Structure):
    _fields_ = [("rows", _I), ("batch", _I), ("width", _I), ("bs", _I), ("threads", _I), ("first", _I),
                ("positions", _P), ("slots", _P), ("cos_sin", _P), ("tables", _P), ("qsl", _P), ("lens", _P),
                ("x", _P), ("res", _P), ("qkv", _P), ("attn", _P), ("h", _P), ("gate_up", _P), ("act", _P),
                ("scratch", _P), ("q", _P), ("q_scale", _P), ("lora_sorted", _P), ("lora_start", _P),
                ("lora_count", _P), ("lora_ranks", _P), ("lora_slots", _I)]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class FusedDecoder:
    """A model's decoder layers as compiled calls over weights packed for ``CpuKernels.linear``."""

    def __init__(self, kernels: CpuKernels, layers: Sequence[Any]):
        first = layers[0]
        self.kernels, self.dtype, self.w8a8 = kernels, first.input_norm.dtype, first.w8a8
        self.hidden = first.input_norm.shape[0]
        self.inter = (first.gate_up_scale.numel() if self.w8a8 else first.gate_up.shape[0]) // 2
        self.hq, self.hkv, self.d = first.num_heads, first.num_kv_heads, first.head_dim
        self._tensors: list[Any] = list(layers)  # NOTE: keeps every pointed-at tensor alive
        self._weights = [self._pack_w8a8(layer) if self.w8a8 else self._pack(layer) for layer in layers]
        # the step's adapter slots: every wrapped projection reads the same mapping
        loras = [lora for layer in layers for lora in _adapters(layer)]
        self._lora_mapping = loras[0].mapping if loras else None

    @staticmethod
    def supports(kernels: CpuKernels, layer: Any) -> bool:
        """Whether ``layer``'s tensors are what the fused call reads: weights packed (for the
        vector linear, or W8A8 for the vector int8 GEMM), the rest in one activation dtype."""
        dtype = layer.input_norm.dtype
        projections = (layer.qkv, layer.o, layer.gate_up, layer.down)
        if layer.w8a8:
            packed = kernels.int8_gemm_vec is not None and all(
                kernels.is_packed_int8(w) and w.is_contiguous() for w in projections)
            ok_dtype = kernels.supports(dtype)
        else:
            packed = all(kernels.is_packed_linear(w) and w.is_contiguous() and w.dtype == dtype for w in projections)
            ok_dtype = dtype in kernels.linear_vec
        vectors = all(t is None or (t.dtype == dtype and t.is_contiguous())
                      for t in (layer.input_norm, layer.post_norm, layer.qkv_bias, layer.o_bias))
        loras = _adapters(layer)
        stacks = all(t.dtype == dtype and t.is_contiguous() for lora in loras for t in (lora.a, lora.b))
        return ok_dtype and packed and vectors and stacks and not (layer.w8a8 and loras)

    def _pack(self, layer: Any) -> _Weights:
        return _Weights(_ptr(layer.input_norm), _ptr(layer.post_norm), _ptr(layer.qkv), _ptr(layer.qkv_bias),
                        _ptr(layer.o), _ptr(layer.o_bias), _ptr(layer.gate_up), _ptr(layer.down), layer.eps,
                        layer.scale, self.hidden, self.hq, self.hkv, self.d, self.inter, self._pack_lora(layer))

    def _pack_lora(self, layer: Any) -> Any:
        """A pointer to the layer's LoRA stacks (NULL where no projection has adapters)."""
        if not _adapters(layer):
            return None
        stacks = []
        for lora in _loras(layer):
            if lora is None:
                stacks.append(_LoRAStacks())
                continue
            ends = (ctypes.c_int32 * len(lora.part_ends))(*lora.part_ends)
            self._tensors.append(ends)
            stacks.append(_LoRAStacks(_ptr(lora.a), _ptr(lora.b), ctypes.addressof(ends), len(lora.part_ends),
                                      lora.b.shape[2]))
        packed = _LayerLoRA(*stacks)
        self._tensors.append(packed)
        return ctypes.pointer(packed)

    def _pack_w8a8(self, layer: Any) -> _W8A8Weights:
        """The int8 GEMM reads float32 scales and biases: vectors of them made here, kept alive."""
        f32 = [None if t is None else t.detach().reshape(-1).to(torch.float32).contiguous()
               for t in (layer.qkv_scale, layer.o_scale, layer.gate_up_scale, layer.down_scale, layer.qkv_bias,
                         layer.o_bias)]
        self._tensors.append(f32)
        return _W8A8Weights(_ptr(layer.input_norm), _ptr(layer.post_norm), _ptr(layer.qkv), _ptr(layer.o),
                            _ptr(layer.gate_up), _ptr(layer.down), *(_ptr(t) for t in f32), layer.eps, layer.scale,
                            self.hidden, self.hq, self.hkv, self.d, self.inter)

    def run(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, kv_cache: torch.Tensor,
            slot_mapping: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
            block_tables: torch.Tensor, on_layer_done: Callable[[int], None] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer over x [T, hidden] (overwritten); kv_cache [L, N, 2, bs, Hkv, D]. Returns
        (the last layer's output, the residual stream), both [T, hidden]."""
        rows = x.shape[0]
        if x.dtype != self.dtype or x.dim() != 2 or not x.is_contiguous():
            raise ValueError(f"CPU kernel: unsupported decoder input {x.dtype} {tuple(x.shape)}")
        if kv_cache.dtype != self.dtype or kv_cache.shape[0] == 0 or not kv_cache[0, 0].is_contiguous():
            raise ValueError("CPU kernel: unsupported KV layout (a block must be contiguous)")
        threads = torch.get_num_threads()
        qkvn = (self.hq + 2 * self.hkv) * self.d
        # NOTE: a W8A8 layer writes SiLU-and-mul's output quantized into q: no float act rows
        sizes = (qkvn, self.hq * self.d, self.hidden, 2 * self.inter, 0 if self.w8a8 else self.inter)
        work = torch.empty(rows * sum(sizes), dtype=self.dtype)
        qkv, attn, h, gate_up, act = (t.view(rows, n) for t, n in zip(work.split([rows * n for n in sizes]), sizes))
        res = torch.empty_like(x)
        index = [t.contiguous() for t in (positions.to(torch.int64), slot_mapping.to(torch.int64),
                                            block_tables, query_start_loc, seq_lens)]
        cos_sin = cos_sin.contiguous()
        bs = kv_cache.shape[3]
        per_thread = self.kernels.attention_scratch_floats(self.hq, self.hkv, self.d, bs)
        scratch = torch.empty(threads * per_thread, dtype=torch.float32)
        # W8A8: each projection's input quantized per token
        q = torch.empty(rows * max(self.hidden, self.hq * self.d, self.inter) if self.w8a8 else 0, dtype=torch.int8)
        q_scale = torch.empty(rows if self.w8a8 else 0, dtype=torch.float32)
        mapping = None if self._lora_mapping is None else self._lora_mapping(rows)
        if mapping is not None and not all(t.dtype == torch.int32 and t.is_contiguous() for t in (
                mapping.sorted_tokens, mapping.slot_start, mapping.slot_count, *_present(mapping.slot_rank))):
            raise ValueError("CPU kernel: the step's adapter slots must be contiguous int32")
        slots = () if mapping is None else (_ptr(mapping.sorted_tokens), _ptr(mapping.slot_start),
                                            _ptr(mapping.slot_count), _ptr(mapping.slot_rank),
                                            mapping.slot_start.numel())
        step = _Step(rows, seq_lens.shape[0], index[2].shape[1], bs, threads, 1, *(_ptr(t) for t in index[:2]),
                     _ptr(cos_sin), *(_ptr(t) for t in index[2:]), _ptr(x), _ptr(res), _ptr(qkv), _ptr(attn),
                     _ptr(h), _ptr(gate_up), _ptr(act), _ptr(scratch), _ptr(q), _ptr(q_scale), *slots)
        step_ref, stride = ctypes.byref(step), kv_cache.stride(1)
        layer_bytes = kv_cache.stride(0) * kv_cache.element_size()
        base = kv_cache.data_ptr()
        for i, weights in enumerate(self._weights):
            self.kernels.decoder_layer(self.dtype, ctypes.byref(weights), step_ref, base + i * layer_bytes, stride,
                                       self.w8a8)
            step.first = 0
            if on_layer_done is not None:
                on_layer_done(i)
        return x, res


def _present(t: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    return () if t is None else (t,)


def _loras(layer: Any) -> tuple[Any, Any, Any, Any]:
    """The layer's LoRA stacks per projection (``LinearLoRA`` or None), in the C struct's order."""
    return layer.qkv_lora, layer.o_lora, layer.gate_up_lora, layer.down_lora


def _adapters(layer: Any) -> list[Any]:
    """The layer's projections' LoRA stacks that exist."""
    return [lora for lora in _loras(layer) if lora is not None]


__all__ = ["FusedDecoder"]
