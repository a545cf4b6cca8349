"""AsyncEngine: concurrent streams equal the offline engine; abort and cancellation free blocks."""
from __future__ import annotations

import asyncio

import pytest

from services.common.sampling_params import SamplingParams
from services.engine import LLM
from services.engine.async_engine import AsyncEngine
from services.engine.config import EngineConfig

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
