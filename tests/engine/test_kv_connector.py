"""The KV connector's scheduler side on its own (a real block manager, no model): reservations
for arriving KV, landing, cancelling, holding finished requests' blocks while they are sent."""
from __future__ import annotations

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.kv_cache import KVCacheManager
from pdserve.engine.kv_connector import KVConnectorScheduler
from pdserve.engine.request import Request

PARAMS = SamplingParams(max_tokens=4)


def _req(rid: str, n: int, hold: bool = False) -> Request:
    req = Request(rid, list(range(1, n + 1)), PARAMS)
    req.hold_kv = hold
    return req


def test_a_reservation_covers_the_prompt_and_lands_as_computed():
    kv = KVCacheManager(8, 4)
    side = KVConnectorScheduler(kv)
    req = _req("a", 10)
    blocks, cached = side.reserve(req)
    assert len(blocks) == 3 and cached == 0 and side.is_arriving("a") and kv.stats()["used"] == 3
    landed = side.landed("a")
    assert landed is req and req.num_computed_tokens == 10 and not side.is_arriving("a")
    assert side.num_arriving == 0 and kv.stats()["used"] == 3  # the blocks go with the request


def test_a_reservation_that_does_not_fit_holds_nothing():
    kv = KVCacheManager(2, 4)
    side = KVConnectorScheduler(kv)
    assert side.reserve(_req("big", 12)) is None
    assert kv.stats()["used"] == 0 and not kv.has("big") and side.num_arriving == 0


def test_prefix_hits_are_not_sent_again():
    kv = KVCacheManager(8, 4)
    first = _req("a", 9)
    kv.allocate_slots("a", 9)
    kv.commit_full_blocks("a", first.token_ids, 9)
    kv.free("a")  # its two full blocks stay cached
    side = KVConnectorScheduler(kv)
    blocks, cached = side.reserve(_req("b", 10))
    assert cached == 8 and len(blocks) == 3


def test_cancel_hands_the_request_back_and_unknown_ids_are_ignored():
    kv = KVCacheManager(8, 4)
    side = KVConnectorScheduler(kv)
    req = _req("a", 5)
    side.reserve(req)
    assert side.cancel("a") is req and side.cancel("a") is None and side.cancel("never") is None
    kv.free("a")  # the engine ends it and frees the blocks
    assert kv.stats()["used"] == 0


def test_finished_requests_that_send_their_kv_keep_blocks_until_released():
    kv = KVCacheManager(8, 4)
    side = KVConnectorScheduler(kv)
    plain, sending = _req("p", 5), _req("s", 5, hold=True)
    for req in (plain, sending):
        kv.allocate_slots(req.req_id, 5)
    assert side.on_finished(plain) is True and not side.is_sending("p")
    assert side.on_finished(sending) is False and side.is_sending("s") and side.num_sending == 1
    assert side.release("s") and not kv.has("s") and not side.release("s")


# ---- the rank side (a tensor-parallel worker's rank posts its own writes) ----------------------

class _Written:
    def query(self) -> bool:
        return True


def _rank_pair(decode_tp: int = 1):
    """A rank endpoint over a fake agent (2 KV heads, tp=1) and the decode worker's fake ranks."""
    import torch

    from pdserve.engine.kv_connector.rank_side import RankKVEndpoint
    from pdserve.engine.kv_transfer.fake import FakeKVRegistry, FakeKVTransferAgent

    registry = FakeKVRegistry()
    src = torch.randn(2, 8, 2, 4, 2, 4)
    endpoint = RankKVEndpoint(FakeKVTransferAgent("P", src, "m", registry))
    ranks = [FakeKVTransferAgent("D" if r == 0 else f"D.r{r}", torch.zeros(2, 8, 2, 4, 2 // decode_tp, 4), "m",
                                 registry, tp_size=decode_tp, tp_rank=r, total_kv_heads=2) for r in range(decode_tp)]
    for rank in ranks:
        endpoint.handle(("add_peer", rank.name, rank.metadata()))
    return endpoint, src, ranks


def _rows(rid: str):
    from pdserve.engine.plan import KVSendOrder, PlannedRow

    return (PlannedRow(rid, 0, (1, 2, 3, 4, 5), True),), [[3, 4]], [KVSendOrder("D", (6, 7), 0)]


def test_a_rank_sends_its_heads_layer_by_layer_and_reports_the_job():
    import torch

    endpoint, src, (d0, d1) = _rank_pair(decode_tp=2)
    hook = endpoint.begin_step(*_rows("a"))
    for layer in range(2):
        hook(layer, _Written())
    events = endpoint.poll()
    assert [e[:3] for e in events] == [("job", "a", "DONE")]
    assert events[0][4] == 2 * 2 * src[0, 0].numel() * 4  # 2 layers x 2 blocks, every head once, float32
    assert torch.equal(d0.kv[:, 6:8], src[:, 3:5, :, :, 0:1]) and torch.equal(d1.kv[:, 6:8], src[:, 3:5, :, :, 1:2])
    assert not endpoint.busy


def test_a_cancel_before_the_step_answers_at_once_and_the_step_sends_nothing():
    endpoint, _, (d0,) = _rank_pair()
    endpoint.handle(("cancel", "a"))
    assert [e[:3] for e in endpoint.poll()] == [("job", "a", "ABORTED")]
    assert endpoint.begin_step(*_rows("a")) is None and float(d0.kv.abs().sum()) == 0.0


def test_a_cancel_mid_job_stops_later_layers_and_answers_once_writes_are_over():
    endpoint, _, (d0,) = _rank_pair()
    endpoint.agent.pause()
    hook = endpoint.begin_step(*_rows("a"))
    hook(0, _Written())
    endpoint.handle(("cancel", "a"))
    hook(1, _Written())  # cancelled: not posted
    assert endpoint.poll() == [] and endpoint.busy  # layer 0's write is still in flight
    endpoint.agent.resume()
    assert [e[:3] for e in endpoint.poll()] == [("job", "a", "ABORTED")]
    assert float(d0.kv[1].abs().sum()) == 0.0 and float(d0.kv[0, 6:8].abs().sum()) > 0
