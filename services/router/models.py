"""The models the live workers serve, with their tokenizers and context limits.

Owns one ``Tokenizer`` per served model, loaded once in a thread (the first load
may convert a GGUF tokenizer in a subprocess, seconds) as soon as discovery shows
a worker of that model, so the first request does not pay for it. A model without
a tokenizer (random ``dummy:`` weights) serves token-id prompts only.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Callable

from services.cluster.discovery import Discovery
from services.router.errors import RequestError, invalid, unavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelLimits:
    max_model_len: int
    vocab_size: int | None


class ModelCatalog:
    def __init__(self, discovery: Discovery, load_tokenizer: Callable[[str], Any]) -> None:
        self._discovery = discovery
        self._load = load_tokenizer
        self._tokenizers: dict[str, asyncio.Task] = {}
        discovery.add_listener(self.preload)

    def served(self) -> list[str]:
        return sorted({r.model for r in self._discovery.live()})

    def resolve(self, name: str | None) -> str:
        """The served model called ``name``; with no name, the only served model."""
        served = self.served()
        if not served:
            raise unavailable("no live workers: the cluster serves no model right now")
        if not name:
            if len(served) == 1:
                return served[0]
            raise invalid(f"model is required: this cluster serves {served}", "model", "model_required")
        if name not in served:
            raise RequestError(f"model {name!r} does not exist; served models: {served}", 400, "model", "model_not_found")
        return name

    def limits(self, model: str) -> ModelLimits:
        records = [r for r in self._discovery.live() if r.model == model]
        if not records:
            raise unavailable(f"no live worker serves model {model!r}")
        vocab = [r.capacity.get("vocab_size") for r in records if r.capacity.get("vocab_size")]
        return ModelLimits(min(r.max_model_len for r in records), min(vocab) if vocab else None)

    async def tokenizer(self, model: str) -> Any | None:
        """The model's tokenizer, or None when it has none (token-id prompts only)."""
        task = self._tokenizers.get(model) or self._start(model)
        try:
            return await asyncio.shield(task)
        except ValueError as exc:
            log.warning("model %r has no usable tokenizer: %s", model, exc)
            return None

    def _start(self, model: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(self._load, model))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: no warning
        self._tokenizers[model] = task
        return task

    def preload(self) -> None:
        """Start loading the tokenizer of every served model not loaded yet."""
        for model in self.served():
            if model not in self._tokenizers:
                self._start(model)
