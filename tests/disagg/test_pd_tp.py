"""P/D between workers of different tensor parallelism, end to end: real etcd, router,
workers and rank processes, real NIXL transfers on loopback.

A tiny random Llama (4 heads, 2 KV heads: one per rank at tp=2) and a tiny Qwen2 (1 KV
head: replicated on both ranks at tp=2) and a tiny Mixtral (mixture of experts: the KV
layout is its attention's) are each served by a prefill and a decode worker with tp=1
and another pair with tp=2. Each prefill -> decode pair is
driven directly: tp=2 -> tp=1 (two ranks each write one head into every token row), tp=1 ->
tp=2 (one agent writes each head into the rank that holds it) and tp=2 -> tp=2 (rank to
rank, whole blocks). Every output is token-identical to the offline one-rank engine, the
bytes the prefill worker sent equal what the layouts predict, and no block stays used.
"""
from __future__ import annotations

import math

import pytest
import torch

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine import LLM
from tests.disagg.helpers import metric, metrics, stats, tokens_of, wait_quiet, worker_generate, workers
from tests.engine.conftest import make_tiny_model
from tests.services.cluster_fixture import local_cluster, worker_for
from tests.services.clients import wait_for

pytestmark = pytest.mark.timeout(600)

MAX_TOKENS = 8
LAYERS, BLOCK_SIZE, HEAD_BYTES = 2, 16, 16 * 4  # head_dim 16, float32
KV_HEADS = {"llama": 2, "qwen2": 1, "mixtral": 2}
PAIRS = [(2, 1), (1, 2), (2, 2)]  # (prefill tp, decode tp)
# distinct per pair: a prompt seen before would be a prefix-cache hit on its decode worker
PROMPTS = {pair: [list(range(100 + 500 * i, 140 + 500 * i)), list(range(3000 + 500 * i, 3077 + 500 * i))]
           for i, pair in enumerate(PAIRS)}


def sent_bytes(kind: str, prompt_len: int, decode_tp: int) -> int:
    """Every decode rank receives its shard of each block: replicated heads once per replica."""
    shard_heads = max(1, KV_HEADS[kind] // decode_tp)
    return math.ceil(prompt_len / BLOCK_SIZE) * LAYERS * 2 * BLOCK_SIZE * HEAD_BYTES * shard_heads * decode_tp


@pytest.mark.parametrize("kind", ["llama", pytest.param("qwen2", marks=pytest.mark.slow), "mixtral"])
def test_prefill_and_decode_of_different_tp_exchange_kv(kind, tmp_path):
    exchange_between_tps(kind, tmp_path, device="cpu", worker_args=())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_prefill_and_decode_of_different_tp_exchange_kv_on_cuda(kind, tmp_path):
    """Every KV cache in VRAM of one GPU: a tp=2 worker's ranks share it (``--tp-backend
    gloo``; NCCL needs a GPU per rank), each rank registering and sending its own shard."""
    exchange_between_tps(kind, tmp_path, device="cuda", worker_args=("--device-type", "cuda", "--tp-backend", "gloo"))


def exchange_between_tps(kind: str, tmp_path, device: str, worker_args: tuple[str, ...]) -> None:
    model = make_tiny_model(kind, str(tmp_path))
    every = [p for pair in PAIRS for p in PROMPTS[pair]]
    outputs = LLM(model, num_blocks=64, device_type=device).generate(
        every, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    expected = {tuple(p): list(o.token_ids) for p, o in zip(every, outputs)}
    with local_cluster(hybrid=0, prefill=1, decode=1, model=model, log_dir=str(tmp_path / "logs"),
                       worker_args=worker_args) as cluster:
        cluster.add_worker("prefill", "--tp", "2")
        cluster.add_worker("decode", "--tp", "2")
        cluster.wait_ready(240.0, count=4)
        by_tp = {}
        for w in workers(cluster):
            tp = 2 if worker_for(cluster, w["id"]).name.startswith(("worker-2", "worker-3")) else 1
            by_tp[(w["role"], tp)] = w
        wait_for(lambda: all(stats(w).kv_peers >= 2 for w in by_tp.values()), 30.0, what="KV peers loaded")
        for src, dst in PAIRS:
            prefill, decode = by_tp[("prefill", src)], by_tp[("decode", dst)]
            for prompt in PROMPTS[(src, dst)]:
                want = expected[tuple(prompt)]
                before = metric(metrics(prefill), "pdserve_kv_transfer_bytes_total", direction="sent")
                out = worker_generate(decode["grpc_address"], prompt, MAX_TOKENS, peers=[prefill])
                assert tokens_of(out) == want, f"prefill tp={src} -> decode tp={dst}, {len(prompt)} tokens"
                assert next(r for r in out if r.token_ids).prefill_worker_id == prefill["id"]
                sent = metric(metrics(prefill), "pdserve_kv_transfer_bytes_total", direction="sent") - before
                assert sent == sent_bytes(kind, len(prompt), dst), (src, dst)
        wait_quiet(cluster)
