"""The KV connector's scheduler side: which requests' KV moves between engines, and when their
blocks may be freed.

Owns two sets of requests, with the blocks the scheduler's block manager gave them:

- arriving (decode side): blocks reserved for a prompt a peer computes and writes
  here. ``reserve`` -> (the transfer runs elsewhere) -> ``landed`` (the prompt counts
  as computed; the request joins the scheduler) or ``cancel`` (the transfer is over
  without it; the engine ends the request and frees the blocks).
- sending (prefill side): finished requests whose KV a peer is still being sent.
  ``on_finished`` keeps their blocks -> ``release`` frees them once the transfer
  is over (done, failed or timed out).

NOTE: neither set is scheduled, and nothing here frees a block a transfer may still
touch: only ``cancel`` and ``release``, which the transfer's owner calls once it is
over, end a request's hold on its blocks.
"""
from __future__ import annotations

from pdserve.engine.kv_cache import KVCacheManager
from pdserve.engine.request import Request


class KVConnectorScheduler:
    def __init__(self, kv: KVCacheManager):
        self._kv = kv
        self._arriving: dict[str, Request] = {}
        self._sending: dict[str, Request] = {}

    # ---- decode side -------------------------------------------------------------------
    def reserve(self, req: Request) -> tuple[list[int], int] | None:
        """Blocks for ``req``'s whole prompt, which arrives from a peer.

        Returns (block ids, prompt tokens already cached here, whose blocks need not be
        sent), or None (nothing held) if the pool cannot take it now.
        """
        rid = req.req_id
        cached = self._kv.match_prefix(rid, req.token_ids, req.adapter or "")
        if not self._kv.allocate_slots(rid, req.num_prompt_tokens):
            self._kv.free(rid)
            return None
        req.num_cached_tokens = cached
        self._arriving[rid] = req
        return list(self._kv.blocks_of(rid)), cached

    def is_arriving(self, req_id: str) -> bool:
        return req_id in self._arriving

    def landed(self, req_id: str) -> Request:
        """The prompt's KV is here: it counts as computed (and its full blocks as cached)."""
        req = self._arriving.pop(req_id)
        req.num_computed_tokens = req.num_prompt_tokens
        self._kv.commit_full_blocks(req_id, req.token_ids, req.num_computed_tokens)
        return req

    def cancel(self, req_id: str) -> Request | None:
        """The transfer is over without landing; the caller ends the request (blocks freed)."""
        return self._arriving.pop(req_id, None)

    @property
    def num_arriving(self) -> int:
        return len(self._arriving)

    # ---- prefill side ------------------------------------------------------------------
    def on_finished(self, req: Request) -> bool:
        """Whether a finished request's blocks may be freed now (False: a peer is sent its KV)."""
        if not req.hold_kv:
            return True
        self._sending[req.req_id] = req
        return False

    def is_sending(self, req_id: str) -> bool:
        return req_id in self._sending

    def release(self, req_id: str) -> bool:
        """The transfer of a finished request's KV is over: free its blocks."""
        if self._sending.pop(req_id, None) is None:
            return False
        self._kv.free(req_id)
        return True

    @property
    def num_sending(self) -> int:
        return len(self._sending)


__all__ = ["KVConnectorScheduler"]
