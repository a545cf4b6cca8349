"""A tensor-parallel worker end to end: `pdserve worker --tp 3` (smollm2 has 9 heads and 3 KV
heads) behind etcd and the router, with three real rank processes over gloo. Its completions
are token-identical to the offline engine with one rank, its /metrics show each rank's step
and collective seconds; when a rank dies the worker exits as a
whole, leaves the router's list and leaves no rank process behind."""
from __future__ import annotations

import signal

import psutil

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine import LLM
from tests.disagg.helpers import metric, metrics
from tests.services.cluster_fixture import local_cluster
from tests.services.clients import http_json, live_workers, wait_for

PROMPTS = [[1, 504, 3458, 8178, 28, 18], list(range(300, 340))]
MAX_TOKENS = 8


def test_tp3_worker_serves_like_one_rank_and_fails_as_a_whole(tmp_path):
    expected = [o.text for o in LLM("smollm2", num_blocks=64).generate(
        PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))]
    with local_cluster(hybrid=1, log_dir=str(tmp_path), worker_args=("--tp", "3")) as cluster:
        (worker,) = live_workers(cluster.http_url)
        for prompt, text in zip(PROMPTS, expected):
            status, body = http_json(f"{cluster.http_url}/v1/completions", {
                "model": "smollm2", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True})
            assert status == 200, body
            assert body["choices"][0]["text"] == text and body["usage"]["completion_tokens"] == MAX_TOKENS
        samples = metrics(worker)  # per-rank step seconds, and the part of them inside collectives
        for rank in ("0", "1", "2"):
            step = metric(samples, "pdserve_worker_rank_step_seconds_total", rank=rank)
            comm = metric(samples, "pdserve_worker_rank_collective_seconds_total", rank=rank)
            assert 0 < comm < step, (rank, comm, step)
        child = cluster.workers[0]
        ranks = psutil.Process(child.pid).children(recursive=True)
        assert len(ranks) >= 3
        ranks[-1].send_signal(signal.SIGKILL)
        http_json(f"{cluster.http_url}/v1/completions", {"model": "smollm2", "prompt": [5, 6], "max_tokens": 4})
        wait_for(lambda: child.proc.poll() is not None, 30.0, what="the worker to exit")
        assert child.proc.returncode != 0
        wait_for(lambda: not any(w["id"] == worker["id"] for w in live_workers(cluster.http_url)), 30.0,
                 what="the worker to leave the router's list")
        wait_for(lambda: not any(r.is_running() and r.status() != psutil.STATUS_ZOMBIE for r in ranks), 15.0,
                 what="every rank process to be gone")
