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
