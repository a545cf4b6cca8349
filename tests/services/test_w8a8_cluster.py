"""A W8A8 model through a real 1P1D cluster (etcd, router, prefill and decode workers, NIXL):
the same text as the offline engine on the same checkpoint, the quantization shown in
``/v1/models``, ``/workers`` and ListWorkers; a decode worker whose weights are not
quantized (the same model path holding other weights on its machine) is refused as a KV
peer, naming the quantization of both."""
from __future__ import annotations

import shutil

import openai
import pytest
from pdserve.v1 import router_pb2

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine import LLM
from tests.disagg.helpers import metric, metrics, stats, workers
from tests.engine.conftest import make_tiny_model
from tests.engine.w8a8_reference import make_llmcompressor_checkpoint
from tests.services.cluster_fixture import local_cluster
from tests.services.clients import http_json, router_stub, wait_for

pytest.importorskip("llmcompressor")
pytestmark = pytest.mark.timeout(600)
MAX_TOKENS = 8
SCHEME = "w8a8-int8"


def test_w8a8_through_prefill_and_decode(tmp_path):
    base = make_tiny_model("llama", str(tmp_path))
    model = make_llmcompressor_checkpoint(base, str(tmp_path / "w8a8"))
    prompt = list(range(300, 360))  # above the local-prefill threshold: computed on the prefill worker
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    expected = LLM(model, num_blocks=64).generate([prompt], params)[0].text
    with local_cluster(hybrid=0, prefill=1, decode=1, model=model, log_dir=str(tmp_path / "logs")) as cluster:
        status, models = http_json(f"{cluster.http_url}/v1/models")
        assert status == 200 and models["data"][0]["quantization"] == SCHEME, models
        assert {w["quantization"] for w in workers(cluster)} == {SCHEME}
        listed = router_stub(cluster.grpc_address).ListWorkers(router_pb2.ListWorkersRequest(), timeout=30)
        assert {w.quantization for w in listed.workers} == {SCHEME}
        prefill = workers(cluster, "prefill")[0]
        client = openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key="none", max_retries=0, timeout=120)
        out = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == expected
        assert metric(metrics(prefill), "pdserve_kv_transfer_bytes_total", direction="sent") > 0

        # the same path with unquantized weights on the next worker's machine
        shutil.move(model, str(tmp_path / "w8a8-moved"))
        shutil.copytree(base, model)
        odd = cluster.add_worker("decode")
        cluster.wait_ready(120.0, count=3)
        odd_info = next(w for w in workers(cluster, "decode") if int(w["id"].split("-")[-2]) == odd.pid)
        assert odd_info["quantization"] is None
        assert any(f"quantization: 'none' != '{SCHEME}'" in m for m in odd_info["kv_incompatible"]), odd_info
        refusal = f"quantization: local '{SCHEME}' != remote 'none'"
        wait_for(lambda: any(refusal in e for e in stats(prefill).kv_peer_errors), 10.0,
                 what="the prefill worker refused the unquantized peer")
        status, models = http_json(f"{cluster.http_url}/v1/models")
        assert models["data"][0]["quantization"] == f"none,{SCHEME}"
