"""A router whose tokenizer cannot load reports unhealthy with the cause, once in its log.

The worker serves a Hugging Face directory that has weights' config but no tokenizer
files; the router's real ``load_tokenizer`` tries to convert it with transformers in a
subprocess and fails. Readiness (HTTP ``/health``, ``Router/Health``, grpc.health for the
Router service) must say so; requests for that model get 503 with the cause.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.v1 import router_pb2
from tests.services.clients import http_json, live_workers, router_stub, wait_for
from tests.services.inproc import InProcessCluster


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("no-tokenizer")
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    return path


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def router_log() -> Iterator[_Records]:
    logger, handler = logging.getLogger("pdserve.router.models"), _Records()
    logger.addHandler(handler)
    old_level, logger.level = logger.level, logging.INFO
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@pytest.fixture(scope="module")
def cluster(model_dir: Path, router_log: _Records) -> Iterator[InProcessCluster]:
    c = InProcessCluster(model=str(model_dir)).start(num_workers=1)
    try:
        wait_for(lambda: len(live_workers(c.http_url)) == 1, 10.0, what="one worker")
        yield c
    finally:
        c.stop()


def _unhealthy(c: InProcessCluster) -> bool:
    return http_json(f"{c.http_url}/health")[0] == 503


def test_readiness_fails_with_the_cause_logged_once(cluster: InProcessCluster, model_dir: Path,
                                                    router_log: _Records) -> None:
    wait_for(lambda: _unhealthy(cluster), 60.0, what="the router to report its tokenizer failure")
    status, body = http_json(f"{cluster.http_url}/health")
    assert status == 503 and body["status"] == "unhealthy" and body["workers"] == 1
    cause = body["problems"][str(model_dir)]
    assert "could not convert the tokenizer" in cause and "\n" not in cause

    reply = router_stub(cluster.grpc_address).Health(router_pb2.HealthRequest())
    assert reply.status == "UNHEALTHY" and "could not convert the tokenizer" in reply.detail
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(cluster.grpc_address))
    check = health.Check(health_pb2.HealthCheckRequest(service="pdserve.v1.Router"))
    assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING

    for _ in range(5):
        status, err = http_json(f"{cluster.http_url}/v1/completions",
                                {"model": str(model_dir), "prompt": "Hello", "max_tokens": 4})
        assert status == 503 and err["error"]["code"] == "tokenizer_failed"
        assert "failed to load" in err["error"]["message"] and "could not convert" in err["error"]["message"]
    failures = [r.getMessage() for r in router_log.records if r.levelno == logging.ERROR]
    assert len(failures) == 1 and "could not convert the tokenizer" in failures[0], failures
    assert "Traceback" not in failures[0] and failures[0].count("\n") == 0


def test_token_id_prompts_get_the_same_503(cluster: InProcessCluster, model_dir: Path) -> None:
    # Responses carry text too, so a model whose tokenizer failed is not served at all.
    wait_for(lambda: _unhealthy(cluster), 60.0, what="the router to report its tokenizer failure")
    status, err = http_json(f"{cluster.http_url}/v1/completions",
                            {"model": str(model_dir), "prompt": [1000], "max_tokens": 3})
    assert status == 503 and err["error"]["code"] == "tokenizer_failed"
    with pytest.raises(grpc.RpcError) as info:
        list(router_stub(cluster.grpc_address).Generate(
            router_pb2.GenerateRequest(model=str(model_dir), text="Hello")))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "failed to load" in info.value.details()
