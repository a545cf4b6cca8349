"""``pdserve bench serve``: load against any OpenAI-compatible HTTP endpoint, with SLO goodput.

Owns the client side of a serving benchmark. Lifecycle of one invocation: flags
become one frozen ``ServeConfig``; a probe request checks the endpoint and model
(and warms it); then for each load point in turn (a Poisson request rate, or a
fixed number of requests in flight) a fresh prompt set is made from the seed, the
requests are sent on their schedule as streaming requests with ``ignore_eos`` and
``max_tokens`` = the output length, and each stream is timed chunk by chunk into a
``RequestResult``. When all of a load point's requests have ended, its summary is
printed; at the end ``result.json`` (every load point), one ``result-<load>.json``
per load point when there are several, and PNG plots are written
(``pdserve.bench.serve_report`` owns the statistics, files and plots).
``--compare A.json B.json ...`` only reads result files and plots them together.

Prompts are text, not token ids, since other engines cannot take ours: words of a
fixed vocabulary that BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM) encode as one
token each after a space, so N words are about N tokens; the server's
``usage.prompt_tokens`` is what gets reported.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import aiohttp

from pdserve.bench.serve_report import (BenchResult, Load, RequestResult, RunResult, Slo, format_run, format_table,
                                        from_json, summarize, to_json, write_plots)

# Short common English words: one token each after a space for the BPE tokenizers above.
WORDS = tuple("""
the of and to in is was for on that with as by at from his her they this had not are but one which you were all
their she there been has when who will more would if out so said what its about into them than can only other new
some could time these two may then first any like now my such make over did our even most after also made many
before must through back years where much your way well down should because each just those people how too little
state good very world still own see men work long get here between both life being under never day same another
know while last might us great old year off come since against go came right used take three states himself few
house use during without again place around however home small found thought went say part once general high upon
school every does got united left number course war until always away something fact though water less public put
think almost hand enough far took head yet government system better set told nothing night end why called eyes
find going look asked later knew point next city business give group toward young let room president side social
given present several order national second possible rather per face among form often important things looked
early white case john become large big need four within felt along children saw best church ever least power
development light thing seemed family interest want members others mind country area done open
""".split())
TOKENS_PER_WORD = 1.0
DATASETS = ("random", "shared-prefix", "chat-mix")
# chat-mix: (weight, input length range, output length range) as multiples of --input-len / --output-len.
CHAT_MIX = ((0.6, (0.25, 1.0), (0.25, 1.0)),  # short turns
            (0.2, (1.0, 4.0), (0.25, 1.0)),  # long context, short answer
            (0.2, (0.25, 1.0), (1.0, 4.0)))  # short question, long answer


@dataclass(frozen=True)
class ServeConfig:
    base_url: str
    model: str | None  # None: the first of GET /v1/models
    endpoint: str  # "completions" | "chat"
    num_prompts: int
    loads: tuple[Load, ...]
    input_len: tuple[int, int]  # uniform range, inclusive; equal ends for a fixed length
    output_len: tuple[int, int]
    dataset: str
    num_prefixes: int
    prefix_len: int  # shared-prefix: words of each common prefix
    slo: Slo
    seed: int
    output_dir: Path | None
    plots: bool
    api_key: str | None
    timeout: float
    label: str | None


@dataclass(frozen=True)
class RequestSpec:
    prompt: str
    input_len: int
    output_len: int


@dataclass(frozen=True)
class Target:
    """Where and how to send: the resolved model, the full URL, headers and per-request timeout."""
    url: str
    model: str
    chat: bool
    headers: dict[str, str]
    timeout: aiohttp.ClientTimeout


@dataclass(frozen=True)
class Chunk:
    """What one SSE data payload carries: generated text (None: no choice), usage, or an error."""
    text: str | None = None
    usage: dict[str, Any] | None = None
    error: str | None = None


DONE = "[DONE]"


# Flags -> ServeConfig.

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve bench serve",
                                description="Serving load against an OpenAI-compatible endpoint, with SLO goodput.")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="default: the first model of GET /v1/models")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--num-prompts", type=int, default=100, help="requests per load point")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--request-rate", default="inf",
                      help="Poisson arrival rates in req/s, comma-separated, one run each; inf = all at once")
    load.add_argument("--concurrency", help="instead of rates: this many requests in flight (comma-separated)")
    p.add_argument("--input-len", type=int, default=256, help="prompt length in tokens (approximately)")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--input-len-range", help="LO,HI: uniform prompt lengths instead of --input-len")
    p.add_argument("--output-len-range", help="LO,HI: uniform output lengths instead of --output-len")
    p.add_argument("--dataset", choices=DATASETS, default="random",
                   help="random words; shared-prefix: --num-prefixes common prefixes + unique suffixes; "
                        "chat-mix: short turns, long contexts and long answers scaled by the lengths")
    p.add_argument("--num-prefixes", type=int, default=4)
    p.add_argument("--prefix-len", type=int, help="shared-prefix: prefix tokens (default 7/8 of the input length)")
    p.add_argument("--slo-ttft-ms", type=float)
    p.add_argument("--slo-tpot-ms", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", help="write result.json and PNG plots here")
    p.add_argument("--no-plots", action="store_true", help="no PNGs (matplotlib not needed)")
    p.add_argument("--compare", nargs="+", metavar="RESULT_JSON",
                   help="plot two or more result files side by side (into --output-dir, default .) and exit")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--label", help="this endpoint's name in results and --compare legends (default model@host)")
    return p


def _range(text: str | None, fixed: int, flag: str) -> tuple[int, int]:
    if text is None:
        lo = hi = fixed
    else:
        try:
            lo, hi = (int(x) for x in text.split(","))
        except ValueError:
            raise ValueError(f"{flag} takes LO,HI (two integers), got {text!r}") from None
    if not 1 <= lo <= hi:
        raise ValueError(f"{flag}: need 1 <= LO <= HI, got {lo},{hi}")
    return lo, hi


def _loads(args: argparse.Namespace) -> tuple[Load, ...]:
    kind, text = ("concurrency", args.concurrency) if args.concurrency else ("rate", args.request_rate)
    flag = "--concurrency" if kind == "concurrency" else "--request-rate"
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag}: bad number in {text!r}") from None
    if not values or any(v <= 0 or math.isnan(v) for v in values):
        raise ValueError(f"{flag}: values must be > 0, got {text!r}")
    if kind == "concurrency" and any(math.isinf(v) or v != int(v) for v in values):
        raise ValueError(f"--concurrency takes whole numbers, got {text!r}")
    return tuple(Load(kind, v) for v in values)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    if args.num_prefixes < 1:
        raise ValueError("--num-prefixes must be >= 1")
    input_len = _range(args.input_len_range, args.input_len, "--input-len-range")
    prefix_len = args.prefix_len if args.prefix_len is not None else max(1, input_len[0] * 7 // 8)
    return ServeConfig(
        base_url=args.base_url.rstrip("/"), model=args.model, endpoint=args.endpoint,
        num_prompts=args.num_prompts, loads=_loads(args), input_len=input_len,
        output_len=_range(args.output_len_range, args.output_len, "--output-len-range"), dataset=args.dataset,
        num_prefixes=args.num_prefixes, prefix_len=prefix_len, slo=Slo(args.slo_ttft_ms, args.slo_tpot_ms),
        seed=args.seed, output_dir=Path(args.output_dir) if args.output_dir else None, plots=not args.no_plots,
        api_key=args.api_key, timeout=args.timeout, label=args.label)


# Datasets and the arrival schedule: pure functions of a seeded random.Random.

def random_text(rng: random.Random, tokens: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, round(tokens / TOKENS_PER_WORD))))


def build_dataset(cfg: ServeConfig, rng: random.Random) -> list[RequestSpec]:
    if cfg.dataset == "shared-prefix":
        return _shared_prefix(cfg, rng)
    if cfg.dataset == "chat-mix":
        return _chat_mix(cfg, rng)
    specs = []
    for _ in range(cfg.num_prompts):
        n = rng.randint(*cfg.input_len)
        specs.append(RequestSpec(random_text(rng, n), n, rng.randint(*cfg.output_len)))
    return specs


def _shared_prefix(cfg: ServeConfig, rng: random.Random) -> list[RequestSpec]:
    """Request i gets prefix i mod num_prefixes (so each is used equally), in a shuffled order."""
    prefixes = [random_text(rng, cfg.prefix_len) for _ in range(cfg.num_prefixes)]
    specs = []
    for i in range(cfg.num_prompts):
        n = rng.randint(*cfg.input_len)
        suffix_len = max(1, n - cfg.prefix_len)
        prompt = f"{prefixes[i % cfg.num_prefixes]} {random_text(rng, suffix_len)}"
        specs.append(RequestSpec(prompt, cfg.prefix_len + suffix_len, rng.randint(*cfg.output_len)))
    rng.shuffle(specs)
    return specs


def _chat_mix(cfg: ServeConfig, rng: random.Random) -> list[RequestSpec]:
    weights = [w for w, _, _ in CHAT_MIX]
    mean_in, mean_out = sum(cfg.input_len) / 2, sum(cfg.output_len) / 2
    specs = []
    for _ in range(cfg.num_prompts):
        _, (ilo, ihi), (olo, ohi) = rng.choices(CHAT_MIX, weights)[0]
        n = rng.randint(max(1, round(ilo * mean_in)), max(1, round(ihi * mean_in)))
        out = rng.randint(max(1, round(olo * mean_out)), max(1, round(ohi * mean_out)))
        specs.append(RequestSpec(random_text(rng, n), n, out))
    return specs


def arrival_times(n: int, rate: float, rng: random.Random) -> list[float]:
    """Send offsets in seconds: the first at 0, then exponential gaps of mean 1/rate; all 0 for ``inf``."""
    if math.isinf(rate):
        return [0.0] * n
    times, t = [], 0.0
    for i in range(n):
        if i:
            t += rng.expovariate(rate)
        times.append(t)
    return times


# The stream: SSE lines of either API shape.

def parse_sse_line(line: bytes | str) -> Any:
    """The JSON of a ``data:`` line, ``DONE`` for ``data: [DONE]``, None for anything else."""
    text = (line.decode("utf-8", "replace") if isinstance(line, bytes) else line).strip()
    if not text.startswith("data:"):
        return None
    payload = text[len("data:"):].strip()
    return DONE if payload == DONE else json.loads(payload)


def parse_chunk(payload: Any) -> Chunk:
    """Text of a completions (``choices[0].text``) or chat (``choices[0].delta.content``) chunk, and usage."""
    if not isinstance(payload, dict):
        return Chunk(error="stream_error")
    if payload.get("error"):
        return Chunk(error="stream_error")
    choices = payload.get("choices") or []
    text = None
    if choices:
        choice = choices[0]
        if "delta" in choice:
            delta = choice["delta"] or {}
            # NOTE: a chat stream's first chunk may carry only the role (empty content): no token yet.
            text = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
        else:
            text = choice.get("text") or ""
    return Chunk(text=text, usage=payload.get("usage") or None)


# One request.

def request_body(target: Target, spec: RequestSpec) -> dict[str, Any]:
    body: dict[str, Any] = {"model": target.model, "max_tokens": spec.output_len, "temperature": 0.0,
                            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    if target.chat:
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    return body


async def send_request(session: aiohttp.ClientSession, target: Target, spec: RequestSpec,
                       run_start: float) -> RequestResult:
    base = {"input_len": spec.input_len, "output_len": spec.output_len}
    start = time.perf_counter()
    base["start"] = start - run_start
    stamps: list[float] = []
    usage: dict[str, Any] = {}
    try:
        async with session.post(target.url, json=request_body(target, spec), headers=target.headers,
                                timeout=target.timeout) as response:
            if response.status != 200:
                await response.read()
                return RequestResult(**base, error=f"http_{response.status}")
            async for line in response.content:
                payload = parse_sse_line(line)
                if payload is None:
                    continue
                if payload == DONE:
                    break
                chunk = parse_chunk(payload)
                if chunk.error:
                    return RequestResult(**base, error=chunk.error)
                if chunk.text:
                    stamps.append(time.perf_counter())
                usage = chunk.usage or usage
    except TimeoutError:
        return RequestResult(**base, error="timeout")
    except (aiohttp.ClientError, ConnectionError):
        return RequestResult(**base, error="connection")
    except ValueError:  # a data line that is not JSON
        return RequestResult(**base, error="stream_error")
    if not stamps:
        return RequestResult(**base, error="empty")
    end = time.perf_counter()
    return RequestResult(**base, ttft=stamps[0] - start, e2e=end - start,
                         itl=tuple(b - a for a, b in zip(stamps, stamps[1:])),
                         output_tokens=int(usage.get("completion_tokens") or len(stamps)),
                         prompt_tokens=usage.get("prompt_tokens"))


# Load points.

async def run_load(session: aiohttp.ClientSession, target: Target, specs: Sequence[RequestSpec], load: Load,
                   rng: random.Random, progress: Any) -> tuple[list[RequestResult], float]:
    """Sends every spec under ``load``; returns the results in spec order and the run's duration."""
    run_start = time.perf_counter()

    async def one(spec: RequestSpec) -> RequestResult:
        result = await send_request(session, target, spec, run_start)
        progress.update(1)
        return result

    if load.kind == "concurrency":
        slots = asyncio.Semaphore(int(load.value))

        async def limited(spec: RequestSpec) -> RequestResult:
            async with slots:
                return await one(spec)

        results = await asyncio.gather(*(limited(s) for s in specs))
    else:
        tasks = []
        for spec, at in zip(specs, arrival_times(len(specs), load.value, rng)):
            delay = run_start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(spec)))
        results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - run_start


async def _resolve_target(session: aiohttp.ClientSession, cfg: ServeConfig) -> Target:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    model = cfg.model
    if model is None:
        async with session.get(f"{cfg.base_url}/v1/models", headers=headers,
                               timeout=aiohttp.ClientTimeout(total=30)) as response:
            if response.status != 200:
                raise RuntimeError(f"GET /v1/models answered {response.status}: {(await response.text())[:200]}")
            models = (await response.json()).get("data") or []
        if not models:
            raise RuntimeError("GET /v1/models lists no model; pass --model")
        model = models[0]["id"]
    path = "/v1/chat/completions" if cfg.endpoint == "chat" else "/v1/completions"
    return Target(cfg.base_url + path, model, cfg.endpoint == "chat", headers,
                  aiohttp.ClientTimeout(total=cfg.timeout))


async def _probe(session: aiohttp.ClientSession, target: Target) -> None:
    """One short request before the runs: a wrong URL, model or key fails here, once, with the reason."""
    result = await send_request(session, target, RequestSpec("Hello there, how are you", 6, 2), time.perf_counter())
    if not result.ok:
        raise RuntimeError(f"the probe request to {target.url} (model {target.model!r}) failed: {result.error}")


async def run_bench(cfg: ServeConfig) -> BenchResult:
    from tqdm import tqdm

    connector = aiohttp.TCPConnector(limit=0)  # NOTE: aiohttp's default of 100 connections would cap the load
    # NOTE: a read buffer of 1 MiB, since aiohttp refuses a line (one SSE chunk) longer than twice its buffer.
    async with aiohttp.ClientSession(connector=connector, trust_env=False, read_bufsize=2**20) as session:
        target = await _resolve_target(session, cfg)
        await _probe(session, target)
        print(f"{target.url} model={target.model} dataset={cfg.dataset} prompts={cfg.num_prompts} "
              f"input={_show(cfg.input_len)} output={_show(cfg.output_len)} SLO: {cfg.slo.describe()}", flush=True)
        runs = []
        for i, load in enumerate(cfg.loads):
            # A fresh prompt set per load point: a prefix cache must not carry one run's prompts into the next.
            specs = build_dataset(cfg, random.Random(f"{cfg.seed}:{i}:prompts"))
            with tqdm(total=len(specs), desc=load.describe(), unit="req", disable=None, leave=False) as bar:
                results, duration = await run_load(session, target, specs, load,
                                                   random.Random(f"{cfg.seed}:{i}:arrivals"), bar)
            run = RunResult(load, summarize(results, duration, cfg.slo), tuple(results))
            print(format_run(run, cfg.slo), flush=True)
            runs.append(run)
    return BenchResult(cfg.label or f"{target.model}@{urllib.parse.urlsplit(cfg.base_url).netloc}",
                       _config_json(cfg, target.model), cfg.slo, tuple(runs))


def _show(bounds: tuple[int, int]) -> str:
    return str(bounds[0]) if bounds[0] == bounds[1] else f"{bounds[0]}-{bounds[1]}"


def _config_json(cfg: ServeConfig, model: str) -> dict[str, Any]:
    """What the result file records of the configuration (never the API key)."""
    return {"base_url": cfg.base_url, "model": model, "endpoint": cfg.endpoint, "dataset": cfg.dataset,
            "num_prompts": cfg.num_prompts, "input_len": list(cfg.input_len), "output_len": list(cfg.output_len),
            "num_prefixes": cfg.num_prefixes, "prefix_len": cfg.prefix_len, "seed": cfg.seed,
            "timeout": cfg.timeout, "tokens_per_word": TOKENS_PER_WORD}


def write_results(result: BenchResult, out_dir: Path, plots: bool) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "result.json"]
    paths[0].write_text(json.dumps(to_json(result), indent=1))
    if len(result.runs) > 1:
        for run in result.runs:
            one = BenchResult(result.label, result.config, result.slo, (run,))
            path = out_dir / f"result-{run.load.kind}-{run.load.label().replace('c=', '')}.json"
            path.write_text(json.dumps(to_json(one), indent=1))
            paths.append(path)
    if plots:
        paths += write_plots([result], out_dir)
    return paths


def compare(files: Sequence[str], out_dir: Path) -> list[Path]:
    if len(files) < 2:
        raise ValueError("--compare needs two or more result files")
    results = [from_json(json.loads(Path(f).read_text())) for f in files]
    labels = [r.label for r in results]
    if len(set(labels)) < len(labels):  # same endpoint measured twice: tell the files apart
        results = [BenchResult(Path(f).stem, r.config, r.slo, r.runs) for f, r in zip(files, results)]
    for r in results:
        print(f"== {r.label}\n{format_table(r.runs)}")
    return write_plots(results, out_dir)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.compare:
            paths = compare(args.compare, Path(args.output_dir or "."))
            print("wrote " + " ".join(str(p) for p in paths))
            return 0
        cfg = config_from_args(args)
        result = asyncio.run(run_bench(cfg))
    except (ValueError, RuntimeError, OSError, aiohttp.ClientError) as err:
        print(f"pdserve bench serve: {err}", file=sys.stderr)
        return 2 if isinstance(err, ValueError) else 1
    if len(result.runs) > 1:
        print(format_table(result.runs))
    if cfg.output_dir is not None:
        paths = write_results(result, cfg.output_dir, cfg.plots)
        print("wrote " + " ".join(str(p) for p in paths))
    return 0
