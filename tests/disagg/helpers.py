"""Shared pieces of the disaggregation tests: prompts of exact lengths, the offline
reference, worker Stats / Prometheus scraping, and waiting for a quiet cluster."""
from __future__ import annotations

import os
import urllib.request
from typing import Any, Iterable

import grpc
from pdserve.v1 import common_pb2, router_pb2, worker_pb2
from prometheus_client.parser import text_string_to_metric_families

from pdserve.launcher.cluster import LocalCluster
from tests.services.clients import live_workers, router_stub, wait_for, worker_stub

TEXT = (
    "The history of the city begins with a small settlement on the banks of a slow river. Farmers grew wheat "
    "and barley in the fertile fields, and traders came by boat to buy grain, wool and salt. Over the centuries "
    "the village became a market town with a stone bridge, a church and a busy square where people met every "
    "week. In the age of steam a railway arrived, factories rose along the water, and thousands of workers moved "
    "in from the countryside. Schools, hospitals and parks followed. Today the old mills are museums and "
    "apartments, the river is clean again, and visitors walk along the quays to watch the boats, eat in small "
    "restaurants and listen to musicians who play in the evening light. Scientists study the birds that nest "
    "in the reeds, children learn to swim in the summer, and every autumn the town holds a festival of lights. "
)
GREEDY = {"temperature": 0.0, "ignore_eos": True}
LAYERS, BLOCK_SIZE, BLOCK_BYTES = 30, 16, 2 * 16 * 3 * 64 * 4  # smollm2, float32: one (layer, block)


def corpus_ids(tokenizer: Any, min_tokens: int = 2500) -> list[int]:
    ids: list[int] = []
    while len(ids) < min_tokens:
        ids += tokenizer.encode(TEXT, add_special_tokens=False)
    return ids


def prompt(ids: list[int], length: int, offset: int = 0) -> list[int]:
    """``length`` natural tokens starting at ``offset`` (distinct offsets -> distinct first blocks)."""
    return ids[offset:offset + length]


class Reference:
    """Greedy outputs of the offline engine, computed once per prompt."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self._cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def tokens(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        from pdserve.common.sampling_params import SamplingParams

        todo = [p for p in prompts if (tuple(p), max_tokens) not in self._cache]
        if todo:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            for p, out in zip(todo, self.llm.generate(todo, params)):
                self._cache[(tuple(p), max_tokens)] = list(out.token_ids)
        return [self._cache[(tuple(p), max_tokens)] for p in prompts]


# ---- talking to the cluster ---------------------------------------------------------

def router_generate(cluster: LocalCluster, ids: list[int], max_tokens: int, timeout: float = 120.0,
                    **params: Any) -> list[router_pb2.GenerateResponse]:
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, **{**GREEDY, **params})
    request = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=ids), stream=True, params=sampling)
    return list(router_stub(cluster.grpc_address).Generate(request, timeout=timeout))


def tokens_of(responses: Iterable[Any]) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def worker_generate(address: str, ids: list[int], max_tokens: int, peers: list[dict] = (),
                    timeout: float = 120.0) -> list[worker_pb2.WorkerGenerateResponse]:
    request = worker_pb2.WorkerGenerateRequest(
        request_id=f"direct-{os.urandom(4).hex()}", prompt_token_ids=ids,
        params=common_pb2.SamplingParams(max_tokens=max_tokens, **GREEDY),
        prefill_peers=[worker_pb2.PrefillPeer(worker_id=p["id"], grpc_address=p["grpc_address"],
                                              kv_agent=p["kv_agent"]) for p in peers])
    return list(worker_stub(address).Generate(request, timeout=timeout))


def workers(cluster: LocalCluster, role: str | None = None) -> list[dict]:
    return [w for w in live_workers(cluster.http_url) if role is None or w["role"] == role]


def stats(worker: dict) -> worker_pb2.StatsResponse:
    return worker_stub(worker["grpc_address"]).Stats(worker_pb2.StatsRequest(), timeout=5)


def debug(worker: dict, **fields: Any) -> worker_pb2.DebugResponse:
    return worker_stub(worker["grpc_address"]).Debug(worker_pb2.DebugRequest(**fields), timeout=30)


def metrics(worker: dict) -> dict[tuple[str, tuple], float]:
    """Every sample of the worker's /metrics as {(name, sorted label items without ids): value}."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(worker["metrics_url"], timeout=5) as response:
        text = response.read().decode()
    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items()
                                  if k not in ("worker_id", "model", "role")))
            out[(sample.name, labels)] = out.get((sample.name, labels), 0.0) + sample.value
    return out


def metric(samples: dict, name: str, **labels: str) -> float:
    want = tuple(sorted(labels.items()))
    return sum(v for (n, lab), v in samples.items() if n == name and all(item in lab for item in want))


def kv_totals(cluster: LocalCluster) -> dict[str, float]:
    """Bytes and blocks sent (all prefill workers) and received (all decode workers)."""
    out = {"sent_bytes": 0.0, "sent_blocks": 0.0, "received_bytes": 0.0, "received_blocks": 0.0}
    for w in workers(cluster):
        m = metrics(w)
        for direction in ("sent", "received"):
            out[f"{direction}_bytes"] += metric(m, "pdserve_kv_transfer_bytes_total", direction=direction)
            out[f"{direction}_blocks"] += metric(m, "pdserve_kv_transfer_blocks_total", direction=direction)
    return out


def quiet(cluster: LocalCluster) -> bool:
    """No request, reservation or remote prefill anywhere, and every KV block free."""
    for w in workers(cluster):
        s = stats(w)
        if s.running or s.waiting or s.inflight_streams or s.kv_blocks_used or s.remote_reservations \
                or s.remote_prefills_active:
            return False
    return True


def wait_quiet(cluster: LocalCluster, timeout: float = 15.0, what: str = "every worker back to baseline") -> None:
    wait_for(lambda: quiet(cluster), timeout, interval=0.1, what=what)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rpc_code(call: Any) -> grpc.StatusCode:
    try:
        list(call)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK
