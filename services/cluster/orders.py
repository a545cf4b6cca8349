"""Signed remote-prefill orders: who may make a prefill worker write into a decode worker's KV cache.

Owns the signing and checking of ``RemotePrefillRequest`` messages with the
cluster secret (HMAC-SHA256), and the memory of the orders already seen. A NIXL
write cannot be refused by the memory it lands in, so the check happens on the
writer: a prefill worker executes only an order that the decode worker signed,
which binds the request id, the prompt, the destination agent and its
incarnation, the destination blocks and the prefill worker it chose.

Lifecycle of one order: the decode worker reserves blocks, ``sign()`` stamps the
request (issue time + signature) -> the prefill worker's ``check()`` verifies the
signature, its own id, the age (at most ``max_age`` seconds, which outlives no
reservation: the decode worker's RemotePrefill deadline is shorter) and that the
request id was not seen before (no replay), then computes and writes.

With no secret configured (a cluster without one), orders are neither signed nor
checked; the worker says so once at start.
"""
from __future__ import annotations

import hashlib
import hmac
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable


class OrderRefused(Exception):
    """A remote-prefill order that must not be executed; the message says why."""


@dataclass
class OrderBook:
    """Signs (decode side) and checks (prefill side) remote-prefill orders of one worker."""

    secret: str = field(default="", repr=False)
    worker_id: str = ""
    max_age: float = 300.0
    clock: Callable[[], float] = time.time
    _seen: OrderedDict[str, float] = field(default_factory=OrderedDict)

    @property
    def enabled(self) -> bool:
        return bool(self.secret)

    def sign(self, request: Any) -> None:
        """Stamp ``request`` (a ``RemotePrefillRequest`` naming its prefill worker) in place."""
        if not self.enabled:
            return
        request.issued_at_unix = self.clock()
        request.grant_signature = self._digest(request)

    def check(self, request: Any) -> None:
        """Raise ``OrderRefused`` unless this worker may execute ``request``."""
        if not self.enabled:
            return
        if not request.grant_signature:
            raise OrderRefused("the order is not signed (this cluster requires the cluster secret)")
        if not hmac.compare_digest(request.grant_signature, self._digest(request)):
            raise OrderRefused("the order's signature does not match (forged, altered, or another cluster's secret)")
        if request.prefill_worker_id != self.worker_id:
            raise OrderRefused(f"the order names prefill worker {request.prefill_worker_id!r}, not this one")
        now = self.clock()
        self._forget_before(now - self.max_age)
        age = now - request.issued_at_unix
        if not -self.max_age < age <= self.max_age:
            raise OrderRefused(f"the order was issued {age:.0f} s ago (at most {self.max_age:.0f} s are accepted)")
        if request.request_id in self._seen:
            raise OrderRefused(f"request {request.request_id!r} was already ordered (replay)")
        self._seen[request.request_id] = now

    def _digest(self, request: Any) -> bytes:
        unsigned = type(request)()
        unsigned.CopyFrom(request)
        unsigned.ClearField("grant_signature")
        body = unsigned.SerializeToString(deterministic=True)
        return hmac.new(self.secret.encode(), body, hashlib.sha256).digest()

    def _forget_before(self, oldest: float) -> None:
        while self._seen and next(iter(self._seen.values())) < oldest:
            self._seen.popitem(last=False)
