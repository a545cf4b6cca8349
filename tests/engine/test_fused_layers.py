"""The CPU backend's fused decoder layers (one compiled call per layer) against the same model
run op by op: the same logprobs to the bit, through prefill chunks, decode steps, prefix-cache
hits and mixed batches, with and without LoRA adapters; and which models fuse."""
from __future__ import annotations

import pytest
import torch

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.backends.cpu_backend import CpuBackend
from pdserve.kernels.cpu import load_cpu_kernels
from tests.engine.conftest import prompt_set

KERNELS = load_cpu_kernels()
pytestmark = pytest.mark.skipif(KERNELS is None, reason="needs a C compiler with OpenMP")


def _model(llm: LLM):
    return llm.engine.executor.rank.model


def _generate(llm: LLM, prompts: list[list[int]]) -> list[tuple[list[int], list[float]]]:
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=0)
    outs = llm.generate(prompts, params)
    return [(o.token_ids, [lp.logprob for lp in o.logprobs]) for o in outs]


def _prompts() -> list[list[int]]:
    base = prompt_set(49152, 7, lengths=(1, 9, 40, 130))
    return base + [base[-1][:100] + [5, 6, 7]]  # a prefix-cache hit on the second call


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: qkv bias and tied embeddings
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_layers_equal_op_by_op(tiny_models, kind, dtype, monkeypatch) -> None:
    if getattr(torch, dtype) not in KERNELS.linear_vec:
        pytest.skip(f"{dtype} linear is not vectorized by this build: nothing to fuse")
    args = dict(dtype=dtype, num_blocks=128, max_batch_size=4, max_prefill_tokens=48)
    fused = LLM(tiny_models[kind], **args)
    assert _model(fused).fused is not None
    with monkeypatch.context() as patch:
        patch.setattr(CpuBackend, "fuse_decoder_layers", lambda self, layers: None)
        plain = LLM(tiny_models[kind], **args)
    assert _model(plain).fused is None
    prompts = _prompts()
    for _ in range(2):  # the second round hits the prefix cache
        assert _generate(fused, prompts) == _generate(plain, prompts)


@pytest.mark.parametrize("kind", ["qwen3", "mixtral", "qwen2_moe"])
def test_layers_the_fused_call_does_not_cover_run_op_by_op(tiny_models, kind) -> None:
    llm = LLM(tiny_models[kind], num_blocks=64)
    assert _model(llm).fused is None  # q/k norms; experts
    assert len(llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0.0))[0].token_ids) == 2


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory) -> dict[str, str]:
    from tests.engine.test_lora import ADAPTERS, make_adapter

    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tiny_models["llama"], str(root / name), *spec, seed=40 + i)
            for i, (name, spec) in enumerate(ADAPTERS.items())}


@pytest.mark.parametrize("targets", [None, ("gate_proj", "down_proj")], ids=["all", "mlp-only"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_layers_with_adapters_equal_op_by_op(tiny_models, adapters, dtype, targets, monkeypatch) -> None:
    """Adapters of different ranks (and, with ``mlp-only``, only gate_up and down wrapped) in
    batches that mix them with the base model: the fused layers add each projection's LoRA
    delta as the op-by-op path does, to the bit."""
    if getattr(torch, dtype) not in KERNELS.linear_vec:
        pytest.skip(f"{dtype} linear is not vectorized by this build: nothing to fuse")
    names = ["mlp"] if targets else list(adapters)
    args = dict(dtype=dtype, num_blocks=128, max_batch_size=4, max_prefill_tokens=48, max_loras=2,
                max_cpu_loras=4, adapters=tuple(f"{n}={adapters[n]}" for n in names),
                lora_target_modules=targets or ("all",))
    fused = LLM(tiny_models["llama"], **args)
    assert _model(fused).fused is not None
    with monkeypatch.context() as patch:
        patch.setattr(CpuBackend, "fuse_decoder_layers", lambda self, layers: None)
        plain = LLM(tiny_models["llama"], **args)
    assert _model(plain).fused is None
    prompts = _prompts()
    which = [([None] + names)[i % (len(names) + 1)] for i in range(len(prompts))]  # all: 3 adapters, 2 slots
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=0)
    for _ in range(2):  # the second round hits the prefix cache
        outs = [[(o.token_ids, [lp.logprob for lp in o.logprobs]) for o in llm.generate(prompts, params, adapter=which)]
                for llm in (fused, plain)]
        assert outs[0] == outs[1]
    assert fused.engine.stats()["kv_blocks_used"] == 0


def test_the_torch_path_does_not_fuse(tiny_models) -> None:
    assert _model(LLM(tiny_models["llama"], num_blocks=64, compiled_cpu_kernels=False)).fused is None
