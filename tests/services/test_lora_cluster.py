"""LoRA adapters through a real 1P1D cluster (etcd, router, prefill and decode workers, NIXL):
workers load adapters at start, the router lists them under their base model and routes a
request naming one to workers that have it, prefill computes with it and decode continues
with it (token-identical to the offline engine with the adapter), an unknown name is a 404;
adapters load and unload at run time through the router's vLLM-style endpoints and its gRPC API."""
from __future__ import annotations

import grpc
import openai
import pytest
from pdserve.v1 import router_pb2

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine import LLM
from tests.disagg.helpers import metric, metrics, workers
from tests.engine.conftest import make_tiny_model
from tests.engine.test_lora import ADAPTERS, make_adapter
from tests.services.cluster_fixture import local_cluster
from tests.services.clients import http_json, router_stub

pytestmark = pytest.mark.timeout(600)
MAX_TOKENS = 8


def test_adapters_through_prefill_and_decode(tmp_path):
    base = make_tiny_model("llama", str(tmp_path))
    paths = {name: make_adapter(base, str(tmp_path / name), *ADAPTERS[name], seed=i)
             for i, name in enumerate(("qv", "all", "mlp"))}
    spec = ",".join(f"{n}={paths[n]}" for n in ("qv", "all"))  # mlp is loaded at run time
    prompt = list(range(200, 260))  # above the local-prefill threshold: computed on the prefill worker
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    offline = LLM(base, num_blocks=64, adapters=tuple(f"{n}={p}" for n, p in paths.items()))
    expected = {name: offline.generate([prompt], params, adapter=name)[0].text for name in (None, *paths)}
    assert len(set(expected.values())) == 4
    with local_cluster(hybrid=0, prefill=1, decode=1, model=base, log_dir=str(tmp_path / "logs"),
                       worker_args=("--adapters", spec)) as cluster:
        status, models = http_json(f"{cluster.http_url}/v1/models")
        listed = {m["id"]: m["parent"] for m in models["data"]}
        assert status == 200 and listed == {base: None, "qv": base, "all": base}, models
        prefill = workers(cluster, "prefill")[0]
        client = openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key="none", max_retries=0, timeout=120)
        for name in (None, "qv", "all"):
            before = metric(metrics(prefill), "pdserve_kv_transfer_bytes_total", direction="sent")
            out = client.completions.create(model=name or base, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                            extra_body={"ignore_eos": True})
            assert out.model == (name or base) and out.choices[0].text == expected[name], name
            assert metric(metrics(prefill), "pdserve_kv_transfer_bytes_total", direction="sent") > before, name
        decode = workers(cluster, "decode")[0]
        samples = metrics(decode)
        assert metric(samples, "pdserve_worker_lora_adapters_loaded") == 2
        assert metric(samples, "pdserve_worker_lora_adapters_resident") == 2  # qv and all, each used once
        assert metric(samples, "pdserve_worker_lora_swaps_total") == 2
        assert metric(samples, "pdserve_worker_lora_requests_total", adapter="qv") == 1
        with pytest.raises(openai.NotFoundError) as info:
            client.completions.create(model="nope", prompt=prompt, max_tokens=2)
        assert info.value.body["code"] == "model_not_found" and "adapters: ['all', 'qv']" in info.value.body["message"]

        # at run time: load on every worker, serve through P/D, refuse a bad one (nothing changes), unload
        status, reply = http_json(f"{cluster.http_url}/v1/load_lora_adapter",
                                  {"lora_name": "mlp", "lora_path": paths["mlp"]})
        assert status == 200 and set(reply["workers"].values()) == {"ok"} and len(reply["workers"]) == 2, reply
        out = client.completions.create(model="mlp", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == expected["mlp"]
        status, reply = http_json(f"{cluster.http_url}/v1/load_lora_adapter",
                                  {"lora_name": "broken", "lora_path": str(tmp_path / "missing")})
        assert status == 400 and reply["error"]["param"] == "lora_path" and "broken" in reply["error"]["message"]
        status, models = http_json(f"{cluster.http_url}/v1/models")
        assert sorted(m["id"] for m in models["data"]) == sorted([base, "qv", "all", "mlp"])
        status, reply = http_json(f"{cluster.http_url}/v1/unload_lora_adapter", {"lora_name": "mlp"})
        assert status == 200, reply
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="mlp", prompt=prompt, max_tokens=2)
        status, reply = http_json(f"{cluster.http_url}/v1/unload_lora_adapter", {"lora_name": "mlp"})
        assert status == 404 and reply["error"]["code"] == "model_not_found"

        # the same on the router's gRPC API
        stub = router_stub(cluster.grpc_address)
        reply = stub.LoadLoraAdapter(router_pb2.LoadLoraAdapterRequest(lora_name="mlp", lora_path=paths["mlp"]),
                                     timeout=120)
        assert set(reply.workers.values()) == {"ok"} and len(reply.workers) == 2
        assert client.completions.create(model="mlp", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text == expected["mlp"]
        with pytest.raises(grpc.RpcError) as err:
            stub.LoadLoraAdapter(router_pb2.LoadLoraAdapterRequest(lora_name="b", lora_path=str(tmp_path / "no")),
                                 timeout=120)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stub.UnloadLoraAdapter(router_pb2.UnloadLoraAdapterRequest(lora_name="mlp"), timeout=60)
        with pytest.raises(grpc.RpcError) as err:
            stub.UnloadLoraAdapter(router_pb2.UnloadLoraAdapterRequest(lora_name="mlp"), timeout=60)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
