"""The ``pdserve`` command: a thin dispatcher to each subcommand's own module.

Owns nothing but the table below. Subcommand modules are imported lazily so that
``pdserve router`` never imports torch or the engine.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("pdserve.engine.cli", "Generate a completion offline with the engine"),
    "chat": ("pdserve.engine.cli", "Chat with a model offline (applies the chat template)"),
    "quantize": ("pdserve.engine.quant.quantize_cli", "Quantize a model: `pdserve quantize smoothquant` (W8A8)"),
    "perplexity": ("pdserve.engine.cli", "Perplexity of a model on held-out text (or --text-file)"),
    "bench": ("pdserve.bench.cli", "Benchmarks: `pdserve bench offline`"),
    "worker": ("pdserve.worker.cli", "Run one worker process (role hybrid|prefill|decode)"),
    "router": ("pdserve.router.cli", "Run the router (gRPC + OpenAI-compatible HTTP)"),
    "up": ("pdserve.launcher.cli", "Bring up a local cluster: etcd, router and workers"),
}


def usage() -> str:
    lines = ["usage: pdserve <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"pdserve: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(name, rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
