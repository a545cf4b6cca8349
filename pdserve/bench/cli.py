"""``pdserve bench <name>``: dispatch to a benchmark module."""
from __future__ import annotations

import importlib
import sys

BENCHES = {"offline": "pdserve.bench.offline", "gpu": "pdserve.bench.gpu", "serve": "pdserve.bench.serve",
           "topology": "pdserve.bench.topology", "lora": "pdserve.bench.lora"}


def main(name: str, argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHES:
        print(f"usage: pdserve bench {{{','.join(BENCHES)}}} [options]", file=sys.stderr)
        return 2
    return int(importlib.import_module(BENCHES[argv[0]]).main(argv[1:]) or 0)
