"""Property tests of the router's gRPC Generate (hypothesis): any field values, and
any bytes, get OK or a clear INVALID_ARGUMENT / NOT_FOUND / UNAVAILABLE, never
UNKNOWN or INTERNAL (a crash in the router), and the router keeps serving. A
request that breaks a documented rule (written out here, independently of the
router's code) is never accepted.

The router under test runs on the in-process cluster with a small max_tokens cap,
so requests that do generate finish in milliseconds.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc

from pdserve.router.app import RouterProcess
from pdserve.router.validation import INT32_MAX, INT64_MAX, ROLES
from tests.services.clients import generate, router_stub
from tests.services.inproc import InProcessCluster, running_cluster
from tests.services.test_router_validation import start_router

ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE}
CAP = 8
FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def cluster() -> Iterator[InProcessCluster]:
    yield from running_cluster(num_workers=1)


@pytest.fixture(scope="module")
def router(cluster: InProcessCluster) -> Iterator[RouterProcess]:
    r = start_router(cluster, max_tokens_cap=CAP, default_max_tokens=4)
    try:
        yield r
    finally:
        cluster.call(r.stop(0.5))


@pytest.fixture(scope="module")
def channel(router: RouterProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{router.grpc_port}") as ch:
        yield ch


def small_or_any(low: int, high: int, small: int) -> st.SearchStrategy[int]:
    """Mostly values a request may use, sometimes anything the wire type holds."""
    return st.one_of(st.integers(low, min(high, small)), st.integers(-INT32_MAX - 1, high))


floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
unit_floats = st.one_of(st.floats(0.0, 1.0, width=32), floats32)
params = st.fixed_dictionaries({}, optional={
    "max_tokens": small_or_any(1, INT32_MAX, CAP + 2),
    "temperature": st.one_of(st.floats(0.0, 2.0, width=32), floats32),
    "top_k": small_or_any(-1, INT32_MAX, 50),
    "top_p": unit_floats,
    "min_p": unit_floats,
    "repetition_penalty": st.one_of(st.floats(0.5, 2.0, width=32), floats32),
    "presence_penalty": st.one_of(st.floats(-2.0, 2.0, width=32), floats32),
    "frequency_penalty": st.one_of(st.floats(-2.0, 2.0, width=32), floats32),
    "seed": st.integers(-INT64_MAX - 1, INT64_MAX),
    "stop": st.lists(st.text(max_size=4), max_size=20),
    "stop_token_ids": st.lists(st.integers(-INT32_MAX - 1, INT32_MAX), max_size=4),
    "ignore_eos": st.booleans(),
    "logprobs": small_or_any(0, INT32_MAX, 22),
    "include_stop_str_in_output": st.booleans(),
})
message = st.builds(router_pb2.ChatMessage, role=st.sampled_from(ROLES + ("tool", "", "USER")),
                    content=st.text(max_size=30))
prompt = st.one_of(
    st.just({}),
    st.builds(lambda t: {"text": t}, st.text(max_size=40)),
    st.builds(lambda ms: {"chat": router_pb2.ChatMessages(messages=ms)}, st.lists(message, max_size=4)),
    st.builds(lambda ids: {"token_ids": router_pb2.TokenIds(ids=ids)},
              st.lists(st.one_of(st.integers(0, 49151), st.integers(-INT32_MAX - 1, INT32_MAX)), max_size=12)),
)
requests = st.builds(
    lambda p, values, model, rid, stream: router_pb2.GenerateRequest(
        **p, params=common_pb2.SamplingParams(**values), model=model, request_id=rid, stream=stream),
    prompt, params, st.one_of(st.sampled_from(["", "smollm2", "nope"]), st.text(max_size=12)),
    st.text(max_size=16), st.booleans())


# The documented ranges: (low, high, low_open); an independent oracle for the router's validation.
RULES = {"max_tokens": (1, CAP, False), "top_k": (-1, INT32_MAX, False), "seed": (0, INT64_MAX, False),
         "logprobs": (0, 20, False), "temperature": (0.0, 3.5e38, False), "top_p": (0.0, 1.0, True),
         "min_p": (0.0, 1.0, False), "repetition_penalty": (0.0, 3.5e38, True),
         "presence_penalty": (-2.0, 2.0, False), "frequency_penalty": (-2.0, 2.0, False)}


def broken_rule(request: router_pb2.GenerateRequest) -> str | None:
    """The first documented rule the request breaks, if any."""
    p = request.params
    for name, (low, high, low_open) in RULES.items():
        if p.HasField(name):
            value = getattr(p, name)
            if not (math.isfinite(value) and (low < value if low_open else low <= value) and value <= high):
                return name
    if p.HasField("top_k") and p.top_k == 0:
        return "top_k"
    if any(t < 0 for t in p.stop_token_ids) or any(not s for s in p.stop) or len(p.stop) > 16:
        return "stop"
    if request.WhichOneof("prompt") == "chat":
        if any(m.role not in ROLES for m in request.chat.messages):
            return "role"
    return None


def outcome(call: Any) -> tuple[grpc.StatusCode, str]:
    """The status of a Generate call, reading its whole (short) stream."""
    try:
        for _ in call:
            pass
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        return err.code(), err.details() or ""


def assert_clear(code: grpc.StatusCode, details: str) -> None:
    event(code.name)  # --hypothesis-show-statistics shows how often each status came
    assert code == grpc.StatusCode.OK or code in ALLOWED, (code, details)
    if code != grpc.StatusCode.OK:
        assert details.strip(), code


@FUZZ
@given(request=requests)
def test_generate_fields_get_ok_or_a_clear_error(channel: grpc.Channel, request: router_pb2.GenerateRequest) -> None:
    code, details = outcome(router_pb2_grpc.RouterStub(channel).Generate(request, timeout=30))
    assert_clear(code, details)
    rule = broken_rule(request)
    if rule is not None:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (rule, code, details)


@FUZZ
@given(raw=st.one_of(st.binary(max_size=64), requests.map(lambda r: r.SerializeToString()[:-1])))
def test_generate_any_bytes_get_ok_or_a_clear_error(channel: grpc.Channel, raw: bytes) -> None:
    call = channel.unary_stream("/pdserve.v1.Router/Generate", request_serializer=None, response_deserializer=None)
    assert_clear(*outcome(call(raw, timeout=30)))


def test_router_still_serves_after_fuzzing(router: RouterProcess) -> None:
    (only,) = generate(router_stub(f"127.0.0.1:{router.grpc_port}"), stream=False,
                       token_ids=router_pb2.TokenIds(ids=[1000]), params={"max_tokens": 3})
    assert list(only.token_ids) == [1001, 1002, 1003]
