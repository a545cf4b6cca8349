"""Disaggregated prefill/decode on a GPU: real etcd, router and worker processes, KV moved
between two workers' VRAM caches on one CUDA device by NIXL (UCX), layer by layer.

The model is random-weight SmolLM2-135M in bfloat16 (every process builds the same
weights from the same seed): 1P1D greedy outputs must equal a hybrid worker's and
the offline engine's on the same device, token for token, for prompts below, at and
above one block and well above the local-prefill threshold; the decode worker's
received KV bytes must equal what the layout predicts. Run with ``make test-gpu``.
"""
from __future__ import annotations

import contextlib
import random
from typing import Iterator

import pytest
import torch

from pdserve.launcher.cluster import ClusterSpec, LocalCluster
from pdserve.launcher.processes import free_port
from tests.disagg.helpers import kv_totals, metric, metrics, router_generate, tokens_of, wait_quiet, workers

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MODEL = "dummy:smollm2-135m"
THRESHOLD = 8
ARGS = ("--device-type", "cuda", "--dtype", "bfloat16", "--num-blocks", "1024", "--max-batch-size", "16",
        "--local-prefill-threshold", str(THRESHOLD), "--kv-send", "layerwise")
LAYERS, BLOCK_SIZE, BLOCK_BYTES = 30, 16, 2 * 16 * 3 * 64 * 2  # smollm2, bfloat16: one (layer, block)
LENGTHS = (5, 16, 17, 40, 333, 1000, 3000)
MAX_TOKENS = 16


@contextlib.contextmanager
def cluster(**counts: int) -> Iterator[LocalCluster]:
    spec = ClusterSpec(**counts, model=MODEL, http_port=free_port(), grpc_port=free_port(), lease_ttl=3,
                       drain_timeout=5.0, worker_args=ARGS, router_args=("--local-prefill-threshold", str(THRESHOLD)))
    c = LocalCluster(spec)
    try:
        c.start()
        c.wait_ready(600)
        yield c
    finally:
        c.stop(timeout=20)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(0, 49152) for _ in range(n)] for n in LENGTHS]


@pytest.fixture(scope="module")
def offline(prompts: list[list[int]]) -> list[list[int]]:
    from pdserve.engine import LLM, SamplingParams

    llm = LLM(model=MODEL, dtype="bfloat16", device_type="cuda", num_blocks=1024, max_batch_size=16)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    outs = [list(llm.generate([p], params)[0].token_ids) for p in prompts]  # one at a time, like the cluster below
    del llm
    torch.cuda.empty_cache()
    return outs


def serve_one_by_one(c: LocalCluster, prompts: list[list[int]]) -> list[list[int]]:
    return [tokens_of(router_generate(c, p, MAX_TOKENS, timeout=300)) for p in prompts]


def test_1p1d_on_gpu_matches_hybrid_and_offline(prompts: list[list[int]], offline: list[list[int]]) -> None:
    assert len({tuple(o) for o in offline}) == len(offline), "random weights ignored the prompt"
    with cluster(hybrid=1) as c:
        hybrid = serve_one_by_one(c, prompts)
    with cluster(hybrid=0, prefill=1, decode=1) as c:
        pd = serve_one_by_one(c, prompts)
        wait_quiet(c, timeout=30)
        decode = workers(c, "decode")[0]
        remote = [p for p in prompts if len(p) >= THRESHOLD]
        samples = metrics(decode)
        assert metric(samples, "pdserve_worker_prefills_total", where="remote") == len(remote)
        assert metric(samples, "pdserve_worker_prefills_total", where="local") == len(prompts) - len(remote)
        blocks = sum(-(-len(p) // BLOCK_SIZE) for p in remote)
        totals = kv_totals(c)
        assert totals["received_blocks"] == totals["sent_blocks"] == blocks
        assert totals["received_bytes"] == totals["sent_bytes"] == blocks * LAYERS * BLOCK_BYTES
    for p, a, b, want in zip(prompts, pd, hybrid, offline):
        assert a == want, f"1P1D, prompt of {len(p)} tokens: {a} != offline {want}"
        assert b == want, f"hybrid, prompt of {len(p)} tokens: {b} != offline {want}"
