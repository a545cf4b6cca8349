"""The vLLM-style ``pdserve:*`` request metrics of a worker with a real engine (a tiny random
llama on the CPU, etcd as a child process, the worker on an event loop in a background
thread): histogram counts per request, time to first token within the end-to-end latency,
queue + prefill = time to first token, token counters, finish reasons, gauges; the
engine's first-scheduled timestamps (local prefill, and a remote reservation's); and a
decode worker's split of a remote prefill (a 1P1D cluster of child processes).

``running_worker`` is shared with ``test_grafana_dashboard``.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Any, Coroutine, Iterator

import grpc
import pytest
from pdserve.v1 import common_pb2, worker_pb2
from prometheus_client.parser import text_string_to_metric_families

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.config import EngineConfig
from pdserve.launcher.etcd_server import start_etcd
from pdserve.launcher.processes import ProcessGroup
from pdserve.worker.config import WorkerConfig
from pdserve.worker.process import WorkerProcess
from tests.disagg.helpers import metrics, router_generate, stats, workers
from tests.engine.conftest import make_tiny_model
from tests.services.clients import wait_for, worker_stub
from tests.services.cluster_fixture import local_cluster

pytestmark = pytest.mark.timeout(120)
WORKER_ID = "metrics-0"
PER_REQUEST = ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
               "request_prefill_time_seconds", "request_decode_time_seconds", "request_prompt_tokens",
               "request_generation_tokens")


@dataclass
class LiveWorker:
    """A started ``WorkerProcess``; ``call(coro)`` runs a coroutine on its loop."""

    worker: WorkerProcess
    model: str
    loop: asyncio.AbstractEventLoop

    def call(self, coro: Coroutine, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.worker.grpc_port}"

    def metrics_text(self) -> str:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{self.worker.metrics_server.port}/metrics", timeout=5) as response:
            return response.read().decode()

    def samples(self) -> dict[tuple[str, tuple], float]:
        """Every sample as {(name, sorted labels): value}."""
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(self.metrics_text()) for s in family.samples}

    def generate(self, ids: list[int], max_tokens: int, **params: Any) -> list[worker_pb2.WorkerGenerateResponse]:
        request = worker_pb2.WorkerGenerateRequest(
            request_id=f"m-{time.monotonic_ns()}", prompt_token_ids=ids,
            params=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, **params))
        return list(worker_stub(self.grpc_address).Generate(request, timeout=60))


@contextlib.contextmanager
def running_worker(directory: str) -> Iterator[LiveWorker]:
    """etcd + one hybrid worker around a real engine on a tiny random llama (no KV transfer agent)."""
    model = make_tiny_model("llama", directory)
    group, loop = ProcessGroup(), asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    etcd = start_etcd(group, directory)
    thread.start()
    live: LiveWorker | None = None
    try:
        config = WorkerConfig(engine=EngineConfig(model=model, num_blocks=64, max_batch_size=8), etcd=etcd.url,
                              host="127.0.0.1", advertise_host="127.0.0.1", worker_id=WORKER_ID, drain_timeout=2.0,
                              lease_ttl=2, kv_transfer=False)
        live = LiveWorker(WorkerProcess(config, AsyncEngine(config.engine)), model, loop)
        live.call(live.worker.start())
        yield live
    finally:
        if live is not None:
            with contextlib.suppress(Exception):
                live.call(live.worker.close(), timeout=15.0)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5.0)
        etcd.stop()
        group.stop_all(2.0)


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[LiveWorker]:
    with running_worker(str(tmp_path_factory.mktemp("request-metrics"))) as worker:
        yield worker


def serving(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples of ``pdserve:<name>`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == f"pdserve:{name}" and want <= set(lab))


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return serving(after, name, **labels) - serving(before, name, **labels)


def test_histograms_counters_and_reasons(live: LiveWorker) -> None:
    before = live.samples()
    first = live.generate(list(range(100, 105)), 6, ignore_eos=True)
    second = live.generate(list(range(300, 320)), 4, ignore_eos=True)
    stop_at = first[0].token_ids[0]  # greedy: the same prompt stops at its first token
    stopped = live.generate(list(range(100, 105)), 6, stop_token_ids=[stop_at])
    after = live.samples()

    assert [r.finish_reason for r in (first[-1], second[-1], stopped[-1])] == ["length", "length", "stop"]
    generated = [sum(len(r.token_ids) for r in out) for out in (first, second, stopped)]
    assert generated == [6, 4, 1]
    for name in PER_REQUEST:
        assert delta(before, after, f"{name}_count") == 3, name
    assert delta(before, after, "time_per_output_token_seconds_count") == sum(n - 1 for n in generated)
    ttft = delta(before, after, "time_to_first_token_seconds_sum")
    e2e = delta(before, after, "e2e_request_latency_seconds_sum")
    queue = delta(before, after, "request_queue_time_seconds_sum")
    prefill = delta(before, after, "request_prefill_time_seconds_sum")
    decode = delta(before, after, "request_decode_time_seconds_sum")
    assert 0 < ttft <= e2e and queue >= 0 and prefill > 0
    assert queue + prefill == pytest.approx(ttft, abs=1e-6)
    assert ttft + decode == pytest.approx(e2e, abs=1e-6)
    assert delta(before, after, "time_per_output_token_seconds_sum") <= decode
    assert delta(before, after, "prompt_tokens_total") == 5 + 20 + 5
    assert delta(before, after, "request_prompt_tokens_sum") == 5 + 20 + 5
    assert delta(before, after, "generation_tokens_total") == sum(generated)
    assert delta(before, after, "request_generation_tokens_sum") == sum(generated)
    assert delta(before, after, "request_success_total", finished_reason="length") == 2
    assert delta(before, after, "request_success_total", finished_reason="stop") == 1
    assert delta(before, after, "request_success_total") == 3


def test_labels_and_gauges(live: LiveWorker) -> None:
    live.generate([7, 8, 9], 2)
    samples = live.samples()
    labels = {"model_name": live.model, "worker_id": WORKER_ID, "role": "hybrid"}
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "time_to_first_token_seconds_count", "generation_tokens_total"):
        keys = [lab for (n, lab) in samples if n == f"pdserve:{name}"]
        assert keys and all(labels.items() <= set(lab) for lab in keys), name
    assert serving(samples, "num_requests_running") == 0 and serving(samples, "num_requests_waiting") == 0
    assert 0 <= serving(samples, "kv_cache_usage_perc") <= 1


def test_cancelled_stream_counts_as_abort(live: LiveWorker) -> None:
    before = live.samples()
    request = worker_pb2.WorkerGenerateRequest(
        request_id="m-cancel", prompt_token_ids=[5, 6, 7],
        params=common_pb2.SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True))
    call = worker_stub(live.grpc_address).Generate(request, timeout=60)
    next(call)
    call.cancel()
    with pytest.raises(grpc.RpcError):
        list(call)
    deadline = time.monotonic() + 10
    while delta(before, live.samples(), "request_success_total", finished_reason="abort") < 1:
        assert time.monotonic() < deadline, "the cancelled stream was not counted"
        time.sleep(0.05)
    after = live.samples()
    assert delta(before, after, "e2e_request_latency_seconds_count") == 1
    assert delta(before, after, "time_to_first_token_seconds_count") == 1


def test_engine_stamps_first_scheduled(live: LiveWorker) -> None:
    engine: AsyncEngine = live.worker.engine
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)

    async def local() -> tuple[float, float | None, float]:
        sent = time.monotonic()
        outs = [out async for out in engine.generate("stamp-local", [11, 12, 13], params)]
        return sent, outs[0].scheduled_time, time.monotonic()

    async def remote() -> tuple[float, float | None, float]:
        sent = time.monotonic()
        assert await engine.reserve_remote("stamp-remote", list(range(40, 80)), params) is not None
        reserved = time.monotonic()
        await asyncio.sleep(0.05)  # the peer's prefill would run here
        outs = [out async for out in engine.admit_remote("stamp-remote", 5)]
        assert {o.scheduled_time for o in outs} == {outs[0].scheduled_time}
        return sent, outs[0].scheduled_time, reserved

    sent, scheduled, done = live.call(local())
    assert scheduled is not None and sent <= scheduled <= done
    sent, scheduled, reserved = live.call(remote())
    assert scheduled is not None and sent <= scheduled <= reserved


def test_decode_worker_times_a_remote_prefill(live: LiveWorker, tmp_path) -> None:
    with local_cluster(hybrid=0, prefill=1, decode=1, model=live.model, log_dir=str(tmp_path)) as cluster:
        wait_for(lambda: all(stats(w).kv_peers >= 1 for w in workers(cluster)), 30.0, what="KV peers loaded")
        responses = router_generate(cluster, list(range(200, 300)), 4)  # above the local-prefill threshold
        assert next(r for r in responses if r.token_ids).prefill_worker_id.startswith("prefill-")
        # NOTE: the decode worker records a request's histograms when its stream closes, which may
        # be just after the router has passed the last token on
        decode_worker = workers(cluster, "decode")[0]
        wait_for(lambda: serving(metrics(decode_worker), "request_prefill_time_seconds_count") >= 1, 10.0,
                 what="the request's histograms on the decode worker")
        decode = metrics(decode_worker)
        prefill = metrics(workers(cluster, "prefill")[0])
    assert serving(decode, "request_prefill_time_seconds_count") == 1
    ttft = serving(decode, "time_to_first_token_seconds_sum")
    queue = serving(decode, "request_queue_time_seconds_sum")
    remote = serving(decode, "request_prefill_time_seconds_sum")
    assert 0 < remote <= ttft and queue + remote == pytest.approx(ttft, abs=1e-6)
    assert serving(decode, "prompt_tokens_total") == 100 and serving(decode, "generation_tokens_total") == 4
    assert serving(prefill, "time_to_first_token_seconds_count") == 0  # it served no Generate stream
