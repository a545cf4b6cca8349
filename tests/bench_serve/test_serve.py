"""``pdserve bench serve``: unit tests of its schedule, datasets, statistics, stream parsing,
result files and plots; the client against a small in-process fake server (error kinds,
chat shape, concurrency, no matplotlib); one end-to-end run against a real cluster."""
from __future__ import annotations

import asyncio
import json
import random
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
from aiohttp import web

from pdserve.bench import serve
from pdserve.bench.serve_report import (BenchResult, Load, RequestResult, RunResult, Slo, format_run, from_json,
                                        percentile, summarize, to_json)
from pdserve.launcher.processes import free_port
from tests.services.cluster_fixture import local_cluster

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def config(*flags: str) -> serve.ServeConfig:
    return serve.config_from_args(serve.build_parser().parse_args(list(flags)))


def done(ttft: float, e2e: float, tokens: int, prompt: int = 10, start: float = 0.0) -> RequestResult:
    gap = (e2e - ttft) / max(1, tokens - 1)
    return RequestResult(input_len=prompt, output_len=tokens, start=start, ttft=ttft, e2e=e2e,
                         itl=(gap,) * (tokens - 1), output_tokens=tokens, prompt_tokens=prompt)


# Schedule and datasets.

def test_poisson_arrivals_are_seeded_with_mean_gap_one_over_rate() -> None:
    times = serve.arrival_times(4000, 10.0, random.Random(1))
    assert times[0] == 0.0 and times == sorted(times)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(0.1, rel=0.06)
    assert times == serve.arrival_times(4000, 10.0, random.Random(1))
    assert times != serve.arrival_times(4000, 10.0, random.Random(2))
    assert serve.arrival_times(5, float("inf"), random.Random(1)) == [0.0] * 5


def test_random_dataset_lengths_fixed_and_ranged() -> None:
    specs = serve.build_dataset(config("--num-prompts", "20", "--input-len", "50", "--output-len", "7"),
                                random.Random(0))
    assert len(specs) == 20
    assert all(len(s.prompt.split()) == 50 == s.input_len and s.output_len == 7 for s in specs)
    assert all(set(s.prompt.split()) <= set(serve.WORDS) for s in specs)
    cfg = config("--num-prompts", "200", "--input-len-range", "10,30", "--output-len-range", "2,5")
    specs = serve.build_dataset(cfg, random.Random(0))
    assert {len(s.prompt.split()) for s in specs} <= set(range(10, 31))
    assert {s.output_len for s in specs} == {2, 3, 4, 5}
    assert specs == serve.build_dataset(cfg, random.Random(0))


def test_shared_prefix_dataset_really_shares_prefixes() -> None:
    cfg = config("--dataset", "shared-prefix", "--num-prompts", "12", "--num-prefixes", "3", "--input-len", "24",
                 "--prefix-len", "20", "--output-len", "4")
    specs = serve.build_dataset(cfg, random.Random(0))
    words = [s.prompt.split() for s in specs]
    assert all(len(w) == 24 == s.input_len for w, s in zip(words, specs))
    groups: dict[tuple[str, ...], int] = {}
    for w in words:
        groups[tuple(w[:20])] = groups.get(tuple(w[:20]), 0) + 1
    assert sorted(groups.values()) == [4, 4, 4]
    assert len({tuple(w[20:]) for w in words}) == 12  # every suffix its own


def test_default_prefix_is_seven_eighths_of_the_input() -> None:
    cfg = config("--dataset", "shared-prefix", "--input-len", "64")
    assert cfg.prefix_len == 56


def test_chat_mix_has_short_long_prompt_and_long_answer_requests() -> None:
    cfg = config("--dataset", "chat-mix", "--num-prompts", "300", "--input-len", "100", "--output-len", "40")
    specs = serve.build_dataset(cfg, random.Random(0))
    assert all(25 <= s.input_len <= 400 and 10 <= s.output_len <= 160 for s in specs)
    assert all(len(s.prompt.split()) == s.input_len for s in specs)
    assert any(s.input_len > 100 for s in specs) and any(s.output_len > 40 for s in specs)
    assert sum(s.input_len <= 100 and s.output_len <= 40 for s in specs) > 120  # most are short turns


@pytest.mark.parametrize("flags", [["--request-rate", "0"], ["--request-rate", "x"], ["--concurrency", "1.5"],
                                   ["--input-len-range", "9,3"], ["--num-prompts", "0"]])
def test_bad_flags_are_refused(flags: list[str], capsys: pytest.CaptureFixture) -> None:
    assert serve.main(flags) == 2
    assert "pdserve bench serve:" in capsys.readouterr().err


def test_loads_from_flags() -> None:
    assert config("--request-rate", "4,inf").loads == (Load("rate", 4.0), Load("rate", float("inf")))
    assert config("--concurrency", "1,8").loads == (Load("concurrency", 1.0), Load("concurrency", 8.0))


# Statistics.

def test_percentile_interpolates_linearly() -> None:
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 90) == pytest.approx(4.6)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 5.0
    assert percentile([7.0], 99) == 7.0


def test_tpot_of_single_and_multi_token_outputs() -> None:
    assert done(0.1, 0.5, 5).tpot == pytest.approx(0.1)
    assert done(0.1, 0.1, 1).tpot is None
    assert RequestResult(10, 5, 0.0, error="timeout").tpot is None
    summary = summarize([done(0.1, 0.1, 1), done(0.1, 0.5, 5)], 1.0, Slo())
    assert summary.tpot.n == 1 and summary.tpot.mean == pytest.approx(100.0)


def test_goodput_counts_only_requests_meeting_every_slo() -> None:
    requests = [done(0.05, 0.45, 5),  # ttft 50 ms, tpot 100 ms: good
                done(0.30, 0.70, 5),  # ttft too slow
                done(0.05, 0.85, 5),  # tpot 200 ms: too slow
                done(0.05, 0.05, 1),  # one token: no TPOT, meets it
                RequestResult(10, 5, 0.0, error="http_500")]
    s = summarize(requests, 2.0, Slo(ttft_ms=100.0, tpot_ms=150.0))
    assert (s.completed, s.failed, s.errors, s.good) == (4, 1, {"http_500": 1}, 2)
    assert s.goodput == pytest.approx(1.0) and s.request_throughput == pytest.approx(2.0)
    assert s.output_throughput == pytest.approx(16 / 2.0)
    assert s.total_throughput == pytest.approx((16 + 40) / 2.0)
    assert s.ttft.p50 == pytest.approx(50.0) and s.e2e.n == 4
    only_ttft = summarize(requests, 2.0, Slo(ttft_ms=100.0))
    assert only_ttft.good == 3
    assert summarize(requests, 2.0, Slo()).goodput is None


# The stream.

def test_sse_lines() -> None:
    assert serve.parse_sse_line(b'data: {"a": 1}\n') == {"a": 1}
    assert serve.parse_sse_line(b"data:[DONE]\r\n") == serve.DONE
    assert serve.parse_sse_line(b"\n") is None
    assert serve.parse_sse_line(b": keep-alive\n") is None
    assert serve.parse_sse_line("event: message") is None


def test_completion_and_chat_chunk_shapes() -> None:
    completion = {"object": "text_completion", "choices": [{"index": 0, "text": " Paris", "finish_reason": None}],
                  "usage": None}
    assert serve.parse_chunk(completion) == serve.Chunk(text=" Paris")
    role = {"object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    assert serve.parse_chunk(role).text == ""  # no token yet
    content = {"choices": [{"index": 0, "delta": {"content": " Paris"}, "finish_reason": "length"}]}
    assert serve.parse_chunk(content).text == " Paris"
    usage = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 8, "total_tokens": 17}}
    chunk = serve.parse_chunk(usage)
    assert chunk.text is None and chunk.usage["completion_tokens"] == 8
    assert serve.parse_chunk({"error": {"message": "boom", "code": 502}}).error == "stream_error"


# Result files and plots.

def fabricated(label: str, scale: float) -> BenchResult:
    slo = Slo(ttft_ms=200.0, tpot_ms=60.0)
    runs = []
    for rate in (1.0, 4.0, float("inf")):
        reqs = [done(0.05 * scale * (1 + i % 3), 0.4 * scale + 0.01 * i, 8, start=i * 0.1) for i in range(10)]
        reqs.append(RequestResult(32, 8, 1.0, error="timeout"))
        runs.append(RunResult(Load("rate", rate), summarize(reqs, 3.0 / scale, slo), tuple(reqs)))
    return BenchResult(label, {"model": "m", "num_prompts": 11}, slo, tuple(runs))


def test_json_round_trip(tmp_path: Path) -> None:
    result = fabricated("a", 1.0)
    concurrency = RunResult(Load("concurrency", 4.0), result.runs[0].summary, result.runs[0].requests)
    result = BenchResult(result.label, result.config, result.slo, result.runs + (concurrency,))
    path = tmp_path / "r.json"
    path.write_text(json.dumps(to_json(result)))
    assert "Infinity" not in path.read_text()
    assert from_json(json.loads(path.read_text())) == result
    with pytest.raises(ValueError, match="schema"):
        from_json({"schema": "other"})


def test_compare_plots_two_result_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for name, scale in (("a", 1.0), ("b", 1.5)):
        (tmp_path / f"{name}.json").write_text(json.dumps(to_json(fabricated(name, scale))))
    out = tmp_path / "plots"
    assert serve.main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--output-dir", str(out)]) == 0
    for name in ("latency_cdf.png", "throughput.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and 5_000 < len(data) < 500_000
    printed = capsys.readouterr().out
    assert "== a" in printed and "== b" in printed and "inf" in printed
    assert serve.main(["--compare", str(tmp_path / "a.json")]) == 2


# The client against a fake OpenAI server in a thread: request n (the probe is 0) answers 429 when
# n % 4 == 3 and breaks its stream with an error chunk when n % 4 == 2.

def _fake_app() -> web.Application:
    counter = iter(range(1_000_000))

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model"}, {"id": "other"}]})

    async def generate(request: web.Request) -> web.StreamResponse:
        n, body = next(counter), await request.json()
        assert body["stream"] and body["ignore_eos"] and body["stream_options"] == {"include_usage": True}
        assert body["model"] == "fake-model" and request.headers["Authorization"] == "Bearer sk-test"
        if n % 4 == 3:
            return web.json_response({"error": {"message": "busy"}}, status=429)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chat = request.path.endswith("/chat/completions")
        if chat:
            await _event(response, {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for i in range(body["max_tokens"]):
            await asyncio.sleep(0.002)
            if n % 4 == 2 and i == 1:
                await _event(response, {"error": {"message": "worker lost"}})
                break
            text = {"delta": {"content": f" w{i}"}} if chat else {"text": f" w{i}"}
            await _event(response, {"choices": [{"index": 0, **text, "finish_reason": None}]})
        else:
            usage = {"prompt_tokens": len(body["messages"][0]["content"].split()) + 5 if chat else 0,
                     "completion_tokens": body["max_tokens"], "total_tokens": 0}
            await _event(response, {"choices": [], "usage": usage})
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", generate)
    app.router.add_post("/v1/chat/completions", generate)
    return app


async def _event(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(payload)}\n\n".encode())


@pytest.fixture
def fake_server() -> Iterator[str]:
    loop, port, started = asyncio.new_event_loop(), free_port(), threading.Event()
    runner = web.AppRunner(_fake_app())

    def serve_forever() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve_forever, daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_chat_client_error_kinds_and_no_matplotlib(fake_server: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # importing matplotlib now fails
    argv = ["--base-url", fake_server, "--endpoint", "chat", "--num-prompts", "8", "--concurrency", "2",
            "--input-len", "12", "--output-len", "5", "--api-key", "sk-test", "--slo-ttft-ms", "5000",
            "--output-dir", str(tmp_path), "--no-plots"]
    assert serve.main(argv) == 0
    result = from_json(json.loads((tmp_path / "result.json").read_text()))
    assert result.label.startswith("fake-model@127.0.0.1:") and not list(tmp_path.glob("*.png"))
    run, = result.runs
    assert run.summary.errors == {"http_429": 2, "stream_error": 2} and run.summary.completed == 4
    for r in (r for r in run.requests if r.ok):
        assert r.output_tokens == 5 and len(r.itl) == 4 and r.prompt_tokens == 17 and 0 < r.ttft <= r.e2e
    assert "concurrency 2" in capsys.readouterr().out
    assert "sk-test" not in (tmp_path / "result.json").read_text()


def test_unreachable_endpoint_fails_with_the_reason(capsys: pytest.CaptureFixture) -> None:
    argv = ["--base-url", f"http://127.0.0.1:{free_port()}", "--model", "m", "--num-prompts", "1", "--no-plots"]
    assert serve.main(argv) == 1
    assert "probe request" in capsys.readouterr().err


# End to end against a real cluster.

@pytest.mark.timeout(300)
def test_against_a_real_cluster(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    argv = ["--num-prompts", "8", "--input-len", "32", "--output-len", "8", "--request-rate", "4,inf",
            "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000", "--seed", "3", "--output-dir", str(out)]
    with local_cluster(hybrid=1, log_dir=str(tmp_path)) as cluster:
        assert serve.main(["--base-url", cluster.http_url, *argv]) == 0
    printed = capsys.readouterr().out
    print(printed)  # the summary, for -s runs
    result = from_json(json.loads((out / "result.json").read_text()))
    assert [run.load.label() for run in result.runs] == ["4", "inf"]
    for run in result.runs:
        s = run.summary
        assert (s.completed, s.failed, s.errors) == (8, 0, {})
        assert all(r.output_tokens == 8 and r.ttft <= r.e2e and 28 <= r.prompt_tokens <= 40 for r in run.requests)
        assert s.good is not None and s.goodput <= s.request_throughput
        assert format_run(run, result.slo).splitlines()[0] in printed
    for name in ("result-rate-4.json", "result-rate-inf.json", "latency_cdf.png", "throughput.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "throughput.png").read_bytes().startswith(PNG_MAGIC)
