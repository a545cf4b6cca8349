"""The quantization schemes pdserve can run, read from a checkpoint's ``quantization_config``.

Owns: ``W8A8Scheme`` (frozen: which layers are int8, the name pdserve shows for it)
and ``parse_scheme``, which accepts the compressed-tensors description of SmoothQuant
W8A8 (int8 weights, symmetric, one scale per output channel, stored as int8;
int8 activations, symmetric, per token, dynamic) and refuses anything else with a
message naming what the checkpoint asks for. Torch-free: the worker's config check,
the router and tools read it without loading a model.

compressed-tensors names layers in ``ignore`` by module name (``lm_head``), by
``re:``-prefixed regular expression, or by class name (``Linear`` in ``targets``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

SCHEME_NAME = "w8a8-int8"
METHOD = "compressed-tensors"
_FORMATS = ("int-quantized",)


class UnsupportedQuantizationError(ValueError):
    """The checkpoint's quantization is not one pdserve runs."""


@dataclass(frozen=True)
class W8A8Scheme:
    """SmoothQuant W8A8: every Linear but the ``ignore``d ones holds int8 weights."""
    ignore: tuple[str, ...] = ("lm_head",)

    name = SCHEME_NAME

    def is_quantized(self, module: str) -> bool:
        """Whether the checkpoint's Linear module ``module`` (e.g.
        ``model.layers.0.self_attn.q_proj``) is int8."""
        return not any(_matches(rule, module) for rule in self.ignore)

    def covers(self, modules: tuple[str, ...]) -> bool:
        """Whether the merged layer holding ``modules`` is int8; ValueError when only
        some parts are (their weights could not be stored as one)."""
        flags = {self.is_quantized(m) for m in modules}
        if len(flags) > 1:
            raise UnsupportedQuantizationError(
                f"{', '.join(modules)} are stored as one layer but only some are quantized; "
                "quantize all of them or none")
        return flags.pop() if flags else True

    def quantization_config(self) -> dict[str, Any]:
        """The compressed-tensors ``quantization_config`` of this scheme (for writing checkpoints)."""
        weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False,
                   "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax",
                   "observer_kwargs": {}}
        activations = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True,
                       "group_size": None, "block_structure": None, "actorder": None, "observer": None,
                       "observer_kwargs": {}}
        return {"quant_method": METHOD, "format": _FORMATS[0], "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                              "input_activations": activations, "output_activations": None,
                                              "format": _FORMATS[0]}},
                "ignore": list(self.ignore), "kv_cache_scheme": None, "sparsity_config": {}}


def _matches(rule: str, module: str) -> bool:
    if rule.startswith("re:"):
        return re.match(rule[3:], module) is not None
    return module == rule or module.endswith("." + rule)


def parse_scheme(method: str, raw: Mapping[str, Any]) -> W8A8Scheme:
    """The scheme of a ``quantization_config``; UnsupportedQuantizationError naming the
    method, format or argument pdserve cannot run."""
    if method != METHOD:
        raise UnsupportedQuantizationError(
            f"the checkpoint is quantized with {method!r}, which pdserve cannot load (supported: "
            f"{METHOD} W8A8 int8, as written by `pdserve quantize smoothquant` or llmcompressor)")
    fmt = raw.get("format")
    groups = raw.get("config_groups") or {}
    if not groups:
        raise UnsupportedQuantizationError(f"{METHOD} quantization_config has no config_groups")
    for name, group in groups.items():
        _check_group(name, group, fmt)
    if raw.get("kv_cache_scheme"):
        raise UnsupportedQuantizationError(f"{METHOD}: a quantized KV cache (kv_cache_scheme) is not supported")
    if (raw.get("sparsity_config") or {}).get("format") not in (None, "dense"):
        raise UnsupportedQuantizationError(f"{METHOD}: sparse checkpoints are not supported")
    return W8A8Scheme(ignore=tuple(str(r) for r in raw.get("ignore") or ()))


def _check_group(name: str, group: Mapping[str, Any], fmt: Any) -> None:
    fmt = group.get("format") or fmt
    if fmt not in _FORMATS:
        raise UnsupportedQuantizationError(
            f"{METHOD} group {name!r}: format {fmt!r} is not supported (supported: {', '.join(_FORMATS)})")
    if list(group.get("targets") or []) != ["Linear"]:
        raise UnsupportedQuantizationError(
            f"{METHOD} group {name!r}: targets {group.get('targets')!r} are not supported (expected ['Linear'])")
    _check_args(name, "weights", group.get("weights"), strategy="channel", dynamic=False)
    _check_args(name, "input_activations", group.get("input_activations"), strategy="token", dynamic=True)
    if group.get("output_activations"):
        raise UnsupportedQuantizationError(f"{METHOD} group {name!r}: output activation quantization is not supported")


def _check_args(group: str, what: str, args: Mapping[str, Any] | None, strategy: str, dynamic: bool) -> None:
    want = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": strategy, "dynamic": dynamic}
    if not args:
        raise UnsupportedQuantizationError(
            f"{METHOD} group {group!r} has no {what}: only W8A8 (int8 weights and activations) is supported")
    wrong = {k: args.get(k) for k, v in want.items() if args.get(k) != v}
    if wrong:
        got = ", ".join(f"{k}={v!r}" for k, v in wrong.items())
        expected = ", ".join(f"{k}={want[k]!r}" for k in wrong)
        raise UnsupportedQuantizationError(
            f"{METHOD} group {group!r} {what}: {got} is not supported (W8A8 int8 needs {expected})")


__all__ = ["METHOD", "SCHEME_NAME", "UnsupportedQuantizationError", "W8A8Scheme", "parse_scheme"]
