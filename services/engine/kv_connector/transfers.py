"""The KV connector's worker side, transport half: the agent's progress loop and the
completion notifications of transfers.

Owns: the progress task of one KV transfer agent (the agent itself is built over
the rank's KV-cache shard by the worker and handed in), the waiters for
completion notifications (by request id, each from the one sender it was ordered
from), and the wire form of a notification. Torch-free: only the agent's
interface is called.

Lifecycle: ``KVTransfers(agent)`` -> ``start()`` starts the progress task ->
``expect(rid, sender)`` / ``forget(rid)`` per remote prefill (decode side),
``busy()`` around a send (prefill side) -> ``close()`` stops the task, fails the
waiters and closes the agent (fails what is in flight).

Progress: no thread. One asyncio task calls ``get_notifications()`` (which
progresses every transfer) every ``busy_poll`` seconds while anything is in
flight (a waiter, an active sender, and ``busy_linger`` seconds after a sender
is done, so its last notification leaves at once) and every ``idle_poll``
seconds otherwise, so an idle worker costs ~0 CPU.

NOTE: every agent call happens on the event loop thread that owns this object.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Iterator

log = logging.getLogger(__name__)
NOTIFY_VERSION = 1


class TransferClosed(Exception):
    """The worker's KV transfer agent closed before the awaited notification came."""


@dataclass(frozen=True)
class ProgressConfig:
    busy_poll: float = 0.001
    idle_poll: float = 0.1
    busy_linger: float = 0.05

    def __post_init__(self) -> None:
        if not 0 < self.busy_poll <= self.idle_poll:
            raise ValueError(f"ProgressConfig: need 0 < busy_poll ({self.busy_poll}) <= idle_poll ({self.idle_poll})")
        if self.busy_linger < 0:
            raise ValueError(f"ProgressConfig: busy_linger ({self.busy_linger}) must be >= 0")


def encode_done(request_id: str, first_token: int) -> bytes:
    """The completion notification: every block of ``request_id`` has landed."""
    return json.dumps({"v": NOTIFY_VERSION, "rid": request_id, "first": first_token}).encode()


def decode_done(msg: bytes) -> tuple[str, int] | None:
    try:
        body = json.loads(msg)
        return str(body["rid"]), int(body["first"])
    except (ValueError, KeyError, TypeError):
        return None


class KVTransfers:
    def __init__(self, agent: Any, config: ProgressConfig = ProgressConfig()) -> None:
        self.agent = agent
        self._config = config
        self._waiters: dict[str, tuple[asyncio.Future[int], str]] = {}  # request id -> (future, sender)
        self._busy = 0
        self._linger_until = 0.0  # loop time until which a finished sender still polls fast
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="kv-transfers-progress")

    async def close(self) -> None:
        if self._task is not None:
            # NOTE: the flag as well as the cancel: asyncio.wait_for (3.11) can swallow a
            # cancel that arrives as the event it waits for is set (e.g. by ``expect``).
            self._closing = True
            self._wake.set()
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=1.0)
            self._task = None
        for fut, _ in self._waiters.values():
            if not fut.done():
                fut.set_exception(TransferClosed("the worker's KV transfer agent closed"))
        self.agent.close()

    # ---- decode side: completions ----------------------------------------------------
    def expect(self, request_id: str, sender: str) -> asyncio.Future[int]:
        """A future resolved with the first token when ``sender`` (a KV agent name) says
        ``request_id``'s KV has landed; a notification from any other agent is refused."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = (fut, sender)
        self._wake.set()
        return fut

    def forget(self, request_id: str) -> None:
        fut, _ = self._waiters.pop(request_id, (None, ""))
        if fut is not None and not fut.done():
            fut.cancel()

    # ---- prefill side: sends -----------------------------------------------------------
    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Poll fast while the block runs (a sender with writes in flight)."""
        self._busy += 1
        self._wake.set()
        try:
            yield
        finally:
            self._busy -= 1
            self._linger_until = asyncio.get_running_loop().time() + self._config.busy_linger

    def notify_done(self, peer: str, request_id: str, first_token: int) -> None:
        """Tell ``peer`` every block of ``request_id`` has landed (after its writes are DONE)."""
        self.agent.send_notify(peer, encode_done(request_id, first_token))

    # ---- the loop ------------------------------------------------------------------------
    async def _run(self) -> None:
        while not self._closing:
            try:
                for sender, msg in self.agent.get_notifications():
                    self._deliver(sender, msg)
            except Exception:  # NOTE: the progress task must outlive any one bad tick
                log.exception("KV progress tick failed")
            if self._waiters or self._busy or asyncio.get_running_loop().time() < self._linger_until:
                await asyncio.sleep(self._config.busy_poll)
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._config.idle_poll)

    def _deliver(self, sender: str, msg: bytes) -> None:
        parsed = decode_done(msg)
        if parsed is None:
            log.warning("ignoring a malformed KV notification from %s: %r", sender, msg[:80])
            return
        request_id, first = parsed
        fut, expected = self._waiters.get(request_id, (None, ""))
        if fut is None or fut.done():
            log.info("KV notification for %s from %s arrived after the request moved on", request_id, sender)
            return
        if sender != expected:
            log.warning("refusing a KV notification for %s from %s: this worker ordered it from %s",
                        request_id, sender, expected)
            return
        del self._waiters[request_id]
        fut.set_result(first)


__all__ = ["KVTransfers", "ProgressConfig", "TransferClosed", "decode_done", "encode_done"]
