"""AsyncEngine: concurrent streams equal the offline engine; abort and cancellation free blocks."""
from __future__ import annotations

import asyncio

import pytest

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine import LLM
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.config import EngineConfig

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def test_streams_match_offline_and_cancel_frees(tiny_models):
    path = tiny_models["llama"]
    prompts = [[5, 6, 7], [8] * 40, list(range(100, 130))]
    expected = [o.token_ids for o in LLM(path, num_blocks=64).generate(prompts, GREEDY)]

    async def main():
        eng = AsyncEngine(EngineConfig(model=path, num_blocks=64))
        await eng.start()
        try:
            async def collect(i):
                toks = []
                async for out in eng.generate(f"r{i}", prompts[i], GREEDY):
                    toks += out.new_token_ids
                    last = out
                assert last.finish_reason == "length" and last.num_prompt_tokens == len(prompts[i])
                return toks

            got = await asyncio.gather(*(collect(i) for i in range(3)))
            assert got == expected

            # closing a stream early aborts the request and frees its blocks
            gen = eng.generate("cut", [5] * 50, SamplingParams(max_tokens=1000, ignore_eos=True))
            await gen.__anext__()
            await gen.aclose()
            await asyncio.sleep(0.2)
            assert eng.stats()["kv_blocks_used"] == 0 and eng.stats()["running"] == 0

            # abort from outside ends the stream with 'abort'
            async def aborted():
                reasons = []
                async for out in eng.generate("ab", [5] * 10, SamplingParams(max_tokens=1000, ignore_eos=True)):
                    reasons.append(out.finish_reason)
                    if len(reasons) == 2:
                        eng.abort("ab")
                return reasons[-1]
            assert await aborted() == "abort"

            with pytest.raises(ValueError, match="empty"):
                async for _ in eng.generate("bad", [], GREEDY):
                    pass
            await asyncio.sleep(0.1)
            assert eng.stats()["kv_blocks_used"] == 0
        finally:
            await eng.stop()

    asyncio.run(main())


def test_async_remote_prefill_roundtrip(tiny_models):
    """Prefill on one AsyncEngine, copy the blocks, admit on another: same tokens as local."""
    path = tiny_models["mistral"]
    prompt = list(range(300, 345))
    expected = LLM(path, num_blocks=64).generate([prompt], GREEDY)[0].token_ids

    async def main():
        p = AsyncEngine(EngineConfig(model=path, num_blocks=64, role="prefill"))
        d = AsyncEngine(EngineConfig(model=path, num_blocks=64, role="decode"))
        await p.start(), await d.start()
        try:
            d_blocks, cached = await d.reserve_remote("x", prompt, GREEDY)
            try:
                first, p_blocks, _ = await p.prefill_held("x", prompt, GREEDY)
                d.engine.kv_cache[:, d_blocks] = p.engine.kv_cache[:, p_blocks[:len(d_blocks)]]
            finally:
                p.release_held("x")
            got = []
            async for out in d.admit_remote("x", first):
                got += out.new_token_ids
            assert got == expected
            await asyncio.sleep(0.1)
            assert p.stats()["kv_blocks_used"] == 0 and d.stats()["kv_blocks_used"] == 0
            with pytest.raises(ValueError, match="context"):
                await d.reserve_remote("y", [1] * 2000, GREEDY)
            held, _ = await d.reserve_remote("y", [1] * 900, GREEDY)
            assert await d.reserve_remote("z", [1] * 300, GREEDY) is None  # pool full for now
            assert await d.cancel_remote("y") and d.stats()["kv_blocks_used"] == 0
            assert await d.cancel_remote("nope") is False
        finally:
            await p.stop(), await d.stop()

    asyncio.run(main())


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_a_failing_step_fails_its_requests_frees_blocks_and_the_engine_goes_on(tiny_models, overlap):
    """A step that raises (e.g. out of device memory) ends the requests it held with an
    error on their streams, frees their blocks, and later requests are served."""
    path = tiny_models["llama"]
    expected = LLM(path, num_blocks=64).generate([[5, 6, 7]], GREEDY)[0].token_ids

    async def main():
        eng = AsyncEngine(EngineConfig(model=path, num_blocks=64, async_scheduling=overlap))
        runner = eng.engine.executor.rank.runner
        real, calls = runner.execute, []

        def flaky(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("simulated device failure")
            return real(*args, **kwargs)

        runner.execute = flaky
        await eng.start()
        try:
            async def run(rid, prompt):
                return [t async for out in eng.generate(rid, prompt, GREEDY) for t in out.new_token_ids]

            results = await asyncio.gather(run("a", [5] * 20), run("b", [9] * 30), return_exceptions=True)
            assert all(isinstance(r, RuntimeError) and "simulated device failure" in str(r) for r in results)
            assert eng.engine.kv_stats()["used"] == 0 and not eng.engine.has_unfinished()
            assert await run("c", [5, 6, 7]) == expected  # the loop is alive
        finally:
            await eng.stop()

    asyncio.run(main())
