"""``pdserve generate``, ``pdserve chat`` and ``pdserve perplexity``: the offline engine from the command line.

Owns: argument parsing for those commands; everything else is ``LLM`` (generate,
chat) and ``evaluate.perplexity``.
"""
from __future__ import annotations

import argparse
import sys

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.dtypes import MODEL_DTYPES


def _parser(name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"pdserve {name}")
    p.add_argument("--model", default="smollm2", help="smollm2, a HF directory, a .gguf file or dummy:<preset>")
    p.add_argument("--dtype", default="float32", choices=MODEL_DTYPES)
    p.add_argument("--device-type", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    if name == "generate":
        p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
        p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    return p


def main(name: str, argv: list[str]) -> int:
    if name == "perplexity":
        return _perplexity(argv)
    args = _parser(name).parse_args(argv)
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
        from pdserve.engine import LLM

        llm = LLM(args.model, dtype=args.dtype, device_type=args.device_type)
    except ValueError as exc:
        print(f"pdserve {name}: {exc}", file=sys.stderr)
        return 2
    if name == "chat":
        return _chat(llm, params)
    try:
        if args.chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
        else:
            outs = llm.generate(args.prompt, params)
    except ValueError as exc:
        print(f"pdserve generate: {exc}", file=sys.stderr)
        return 2
    for out in outs:
        print(out.text)
    return 0


def _chat(llm, params: SamplingParams) -> int:
    messages: list[dict[str, str]] = []
    print("pdserve chat: type a message, empty line or Ctrl-D to quit", file=sys.stderr)
    for line in sys.stdin:
        line = line.rstrip("\n")
        if not line:
            break
        messages.append({"role": "user", "content": line})
        reply = llm.chat(messages, params)[0].text
        messages.append({"role": "assistant", "content": reply})
        print(reply, flush=True)
    return 0


def _perplexity(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pdserve perplexity")
    p.add_argument("--model", default="smollm2", help="smollm2, a HF directory (quantized or not) or a .gguf file")
    p.add_argument("--dtype", default="float32", choices=MODEL_DTYPES)
    p.add_argument("--device-type", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--text-file", help="text to score (default: held-out Python module documentation)")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--max-windows", type=int, default=None)
    args = p.parse_args(argv)
    from pdserve.engine.evaluate import heldout_text, perplexity

    try:
        text = open(args.text_file, encoding="utf-8").read() if args.text_file else heldout_text()
        result = perplexity(args.model, text, args.dtype, args.device_type, args.window, args.max_windows)
    except (ValueError, OSError) as exc:
        print(f"pdserve perplexity: {exc}", file=sys.stderr)
        return 2
    print(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens ({result.windows} windows)")
    return 0
