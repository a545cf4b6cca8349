"""Fuzzing the router's HTTP API from its own OpenAPI document (schemathesis): valid
and invalid requests for every operation; none may get a 5xx or break the
connection, and every error is in OpenAI's error shape.

The router under test runs on the in-process cluster with a small max_tokens cap,
so requests that do generate finish in milliseconds; examples per operation are
bounded to keep the whole file well under a minute.
"""
from __future__ import annotations

from typing import Any, Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error

from pdserve.router.app import RouterProcess
from pdserve.router.openapi import openapi_document
from pdserve.router.prepare import MaxTokensPolicy
from tests.services.clients import http_json
from tests.services.inproc import InProcessCluster, running_cluster
from tests.services.test_router_validation import start_router

EXAMPLES = 50
SETTINGS = {"max_tokens_cap": 8, "default_max_tokens": 4, "max_body_bytes": 1 << 20}


@pytest.fixture(scope="module")
def cluster() -> Iterator[InProcessCluster]:
    yield from running_cluster(num_workers=1)


@pytest.fixture(scope="module")
def router(cluster: InProcessCluster) -> Iterator[RouterProcess]:
    r = start_router(cluster, **SETTINGS)
    try:
        yield r
    finally:
        cluster.call(r.stop(0.5))


def document() -> dict[str, Any]:
    """What the router under test serves at /openapi.json (checked below): schemathesis needs the
    schema when tests are collected, before the cluster runs."""
    return openapi_document(MaxTokensPolicy(SETTINGS["default_max_tokens"], SETTINGS["max_tokens_cap"]),
                            SETTINGS["max_body_bytes"], api_key=False, metrics_need_key=False, models=["smollm2"])


schema = schemathesis.openapi.from_dict(document())


@schemathesis.check
def openai_error_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx is OpenAI's error object (aiohttp's own 404/405 included)."""
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return None


# Phase.explicit also runs schemathesis's coverage phase: every bound, and one past it, field by field.
@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_http_api_never_answers_5xx(case: Any, router: RouterProcess) -> None:
    response = case.call(base_url=f"http://127.0.0.1:{router.http_port}", timeout=30)
    case.validate_response(response, checks=[not_a_server_error, openai_error_shape])


def test_the_fuzzed_document_is_the_served_one(router: RouterProcess) -> None:
    status, served = http_json(f"http://127.0.0.1:{router.http_port}/openapi.json")
    assert status == 200 and served == document()
