"""Greedy output must be token-identical to Hugging Face transformers on the same weights,
through continuous batching, prefix-cache hits, chunked prefill and preemption.

The tiny random models also run on a CUDA device (Triton backend, decode steps in
CUDA graphs) against HF on the same device, both in float32."""
from __future__ import annotations

import pytest
import torch

from pdserve.engine import LLM, SamplingParams
from tests.engine.conftest import DEVICES, TINY_CONFIGS, hf_greedy, prompt_set

MAX_NEW = 12


def _run(llm: LLM, prompts, max_new=MAX_NEW, expect_cached=False):
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_new, temperature=0.0))
    assert llm.kv_stats()["used"] == 0, llm.kv_stats()
    assert llm.kv_stats()["free"] == llm.kv_stats()["total"]
    if expect_cached:
        assert sum(o.num_cached_tokens for o in outs) > 0
    return [o.token_ids for o in outs]


def _shared_prefix_prompts(base: list[list[int]]) -> list[list[int]]:
    """Prompts that share long prefixes with each other (prefix-cache hits inside one batch and across calls)."""
    stem = base[-1][:200]
    return [stem + p[:k] for p, k in zip(base, (1, 3, 16, 20, 7, 33, 2, 50))]


@pytest.fixture(scope="module")
def smol_prompts(smollm2_hf):
    from pdserve.common.tokenizer import load_tokenizer

    tok = load_tokenizer("smollm2")
    texts = ["Hi", "The capital of France is", "Write a short poem about the sea.",
             "Once upon a time, in a land far away, there lived a"]
    prompts = [tok.encode(t) for t in texts]
    prompts.append(tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}]))
    long_text = " ".join(f"Item {i} is a number that comes after {i - 1}." for i in range(1, 30))
    prompts += [tok.encode(long_text), tok.encode(long_text + " Summarize the list:"), [tok.encode("A")[0]]]
    return prompts


def test_smollm2_gguf_parity(smollm2_hf, smol_prompts):
    ref = hf_greedy(smollm2_hf, smol_prompts, MAX_NEW)
    llm = LLM("smollm2", num_blocks=512, max_batch_size=8)
    assert _run(llm, smol_prompts) == ref
    # second pass: everything is a prefix-cache hit now
    assert _run(llm, smol_prompts, expect_cached=True) == ref
    # chunked prefill with a small token budget, and preemption with a small pool
    chunked = LLM("smollm2", num_blocks=512, max_prefill_tokens=24)
    assert _run(chunked, smol_prompts) == ref
    longest = max(len(p) for p in smol_prompts)
    tight = LLM("smollm2", num_blocks=-(-(longest + MAX_NEW) // 16) + 2, max_batch_size=8, max_prefill_tokens=64)
    assert _run(tight, smol_prompts) == ref
    assert tight.engine.stats()["preemptions_total"] > 0
    assert chunked.engine.stats()["steps_total"] >= longest // 24  # the long prompt took many chunks


@pytest.mark.parametrize("overlap", [None, True], ids=["overlap-auto", "overlap-on"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_tiny_random_parity(kind, device, overlap, tiny_models):
    """``overlap``: launch each step before reading the previous step's tokens (the
    default on CUDA; forced on CPU here, where it is off by default)."""
    from transformers import AutoModelForCausalLM

    path = tiny_models[kind]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    prompts = prompt_set(49152, seed=7)
    ref = hf_greedy(hf, prompts, MAX_NEW)
    if device == "cpu" and overlap is None and kind != "llama":
        pytest.skip("the CPU default (no overlap) runs for one architecture here; the others run with overlap")
    if device == "cuda" and overlap:
        pytest.skip("overlap is already the default on CUDA")
    opts = dict(device_type=device, async_scheduling=overlap)
    if device == "cpu" and overlap is None:
        opts["compiled_cpu_kernels"] = False  # the pure-torch path here; the compiled kernels elsewhere
    llm = LLM(path, num_blocks=256, max_batch_size=8, **opts)
    if opts.get("compiled_cpu_kernels") is False:
        assert llm.engine.executor.rank.runner.backend.name == "torch"
    assert _run(llm, prompts) == ref
    assert (llm.engine.stats()["overlapped_steps_total"] > 0) == llm.engine.overlap

    shared = _shared_prefix_prompts(prompts)
    ref_shared = hf_greedy(hf, shared, MAX_NEW)
    assert _run(llm, shared, expect_cached=True) == ref_shared  # shares within the batch
    assert _run(llm, shared, expect_cached=True) == ref_shared  # all prefixes cached now

    chunked = LLM(path, num_blocks=256, max_prefill_tokens=32, **opts)
    assert _run(chunked, prompts) == ref
    assert chunked.engine.stats()["steps_total"] >= max(len(p) for p in prompts) // 32
    tight = LLM(path, num_blocks=45, max_batch_size=8, max_prefill_tokens=128, **opts)
    assert _run(tight, prompts) == ref
    assert tight.engine.stats()["preemptions_total"] > 0
