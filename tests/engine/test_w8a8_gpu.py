"""W8A8 on a CUDA device: the Triton int8 kernels in the whole model (random int8 weights of
SmolLM2's shapes) against the torch references on the same device, and captured decode
graphs against eager steps."""
from __future__ import annotations

import pytest
import torch

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine import LLM
from pdserve.engine.evaluate import Scorer
from tests.engine.conftest import prompt_set

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
MODEL = "dummy:smollm2-135m-w8a8"


def test_w8a8_triton_kernels_agree_with_the_torch_references_in_the_whole_model():
    """The same model (random weights are drawn on the device) run by the Triton backend and
    by the torch reference backend, float32 activations: positions may differ only where a
    value rounds to the other side of a quantization boundary (see test_w8a8.py)."""
    from pdserve.engine.backends.torch_backend import TorchBackend

    ids = prompt_set(49152, seed=11, lengths=(48,))[0]
    scorer = Scorer(MODEL, "float32", "cuda")
    triton_logits = scorer.logits(ids).float().cpu()
    scorer.backend = TorchBackend()
    reference = scorer.logits(ids).float().cpu()
    per_position = (triton_logits - reference).abs().amax(dim=-1) / (reference.max() - reference.min()).item()
    assert per_position[0].item() < 1e-4, per_position.tolist()  # before any flip: the same arithmetic
    assert per_position.max().item() < 0.05, per_position.tolist()


def test_w8a8_decode_graphs_equal_eager_steps():
    prompts = prompt_set(49152, seed=12, lengths=(5, 17, 40))
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    graphs = LLM(MODEL, device_type="cuda", dtype="bfloat16", num_blocks=256).generate(prompts, params)
    eager = LLM(MODEL, device_type="cuda", dtype="bfloat16", num_blocks=256, enforce_eager=True).generate(prompts, params)
    assert [o.token_ids for o in graphs] == [o.token_ids for o in eager]
