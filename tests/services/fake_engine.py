"""A small stand-in for ``pdserve.engine.async_engine.AsyncEngine`` (unit tests only).

Deterministic: the next token is ``(previous + 1) % vocab`` starting from the last
prompt token, so greedy output is predictable. Every request holds
``ceil((prompt + max_tokens) / block_size)`` KV blocks until it finishes or is
aborted, so tests can check that aborts free blocks.
"""
from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass


@dataclass
class FakeOutput:
    new_token_ids: list[int]
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    logprobs: list | None = None


class FakeEngine:
    def __init__(self, step_seconds: float = 0.005, num_blocks: int = 256, block_size: int = 16,
                 max_model_len: int = 2048, vocab_size: int = 49152, eos_token_id: int = 2) -> None:
        self.step_seconds = step_seconds
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.eos = eos_token_id
        self.model_info = {"model": "smollm2", "architecture": "LlamaForCausalLM", "dtype": "float32",
                           "max_model_len": max_model_len, "vocab_size": vocab_size, "eos_token_ids": [eos_token_id],
                           "block_size": block_size, "num_layers": 2, "num_kv_heads": 1, "head_dim": 8}
        self.blocks: dict[str, int] = {}
        self.aborted: set[str] = set()
        self.steps = 0
        self.started = False

    kv_cache = None  # no KV to transfer

    async def load_adapter(self, name: str, path: str) -> None:
        raise ValueError(f"adapter {name!r}: the fake engine serves no LoRA adapters")

    async def unload_adapter(self, name: str) -> None:
        raise ValueError(f"unknown adapter {name!r}; loaded: none")

    def adapters(self) -> list[str]:
        return []

    def kv_links(self) -> list:
        return []

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.started = False

    def abort(self, request_id: str) -> None:
        if request_id in self.blocks:
            self.aborted.add(request_id)

    def stats(self) -> dict:
        used = sum(self.blocks.values())
        return {"running": len(self.blocks), "waiting": 0, "kv_blocks_free": self.num_blocks - used,
                "kv_blocks_used": used, "kv_blocks_cached": 0, "kv_blocks_total": self.num_blocks,
                "tokens_computed_total": self.steps, "steps_total": self.steps, "last_step_seconds": self.step_seconds}

    async def generate(self, request_id: str, prompt_token_ids: list[int], params, adapter: str | None = None):
        if not prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        self.blocks[request_id] = math.ceil((len(prompt_token_ids) + params.max_tokens) / self.block_size)
        token, produced = prompt_token_ids[-1], 0
        try:
            while True:
                await asyncio.sleep(self.step_seconds)
                self.steps += 1
                if request_id in self.aborted:
                    yield FakeOutput([], "abort", len(prompt_token_ids), 0)
                    return
                token = (token + 1) % self.model_info["vocab_size"]
                produced += 1
                finish = None
                if produced >= params.max_tokens:
                    finish = "length"
                elif token in params.stop_token_ids or (token == self.eos and not params.ignore_eos):
                    finish = "stop"
                logprobs = None
                if params.logprobs is not None:
                    top = [(token, -0.5), (token + 1, -1.5)][: params.logprobs]
                    logprobs = [(token, -0.5, top)]
                yield FakeOutput([token], finish, len(prompt_token_ids), 0, logprobs)
                if finish:
                    return
        finally:
            self.blocks.pop(request_id, None)
            self.aborted.discard(request_id)
