"""Turn a step's logits into tokens, one row per sampling request.

Owns: penalties, temperature, top-k / top-p / min-p filtering, greedy and random
selection with per-request generators, and logprobs. Stateless: every input
comes from the requests passed in. Runs on the logits' device. ``launch`` queues
the choice and the copy of the tokens to the host without waiting; ``collect``
waits for that copy alone (so work queued after it, such as the next step, keeps
running); ``sample`` is both.

NOTE: random rows draw Exp(1) noise from their own generator and take
argmax(p / noise) (an exact sample from p); a seeded request therefore gets the
same tokens whatever else shares its batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.request import TokenLogprob

_NEG_INF = float("-inf")


class SamplingState(Protocol):
    """What sampling reads of a request (a rank's ``RankRequest``)."""
    params: SamplingParams
    generator: torch.Generator | None
    token_ids: list[int]
    num_prompt_tokens: int


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


def apply_penalties(logits: torch.Tensor, reqs: list[SamplingState]) -> torch.Tensor:
    """Repetition (prompt + output, HF rule), presence and frequency (output only, OpenAI rule)."""
    for i, req in enumerate(reqs):
        p = req.params
        if p.repetition_penalty != 1.0:
            seen = _to_device(sorted(set(req.token_ids)), torch.long, logits.device)
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        outputs = req.token_ids[req.num_prompt_tokens:]
        if (p.presence_penalty or p.frequency_penalty) and outputs:
            out = _to_device(outputs, torch.long, logits.device)
            counts = torch.zeros(logits.shape[1], device=logits.device).index_add_(
                0, out, torch.ones(len(out), device=logits.device))
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside top-k, then outside the top-p nucleus, then under min-p.

    Args: logits [B, V] (already divided by temperature); top_k [B] long (<= 0: off);
    top_p [B] float (1: off); min_p [B] float (0: off). The most likely token always stays.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(ranks >= k, _NEG_INF)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
    sorted_logits = sorted_logits.masked_fill((before >= top_p.unsqueeze(1)) & (ranks > 0), _NEG_INF)
    probs = sorted_logits.softmax(dim=-1)
    sorted_logits = sorted_logits.masked_fill(probs < min_p.unsqueeze(1) * probs[:, :1], _NEG_INF)
    return torch.full_like(logits, _NEG_INF).scatter(1, order, sorted_logits)


@dataclass(frozen=True)
class PendingSample:
    """Tokens chosen on the device and on their way to the host."""
    reqs: list[SamplingState]
    tokens: torch.Tensor  # [S] on the device: a later step may read its inputs from here
    host: torch.Tensor  # [S] the host copy, valid once ``ready`` has passed
    ready: Any  # platform event recorded after the copy
    raw_logprobs: torch.Tensor | None


def suppress_stops(logits: torch.Tensor, reqs: list[SamplingState], eos_token_ids: tuple[int, ...]) -> torch.Tensor:
    """Rows still short of their ``min_tokens``: EOS (unless ignored) and their stop_token_ids
    cannot be sampled. Returns ``logits`` itself when no row is short."""
    rows = [(i, r.params) for i, r in enumerate(reqs)
            if r.params.min_tokens and len(r.token_ids) - r.num_prompt_tokens < r.params.min_tokens]
    if not rows:
        return logits
    logits = logits.clone()
    for i, p in rows:
        banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
        banned = [t for t in banned if t < logits.shape[-1]]
        if banned:
            logits[i, _to_device(banned, torch.long, logits.device)] = _NEG_INF
    return logits


class Sampler:
    def __init__(self, generator: torch.Generator, new_event: Callable[[], Any], eos_token_ids: tuple[int, ...] = ()):
        self.generator = generator  # for requests without a seed
        self.new_event = new_event
        self.eos_token_ids = eos_token_ids

    def sample(self, logits: torch.Tensor, reqs: list[SamplingState]) -> SampleResult:
        """Tokens (and logprobs) of every row; the token fetch is the only host synchronisation."""
        return self.collect(self.launch(logits, reqs))

    def launch(self, logits: torch.Tensor, reqs: list[SamplingState]) -> PendingSample:
        raw_logprobs = logits.log_softmax(dim=-1) if any(r.params.logprobs is not None for r in reqs) else None
        logits = suppress_stops(apply_penalties(logits, reqs), reqs, self.eos_token_ids)
        tokens = logits.argmax(dim=-1)
        rand = [i for i, r in enumerate(reqs) if not r.params.greedy]
        if len(rand) == len(reqs):
            tokens = self._sample_random(logits, reqs)
        elif rand:
            rows = _to_device(rand, torch.long, logits.device)
            tokens[rows] = self._sample_random(logits[rows], [reqs[i] for i in rand])
        host = tokens
        if tokens.device.type != "cpu":
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
        ready = self.new_event()
        ready.record()
        return PendingSample(reqs, tokens, host, ready, raw_logprobs)

    def collect(self, pending: PendingSample) -> SampleResult:
        pending.ready.synchronize()
        token_list = pending.host.tolist()
        return SampleResult(token_list, _logprobs(pending.raw_logprobs, token_list, pending.reqs))

    def _sample_random(self, logits: torch.Tensor, reqs: list[SamplingState]) -> torch.Tensor:
        knobs = _to_device([[r.params.temperature, r.params.top_k, r.params.top_p, r.params.min_p] for r in reqs],
                           torch.float32, logits.device)
        temp, top_k, top_p, min_p = knobs.unbind(1)
        logits = logits / temp.unsqueeze(1)
        if any(r.params.top_k > 0 or r.params.top_p < 1.0 or r.params.min_p > 0.0 for r in reqs):
            logits = filter_logits(logits, top_k.long(), top_p, min_p)  # NOTE: a full sort: only when asked
        probs = logits.softmax(dim=-1)
        return (probs / self._noise(probs, reqs)).argmax(dim=-1)

    def _noise(self, probs: torch.Tensor, reqs: list[SamplingState]) -> torch.Tensor:
        """Exp(1) noise: a seeded row from its own generator (the same draws whatever the
        batch), every other row from the engine's generator in one call."""
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, r in enumerate(reqs):
            if r.generator is not None:
                noise[i].exponential_(generator=r.generator)
        return noise


def _logprobs(raw: torch.Tensor | None, tokens: list[int], reqs: list[SamplingState]) -> list[TokenLogprob | None]:
    """One top-k and one gather for the whole batch, then one fetch of each."""
    if raw is None:
        return [None] * len(reqs)
    chosen = raw.gather(1, _to_device(tokens, torch.long, raw.device).unsqueeze(1)).squeeze(1).tolist()
    k = max((r.params.logprobs or 0) for r in reqs)
    top_vals, top_ids = raw.topk(k, dim=-1) if k > 0 else (raw[:, :0], raw[:, :0].long())
    top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    out: list[TokenLogprob | None] = []
    for i, req in enumerate(reqs):
        n = req.params.logprobs
        if n is None:
            out.append(None)
            continue
        out.append(TokenLogprob(tokens[i], chosen[i], list(zip(top_ids[i][:n], top_vals[i][:n]))))
    return out


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the logits' device, copied without blocking the host on accelerators."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)
