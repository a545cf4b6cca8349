"""A decode worker whose KV pool is far smaller than the load keeps making progress.

Found by an operator: 1P1D, the decode worker at ``--num-blocks 64``, 16 concurrent
requests of 300-token prompts and 64 new tokens. The decode worker sat at 57/64
blocks, 0 running, 16 waiting, until every request failed (some with gRPC
``Too many pings``). Here the same load must finish, token-identical to the offline
engine, with every block back in the pool.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import pytest

from pdserve.launcher.cluster import LocalCluster
from tests.disagg.helpers import Reference, corpus_ids, prompt, router_generate, stats, tokens_of, wait_quiet, workers
from tests.services.clients import wait_for
from tests.services.cluster_fixture import local_cluster

pytestmark = pytest.mark.timeout(300)
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def reference() -> Iterator[Reference]:
    from pdserve.engine import LLM

    yield Reference(LLM(model="smollm2", num_blocks=512, max_batch_size=16))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with local_cluster(hybrid=0, prefill=1, decode=0, drain_timeout=5.0,
                       log_dir=str(tmp_path_factory.mktemp("full-cache-logs"))) as c:
        c.add_worker("decode", "--num-blocks", "64")
        c.wait_ready(120.0, count=2)
        wait_for(lambda: all(stats(w).kv_peers >= 1 for w in workers(c)), 30.0, what="KV peers loaded")
        yield c


def test_sixteen_long_requests_through_a_64_block_decode_pool(cluster: LocalCluster, reference: Reference) -> None:
    ids = corpus_ids(reference.llm.tokenizer)
    prompts = [prompt(ids, 300, offset=97 * i) for i in range(16)]  # 19 blocks each, 23 with the output
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        outputs = list(pool.map(lambda p: tokens_of(router_generate(cluster, p, MAX_TOKENS, timeout=240)), prompts))
    assert outputs == reference.tokens(prompts, MAX_TOKENS)
    wait_quiet(cluster)
    decode = workers(cluster, "decode")[0]
    s = stats(decode)
    assert s.kv_blocks_free + s.kv_blocks_used == 64 and s.kv_blocks_used == 0
