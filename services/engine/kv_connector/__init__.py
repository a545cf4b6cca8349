"""The KV connector: everything of moving a request's KV between engines, behind two sides.

- Scheduler side (``scheduler_side.KVConnectorScheduler``): which requests' KV
  arrives from a peer (their blocks reserved, not scheduled until it lands), which
  finished requests are still being sent (their blocks kept), and when those
  blocks may be freed. The engine calls it at fixed points: reserve, landed,
  cancel, on_finished, release.
- Worker side: ``worker_side.LayerSender`` (a rank tells it each step's rows and
  block tables; it returns the per-layer hook that sends a layer once it is
  written) and ``transfers.KVTransfers`` (the transfer agent's progress loop and
  completion notifications).

The transport itself (NIXL agent over the KV-cache shard, descriptors, the fake
for unit tests) is ``pdserve.engine.kv_transfer``; the P/D roles
(``pdserve.prefill``, ``pdserve.decode``) are RPC glue around these sides.
"""
from pdserve.engine.kv_connector.scheduler_side import KVConnectorScheduler
from pdserve.engine.kv_connector.transfers import (KVTransfers, ProgressConfig, TransferClosed, decode_done,
                                                   encode_done)
from pdserve.engine.kv_connector.worker_side import LayerHook, LayerSender

__all__ = ["KVConnectorScheduler", "KVTransfers", "LayerHook", "LayerSender", "ProgressConfig", "TransferClosed",
           "decode_done", "encode_done"]
