"""Offline API in the style users know from vLLM: ``LLM(...).generate(prompts, params)``.

Owns: one ``LLMEngine`` and, during a ``generate`` call, the detokenizer of each
request (text and stop strings). Lifecycle: build once (loads the model), call
``generate``/``chat`` any number of times; every call runs its requests to the end.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence

from pdserve.common.detokenizer import IncrementalDetokenizer
from pdserve.common.sampling_params import SamplingParams
from pdserve.common.tokenizer import Tokenizer, load_tokenizer
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.request import TokenLogprob

Prompt = str | Sequence[int]


@dataclass
class CompletionOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int = 0


class LLM:
    def __init__(self, model: str = "smollm2", **engine_args: Any):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self._tokenizer: Tokenizer | None = None
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.engine.source)
        return self._tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 adapter: str | Sequence[str | None] | None = None) -> list[CompletionOutput]:
        """Run every prompt to completion (continuous batching); outputs in input order.
        ``adapter``: a LoRA adapter (by name) for every prompt, or one per prompt (None: the base model)."""
        prompt_list = _as_prompt_list(prompts)
        param_list = _as_param_list(params, len(prompt_list))
        adapters = [adapter] * len(prompt_list) if adapter is None or isinstance(adapter, str) else list(adapter)
        if len(adapters) != len(prompt_list):
            raise ValueError(f"{len(adapters)} adapters for {len(prompt_list)} prompts")
        outs: dict[str, CompletionOutput] = {}
        detoks: dict[str, IncrementalDetokenizer] = {}
        try:
            for prompt, p, name in zip(prompt_list, param_list, adapters):
                self._add(prompt, p, outs, detoks, name)
            while self.engine.has_unfinished():
                for step_out in self.engine.step():
                    self._on_output(step_out, outs[step_out.req_id], detoks[step_out.req_id])
        finally:
            for rid in outs:
                self.engine.abort(rid)  # no-op for finished requests; frees blocks on error
        return list(outs.values())

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             params: SamplingParams | None = None) -> list[CompletionOutput]:
        """Apply the model's chat template to one conversation or a list of them."""
        convs = messages if messages and isinstance(messages[0], list) else [messages]
        return self.generate([self.tokenizer.encode_chat(c) for c in convs], params)

    def kv_stats(self) -> dict[str, int]:
        return self.engine.kv_stats()

    def _add(self, prompt: Prompt, params: SamplingParams, outs, detoks, adapter: str | None = None) -> None:
        rid = f"offline-{next(self._ids)}"
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty: give a non-empty string or token ids")
            ids, text = self.tokenizer.encode(prompt), prompt
        else:
            ids, text = list(prompt), None
        self.engine.add_request(rid, ids, params, adapter=adapter)
        outs[rid] = CompletionOutput(rid, text, ids, logprobs=[] if params.logprobs is not None else None)
        detoks[rid] = self._detokenizer(ids, params)

    def _detokenizer(self, ids: list[int], params: SamplingParams) -> IncrementalDetokenizer | None:
        if self.engine.source.kind == "dummy":
            if params.stop:
                raise ValueError("stop strings need a tokenizer; dummy models have none")
            return None
        return IncrementalDetokenizer(self.tokenizer, ids, params.stop, params.include_stop_str_in_output,
                                      params.min_tokens)

    def _on_output(self, step_out, out: CompletionOutput, detok: IncrementalDetokenizer | None) -> None:
        out.token_ids.extend(step_out.new_token_ids)
        out.num_cached_tokens = step_out.num_cached_tokens
        if out.logprobs is not None:
            out.logprobs.extend(step_out.logprobs)
        out.finish_reason = step_out.finish_reason
        if detok is None:
            return
        _, stopped = detok.add(step_out.new_token_ids)
        if stopped and out.finish_reason is None:
            self.engine.abort(out.request_id)
            out.finish_reason = "stop"
        out.text = detok.text


def _as_prompt_list(prompts: Any) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a string, a list of token ids, or a non-empty list of those")
    return list(prompts)


def _as_param_list(params: Any, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
    return params
