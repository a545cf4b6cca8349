"""The models the live workers serve, with their tokenizers and context limits.

Owns one ``Tokenizer`` per served model, loaded once in a thread (the first load
may convert a GGUF tokenizer in a subprocess, seconds) as soon as discovery shows
a worker of that model, so the first request does not pay for it. A model without
a tokenizer by design (random ``dummy:`` weights) serves token-id prompts only.

A tokenizer that fails to load is a fault of the deployment, not of the request:
it is logged once, with its cause, when the load fails; ``problems()`` names it so
the router reports unhealthy; requests for that model get 503 with the cause.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Callable

from pdserve.cluster.discovery import Discovery
from pdserve.common.tokenizer import NoTokenizerError
from pdserve.router.errors import RequestError, invalid, unavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelLimits:
    max_model_len: int
    vocab_size: int | None
    quantization: str | None = None  # the workers' weight scheme (differing ones joined by ",")


class ModelCatalog:
    def __init__(self, discovery: Discovery, load_tokenizer: Callable[[str], Any],
                 on_failure: Callable[[str, str], None] = lambda model, cause: None) -> None:
        self._discovery = discovery
        self._load = load_tokenizer
        self._on_failure = on_failure
        self._tokenizers: dict[str, asyncio.Task] = {}
        self._failed: dict[str, str] = {}
        discovery.add_listener(self.preload)

    def served(self) -> list[str]:
        return sorted({r.model for r in self._discovery.live()})

    def adapters(self) -> dict[str, str]:
        """LoRA adapter name -> its base model, over the live workers."""
        return {a: r.model for r in self._discovery.live() for a in r.adapters}

    def resolve(self, name: str | None) -> tuple[str, str | None]:
        """(base model, LoRA adapter or None) that ``name`` calls for; with no name, the only served model.
        An unknown name is a 404 (OpenAI's ``model_not_found``)."""
        served = self.served()
        if not served:
            raise unavailable("no live workers: the cluster serves no model right now")
        if not name:
            if len(served) == 1:
                return served[0], None
            raise invalid(f"model is required: this cluster serves {served}", "model", "model_required")
        if name in served:
            return name, None
        adapters = self.adapters()
        if name in adapters:
            return adapters[name], name
        raise RequestError(f"model {name!r} does not exist; served models: {served}, adapters: {sorted(adapters)}",
                           404, "model", "model_not_found")

    def limits(self, model: str) -> ModelLimits:
        records = [r for r in self._discovery.live() if r.model == model]
        if not records:
            raise unavailable(f"no live worker serves model {model!r}")
        vocab = [r.capacity.get("vocab_size") for r in records if r.capacity.get("vocab_size")]
        schemes = sorted({r.quantization or "none" for r in records})
        quantization = None if schemes == ["none"] else ",".join(schemes)
        return ModelLimits(min(r.max_model_len for r in records), min(vocab) if vocab else None, quantization)

    async def tokenizer(self, model: str) -> Any | None:
        """The model's tokenizer, or None when it has none (token-id prompts only)."""
        task = self._tokenizers.get(model) or self._start(model)
        try:
            return await asyncio.shield(task)
        except NoTokenizerError:
            return None
        except Exception:  # noqa: BLE001 - logged once by _loaded; every request gets the cause
            raise unavailable(f"the tokenizer of model {model!r} failed to load: {self._failed[model]}",
                              "tokenizer_failed") from None

    def problems(self) -> dict[str, str]:
        """Model -> why its tokenizer failed to load (empty when all is well)."""
        return dict(self._failed)

    def _start(self, model: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(self._load, model))
        task.add_done_callback(lambda t: self._loaded(model, t))
        self._tokenizers[model] = task
        return task

    def _loaded(self, model: str, task: asyncio.Task) -> None:
        exc = None if task.cancelled() else task.exception()
        if isinstance(exc, NoTokenizerError):
            log.info("model %r: %s", model, exc)
        elif exc is not None:
            self._failed[model] = str(exc) or type(exc).__name__
            log.error("the tokenizer of model %r failed to load: %s (text prompts get 503; the router reports "
                      "unhealthy until it is restarted with a usable tokenizer)", model, self._failed[model])
            self._on_failure(model, self._failed[model])

    def preload(self) -> None:
        """Start loading the tokenizer of every served model not loaded yet."""
        for model in self.served():
            if model not in self._tokenizers:
                self._start(model)
