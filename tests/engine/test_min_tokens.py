"""``min_tokens`` (vLLM's sampling extension): EOS, stop_token_ids and stop strings cannot end
an output before it has that many tokens; after that they end it as usual."""
from __future__ import annotations

import pytest

from pdserve.common.detokenizer import IncrementalDetokenizer
from pdserve.common.sampling_params import SamplingParams
from pdserve.engine import LLM


def test_stop_tokens_are_suppressed_until_min_tokens(tiny_models):
    llm = LLM(tiny_models["llama"], num_blocks=32)
    prompt = [5, 17, 99, 300]
    free = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0].token_ids
    stop_at = free[0]
    stopped = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[stop_at]))[0]
    assert stopped.token_ids == [stop_at] and stopped.finish_reason == "stop"
    held = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[stop_at],
                                                 min_tokens=3))[0]
    assert stop_at not in held.token_ids[:3], held.token_ids
    if stop_at in held.token_ids:  # allowed from the fourth token on, and then it ends the output
        assert held.token_ids.index(stop_at) == len(held.token_ids) - 1 and held.finish_reason == "stop"
    assert llm.engine.stats()["kv_blocks_used"] == 0


def test_min_tokens_above_max_tokens_is_refused():
    with pytest.raises(ValueError, match=r"min_tokens \(5\) must be <= max_tokens \(4\)"):
        SamplingParams(max_tokens=4, min_tokens=5)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=-1)


class _Chars:
    """A tokenizer whose token i is the character chr(i)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("min_tokens, text, stopped", [
    (0, "ab", True),   # "ab" ends at the second token: stops
    (3, "abxab", True),  # the first "ab" is too early; the second ends at token 5
    (3, "abx", False),  # a stop string inside the first min_tokens tokens never counts
    (2, "ab", True),   # the min_tokens-th token may complete a stop string
])
def test_stop_strings_count_from_the_min_tokens_th_token(min_tokens, text, stopped):
    detok = IncrementalDetokenizer(_Chars(), [], stop=("ab",), min_tokens=min_tokens)
    done = False
    for ch in text:
        _, done = detok.add([ord(ch)])
        if done:
            break
    assert done == stopped
    if stopped:
        assert detok.text == text[:-2]
