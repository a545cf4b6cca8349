"""Sampler: filters against a direct computation, seeded reproducibility, penalties, stop strings, logprobs."""
from __future__ import annotations

import math

import pytest
import torch

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine import LLM
from pdserve.engine.request import Request
from pdserve.engine.sampler import apply_penalties, filter_logits
from tests.engine.conftest import DEVICES


def _direct_keep(row: list[float], k: int, p: float, min_p: float) -> set[int]:
    """Which tokens survive top-k, then top-p, then min-p, computed the slow obvious way."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    keep = order[:k] if k > 0 else order
    z = sum(math.exp(row[i]) for i in keep)
    nucleus, mass = [], 0.0
    for i in keep:
        if mass >= p and nucleus:
            break
        nucleus.append(i)
        mass += math.exp(row[i]) / z
    z = sum(math.exp(row[i]) for i in nucleus)
    top = max(math.exp(row[i]) / z for i in nucleus)
    return {i for i in nucleus if math.exp(row[i]) / z >= min_p * top}


@pytest.mark.parametrize("trial", range(5))
def test_filter_matches_direct_computation(trial):
    g = torch.Generator().manual_seed(trial)
    logits = torch.randn(6, 50, generator=g, dtype=torch.float64) * 2
    ks = torch.tensor([-1, 1, 5, 50, 10, -1])
    ps = torch.tensor([1.0, 1.0, 0.9, 0.5, 0.3, 0.95], dtype=torch.float64)
    mins = torch.tensor([0.0, 0.0, 0.0, 0.1, 0.0, 0.2], dtype=torch.float64)
    out = filter_logits(logits.clone(), ks, ps, mins)
    for r in range(6):
        got = {i for i in range(50) if out[r, i] != float("-inf")}
        assert got == _direct_keep(logits[r].tolist(), int(ks[r]), float(ps[r]), float(mins[r]))
        kept = list(got)
        assert torch.equal(out[r, kept], logits[r, kept])


def test_penalties_match_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    req = Request("r", [0, 1], SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25))
    req.token_ids += [3, 3, 4]  # outputs
    out = apply_penalties(logits.clone(), [req])
    expected = [2.0 / 2, -1.0 * 2, 0.5, 3.0 / 2 - 0.5 - 0.5, -2.0 * 2 - 0.5 - 0.25]
    assert out[0].tolist() == pytest.approx(expected)


@pytest.fixture(scope="module", params=DEVICES)
def tiny_llm(tiny_models, request):
    """The engine on each device type: on cuda the sampler runs on the GPU's logits."""
    return LLM(tiny_models["llama"], num_blocks=128, max_batch_size=8, device_type=request.param)


def test_seed_reproducible_whatever_the_batch(tiny_llm):
    p = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=42)
    alone = tiny_llm.generate([[5, 6, 7]], p)[0].token_ids
    crowd = tiny_llm.generate([[9, 9], [5, 6, 7], [1, 2, 3, 4]],
                              [SamplingParams(max_tokens=10, temperature=1.0), p,
                               SamplingParams(max_tokens=10, temperature=0.7, seed=1)])
    assert crowd[1].token_ids == alone
    other = tiny_llm.generate([[5, 6, 7]], p.replace(seed=43))[0].token_ids
    assert other != alone
    assert tiny_llm.kv_stats()["used"] == 0


def test_top_k_one_is_greedy(tiny_llm):
    greedy = tiny_llm.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0.0))[0].token_ids
    k1 = tiny_llm.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=1.5, top_k=1))[0].token_ids
    assert greedy == k1


def test_logprobs(tiny_llm):
    out = tiny_llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0.0, logprobs=3))[0]
    assert len(out.logprobs) == 4
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tok
        assert len(lp.top) == 3 and lp.top[0][0] == tok  # greedy picks the top-1
        assert lp.top[0][1] == pytest.approx(lp.logprob)
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
        assert lp.logprob <= 0


def test_max_tokens_and_ignore_eos(tiny_llm):
    out = tiny_llm.generate([[5, 6, 7]], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_stop_token_ids(tiny_llm):
    full = tiny_llm.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0.0))[0].token_ids
    stop_at = full[3]
    out = tiny_llm.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[stop_at]))[0]
    assert out.token_ids == full[: full.index(stop_at) + 1] and out.finish_reason == "stop"


def test_stop_strings_not_emitted(tiny_llm):
    full = tiny_llm.generate([[5, 6, 7]], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    out = tiny_llm.generate([[5, 6, 7]], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True,
                                                        stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.index(stop)]
    assert stop not in out.text
    assert tiny_llm.kv_stats()["used"] == 0


@pytest.mark.parametrize("penalty", [dict(frequency_penalty=2.0), dict(presence_penalty=2.0),
                                     dict(repetition_penalty=3.0)])
def test_penalties_remove_repeats(tiny_llm, penalty):
    base = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    plain = tiny_llm.generate([[1]], base)[0].token_ids
    assert len(set(plain)) < len(plain)  # this seeded tiny model repeats a token within 40
    pen = tiny_llm.generate([[1]], base.replace(**penalty))[0].token_ids
    assert len(set(pen)) == len(pen)
