"""The worker's disaggregation parts and their wire conversions, for the servicer.

Owns no lifecycle: ``RemoteRoles`` bundles what ``process`` built for this
worker's role (the KV peers, the KV connector's transfers, the prefill server of
a prefill/hybrid worker, the decode coordinator of a decode/hybrid worker); the functions convert between
``pdserve.v1`` messages and the prefill server's Python values and run the
debug hooks.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pdserve.v1 import worker_pb2

from pdserve.cluster.wire import params_from_proto

if TYPE_CHECKING:  # NOTE: only for types: the servicer must import without torch
    from pdserve.cluster.kv_peers import KVPeers
    from pdserve.cluster.orders import OrderBook
    from pdserve.decode.coordinator import DecodeCoordinator
    from pdserve.engine.kv_connector import KVTransfers
    from pdserve.prefill.server import PrefillServer


@dataclass(frozen=True)
class RemoteRoles:
    peers: "KVPeers | None" = None
    transfers: "KVTransfers | None" = None
    prefill: "PrefillServer | None" = None
    decode: "DecodeCoordinator | None" = None
    debug: bool = False
    abort_timeout: float = 30.0
    orders: "OrderBook | None" = None  # checks RemotePrefill orders

    def stats(self) -> dict[str, Any]:
        """The disaggregation fields of ``StatsResponse``."""
        out: dict[str, Any] = {}
        if self.peers is not None:
            out["kv_peers"] = self.peers.peer_count()
            out["kv_peer_errors"] = sorted(self.peers.errors.values())
        if self.decode is not None:
            out.update(prefills_local=self.decode.counts["local"], prefills_remote=self.decode.counts["remote"],
                       remote_reservations=self.decode.reservations)
        if self.prefill is not None:
            out.update(remote_prefills_active=self.prefill.active, remote_prefills_sending=self.prefill.sending)
        return out


def order_from_proto(msg: worker_pb2.RemotePrefillRequest) -> Any:
    """Raises ValueError on bad sampling parameters or a malformed handshake."""
    from pdserve.prefill.server import PrefillOrder

    try:
        handshake = json.loads(msg.decode_kv_handshake or "{}")
    except ValueError:
        raise ValueError(f"decode_kv_handshake is not JSON: {msg.decode_kv_handshake[:80]!r}") from None
    if not isinstance(handshake, dict) or not msg.request_id or not msg.decode_kv_agent:
        raise ValueError("request_id, decode_kv_agent and a decode_kv_handshake object are required")
    return PrefillOrder(msg.request_id, list(msg.prompt_token_ids), params_from_proto(msg.params),
                        msg.decode_kv_agent, handshake, list(msg.block_ids), msg.num_cached_tokens,
                        msg.decode_kv_incarnation, msg.adapter or None)


def result_to_proto(result: Any) -> worker_pb2.RemotePrefillResponse:
    return worker_pb2.RemotePrefillResponse(
        status=worker_pb2.RemotePrefillResponse.Status.Value(result.status), error=result.error,
        first_token_id=result.first_token, num_blocks_sent=result.blocks_sent, num_bytes_sent=result.bytes_sent,
        num_cached_tokens=result.num_cached_tokens, compute_seconds=result.compute_seconds,
        tail_seconds=result.tail_seconds, transfer_seconds=result.transfer_seconds,
        write_seconds=result.write_seconds, handover_seconds=result.handover_seconds)


async def debug(engine: Any, roles: RemoteRoles, request: worker_pb2.DebugRequest) -> worker_pb2.DebugResponse:
    """Run the test hooks the request asks for (the caller checked they are enabled)."""
    poisoned = 0
    if request.poison_free_blocks:
        poisoned = await engine.call(_poison_free_blocks)
    if request.HasField("kv_delay_seconds") and roles.prefill is not None:
        roles.prefill.debug_delay = max(0.0, request.kv_delay_seconds)
    return worker_pb2.DebugResponse(poisoned_blocks=poisoned)


POISON = 1e6  # NOTE: finite: attention reads padding slots with zero weight, and 0 * NaN = NaN


def _poison_free_blocks(llm_engine: Any) -> int:
    """``POISON`` into every unreferenced block (engine thread, between steps)."""
    pool = llm_engine.kv.pool
    pool.reset_cache()  # NOTE: a cached prefix in a poisoned block would be a false hit
    free = [b for b in range(pool.num_blocks) if pool.ref_count(b) == 0]
    if free:
        llm_engine.kv_cache[:, free] = POISON
    return len(free)
