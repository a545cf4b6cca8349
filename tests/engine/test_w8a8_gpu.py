"""W8A8 on a CUDA device: the Triton int8 kernels in the whole model (random int8 weights of
SmolLM2's shapes), against the CPU's kernels, and captured decode graphs against eager steps."""
from __future__ import annotations

import pytest
import torch

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine import LLM
from pdserve.engine.evaluate import Scorer
from tests.engine.conftest import prompt_set

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
MODEL = "dummy:smollm2-135m-w8a8"


def test_w8a8_logits_on_cuda_agree_with_the_cpu():
    """float32 activations: the same int8 sums on both devices; positions may differ where a
    value rounds to the other side of a quantization boundary (see test_w8a8.py)."""
    ids = prompt_set(49152, seed=11, lengths=(48,))[0]
    cuda = Scorer(MODEL, "float32", "cuda").logits(ids).float().cpu()
    cpu = Scorer(MODEL, "float32", "cpu").logits(ids).float()
    per_position = (cuda - cpu).abs().amax(dim=-1) / (cpu.max() - cpu.min()).item()
    assert per_position[:4].max().item() < 1e-3, per_position.tolist()
    assert per_position.max().item() < 0.05, per_position.tolist()


def test_w8a8_decode_graphs_equal_eager_steps():
    prompts = prompt_set(49152, seed=12, lengths=(5, 17, 40))
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    graphs = LLM(MODEL, device_type="cuda", dtype="bfloat16", num_blocks=256).generate(prompts, params)
    eager = LLM(MODEL, device_type="cuda", dtype="bfloat16", num_blocks=256, enforce_eager=True).generate(prompts, params)
    assert [o.token_ids for o in graphs] == [o.token_ids for o in eager]
