"""Conversions between pdserve's Python values and the ``pdserve.v1`` wire messages.

Owns the one mapping of ``SamplingParams`` <-> ``pdserve.v1.SamplingParams`` and of
engine logprobs -> ``TokenLogprob``, so the router (client side) and the worker
(server side) cannot disagree. Torch-free.
"""
from __future__ import annotations

from typing import Any, Iterable

from pdserve.v1 import common_pb2

from pdserve.common.sampling_params import SamplingParams

_OPTIONAL = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
             "presence_penalty", "frequency_penalty", "seed", "logprobs", "min_tokens")


def params_to_proto(params: SamplingParams, *, with_stop_strings: bool = True) -> common_pb2.SamplingParams:
    """Every field is set explicitly, so the receiver never falls back to its own defaults."""
    msg = common_pb2.SamplingParams(
        stop=list(params.stop) if with_stop_strings else [],
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        include_stop_str_in_output=params.include_stop_str_in_output,
    )
    for name in _OPTIONAL:
        value = getattr(params, name)
        if value is not None:
            setattr(msg, name, value)
    return msg


def params_values_from_proto(msg: common_pb2.SamplingParams) -> dict[str, Any]:
    """The fields the sender set, as SamplingParams keyword arguments (no defaults filled)."""
    values: dict[str, Any] = {name: getattr(msg, name) for name in _OPTIONAL if msg.HasField(name)}
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        if name in values:
            values[name] = _float32_to_decimal(values[name])
    values.update(stop=tuple(msg.stop), stop_token_ids=tuple(msg.stop_token_ids), ignore_eos=msg.ignore_eos,
                  include_stop_str_in_output=msg.include_stop_str_in_output)
    return values


def params_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """Unset optional fields take SamplingParams' defaults; raises ValueError on bad values."""
    return SamplingParams(**params_values_from_proto(msg))


def logprobs_to_proto(entries: Iterable[Any]) -> list[common_pb2.TokenLogprob]:
    """Engine logprobs -> wire messages. An entry is ``(token_id, logprob, [(top_id, top_logprob), ...])``
    or an object with those three fields as ``token_id``, ``logprob``, ``top``."""
    out = []
    for entry in entries:
        tid, lp, top = (entry.token_id, entry.logprob, entry.top) if hasattr(entry, "token_id") else entry
        out.append(common_pb2.TokenLogprob(
            token_id=tid, logprob=lp, top=[common_pb2.TopLogprob(token_id=t, logprob=p) for t, p in (top or ())]))
    return out


def _float32_to_decimal(value: float) -> float:
    """0.7 travels as float32 0.69999998...; give the engine back the short decimal."""
    return float(f"{value:.7g}")
