"""Remote-prefill orders are signed by the decode worker and checked by the prefill worker."""
from __future__ import annotations

import pytest

from pdserve.cluster.orders import OrderBook, OrderRefused
from pdserve.v1 import worker_pb2


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _order(rid: str = "r#p0", prefill: str = "p1") -> worker_pb2.RemotePrefillRequest:
    return worker_pb2.RemotePrefillRequest(request_id=rid, prompt_token_ids=[1, 2, 3], decode_kv_agent="d1",
                                           block_ids=[4, 5], num_cached_tokens=0, decode_kv_incarnation="abc",
                                           prefill_worker_id=prefill)


def _books(clock: Clock) -> tuple[OrderBook, OrderBook]:
    return OrderBook("s3cret", "d1", clock=clock), OrderBook("s3cret", "p1", clock=clock)


def test_a_signed_order_passes_once() -> None:
    decode, prefill = _books(Clock())
    order = _order()
    decode.sign(order)
    prefill.check(order)
    with pytest.raises(OrderRefused, match="replay"):
        prefill.check(order)


@pytest.mark.parametrize("tamper", [
    lambda o: o.block_ids.append(6),  # a block the decode worker did not reserve for it
    lambda o: setattr(o, "request_id", "other#p0"),
    lambda o: setattr(o, "decode_kv_agent", "d2"),
    lambda o: o.prompt_token_ids.__setitem__(0, 9),  # other KV content for the same blocks
    lambda o: setattr(o, "num_cached_tokens", 16),
    lambda o: setattr(o, "issued_at_unix", o.issued_at_unix + 1),
])
def test_an_altered_order_is_refused(tamper) -> None:
    decode, prefill = _books(Clock())
    order = _order()
    decode.sign(order)
    tamper(order)
    with pytest.raises(OrderRefused, match="signature"):
        prefill.check(order)


def test_unsigned_foreign_stale_and_misdirected_orders_are_refused() -> None:
    clock = Clock()
    decode, prefill = _books(clock)
    with pytest.raises(OrderRefused, match="not signed"):
        prefill.check(_order())
    foreign = _order()
    OrderBook("other cluster", "d1", clock=clock).sign(foreign)
    with pytest.raises(OrderRefused, match="signature"):
        prefill.check(foreign)
    misdirected = _order(prefill="p2")
    decode.sign(misdirected)
    with pytest.raises(OrderRefused, match="names prefill worker 'p2'"):
        prefill.check(misdirected)
    stale = _order("old#p0")
    decode.sign(stale)
    clock.now += 301
    with pytest.raises(OrderRefused, match="issued 301 s ago"):
        prefill.check(stale)


def test_seen_ids_are_forgotten_once_their_orders_are_too_old_anyway() -> None:
    clock = Clock()
    decode, prefill = _books(clock)
    for i in range(3):
        order = _order(f"r{i}#p0")
        decode.sign(order)
        prefill.check(order)
        clock.now += 200
    assert len(prefill._seen) == 2  # r0 (400 s old) dropped: its order would be refused as stale


def test_no_secret_means_no_signing_and_no_checking() -> None:
    book = OrderBook()
    order = _order()
    book.sign(order)
    assert not order.grant_signature
    book.check(order)
