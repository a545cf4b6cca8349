"""``pdserve router``: parse flags into one RouterConfig and serve. Never imports torch.

Bad configuration prints one line (``pdserve router: error: ...``) and exits 2.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from pdserve.router.config import POLICIES, RouterConfigError
from pdserve.cluster.tls import add_tls_flags


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the usage dump
        raise RouterConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pdserve router", description="Run the pdserve router (gRPC + OpenAI-compatible HTTP).")
    p.add_argument("--etcd", help="etcd endpoint(s), e.g. http://127.0.0.1:2379")
    add_tls_flags(p)
    p.add_argument("--namespace", help="cluster namespace in etcd (default: default)")
    p.add_argument("--host", help="bind address (default 0.0.0.0)")
    p.add_argument("--grpc-port", dest="grpc_port", help="gRPC port (default 50051; 0 = any free port)")
    p.add_argument("--http-port", dest="http_port", help="HTTP port (default 8000; 0 = any free port)")
    p.add_argument("--policy", help=f"routing policy: {' | '.join(POLICIES)} (default least_loaded)")
    p.add_argument("--prefix-blocks", dest="prefix_blocks", help="prefix_aware: blocks of the prompt to hash")
    p.add_argument("--overload-margin", dest="overload_margin",
                   help="prefix_aware: extra outstanding requests tolerated on the prefix owner")
    p.add_argument("--local-prefill-threshold", dest="local_prefill_threshold",
                   help="prompts shorter than this (tokens) prefill on the decode worker (default 32)")
    p.add_argument("--prefill-candidates", dest="prefill_candidates",
                   help="prefill workers named per request, tried in order by the decode worker (default 2)")
    _add_request_flags(p)
    p.add_argument("--otlp-endpoint", dest="otlp_endpoint",
                   help="send OpenTelemetry spans of each request to this OTLP gRPC collector, "
                        "e.g. http://otel-collector:4317 (default: tracing off)")
    return p


def _add_request_flags(p: argparse.ArgumentParser) -> None:
    """Who may call the router and how big a request may be."""
    p.add_argument("--api-key", dest="api_key",
                   help="require 'Authorization: Bearer KEY' on /v1/*, /workers and gRPC Router calls "
                        "(prefer the env PDSERVE_ROUTER_API_KEY: flags show in ps)")
    p.add_argument("--metrics-require-key", dest="metrics_require_key", action="store_true", default=None,
                   help="also require the API key on /metrics (default: open, like /health)")
    p.add_argument("--max-body-bytes", dest="max_body_bytes",
                   help="largest HTTP request body; larger ones get 413 (default 8388608 = 8 MiB)")
    p.add_argument("--default-max-tokens", dest="default_max_tokens",
                   help="max_tokens of a chat request that sets none (default 4096; 0 = the rest of the context; "
                        "completions keep OpenAI's 16)")
    p.add_argument("--max-inflight", dest="max_inflight",
                   help="requests served at once; more get 429 with Retry-After (default 1024; 0 = no bound)")
    p.add_argument("--max-tokens-cap", dest="max_tokens_cap",
                   help="largest max_tokens a request may ask for; larger ones get 400 (default 0 = no cap)")


def main(name: str, argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s router %(name)s: %(message)s")
    from pdserve.router.config import RouterConfig

    try:
        config = RouterConfig.build(vars(build_parser().parse_args(argv)), os.environ)
    except RouterConfigError as exc:
        print(f"pdserve {name}: error: {exc}", file=sys.stderr)
        return 2
    from pdserve.common.tokenizer import load_tokenizer
    from pdserve.router.app import serve

    return asyncio.run(serve(config, load_tokenizer))
