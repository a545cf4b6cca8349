"""W8A8 (SmoothQuant, compressed-tensors int8) in the engine, on the CPU.

- Checkpoints made by llmcompressor from tiny random models load and compute what the
  checkpoint means: pdserve's logits against a float fake-quant forward of the same
  checkpoint (``w8a8_reference.fake_quant_model``).
- ``pdserve quantize smoothquant`` on the default model: perplexity on held-out text
  within 3% of the unquantized model (both computed by pdserve), greedy text still
  sensible, and the checkpoint loads in transformers with compressed-tensors.
- Everything else quantized, and W8A8 layouts pdserve cannot run, is refused by name.

Tolerance against the fake-quant reference: activations are rounded per token, so a
value that sits on a rounding boundary may round the other way after float sums in a
different order; a flip changes that position's logits a little. Positions without a
flip agree to 1e-4 of the logits' range, and we require at least 85% of them; every
position agrees to 10% of the range. In a deep model a flip in an early layer moves later
activations enough to flip others (float32 sums in another order, e.g. another CPU's
kernels, are enough to start it), so for the 30 layers of the default model the check is
statistical, over three texts (72 positions): the same top token at 85% of positions, and
where not, our top token within 5% of the range of the reference's top logit (a near tie
there); per-position deviation at most 10% of the range, its median at most 4%. Measured on
an AVX2 CPU, with the compiled kernels and with pure torch: 92-94% top-1 agreement, median
2.0-2.3%, maximum 7.7%. (One 14-token text with 90% top-1 agreement passed on an AVX-512 CPU
and failed on that AVX2 one: 3 near ties.)
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine import LLM
from pdserve.engine.evaluate import Scorer, heldout_text, perplexity
from pdserve.engine.lora import LoRALinearMethod
from pdserve.engine.models.loader import load_config
from pdserve.engine.models.registry import UnsupportedModelError
from pdserve.common.model_source import resolve_model
from tests.engine.conftest import hf_greedy, needs_smollm2, prompt_set
from tests.engine.w8a8_reference import fake_quant_model, make_llmcompressor_checkpoint

pytest.importorskip("llmcompressor")
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    per_position = (ours - ref).abs().amax(dim=-1) / (ref.max() - ref.min()).item()
    assert (per_position <= 1e-4).float().mean().item() >= 0.85, per_position.tolist()
    assert per_position.max().item() <= 0.1, per_position.tolist()


def assert_logits_agree(ours: list[torch.Tensor], refs: list[torch.Tensor]) -> None:
    """The deep-model check of the module doc, over the positions of several texts."""
    spans = [(r.max() - r.min()).item() for r in refs]
    per_position = torch.cat([(o - r).abs().amax(dim=-1) / s for o, r, s in zip(ours, refs, spans)])
    top = [o.argmax(-1, keepdim=True) for o in ours]
    same = torch.cat([t.squeeze(-1) == r.argmax(-1) for t, r in zip(top, refs)])
    shortfall = torch.cat([(r.amax(-1) - r.gather(-1, t).squeeze(-1)) / s for t, r, s in zip(top, refs, spans)])
    assert same.float().mean().item() >= 0.85, same.tolist()
    assert shortfall.max().item() <= 0.05, shortfall.tolist()
    assert per_position.median().item() <= 0.04 and per_position.max().item() <= 0.1, per_position.tolist()


@pytest.fixture(scope="module")
def llmc(tiny_models, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("llmcompressor")
    return {kind: make_llmcompressor_checkpoint(tiny_models[kind], str(root / kind)) for kind in ("llama", "qwen2")}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_an_llmcompressor_checkpoint_computes_its_fake_quant_reference(llmc, kind):
    path = llmc[kind]
    cfg = load_config(resolve_model(path))
    assert cfg.quantization.method == "compressed-tensors"
    ref = fake_quant_model(path)
    scorer = Scorer(path)
    for ids in prompt_set(cfg.vocab_size, seed=7, lengths=(1, 17, 64)):
        with torch.no_grad():
            expected = ref(torch.tensor([ids])).logits[0]
        assert_logits_close(scorer.logits(ids), expected)


def test_greedy_batches_of_a_w8a8_model_equal_one_at_a_time(llmc):
    """Per-token activation scales: a row's result never depends on the rows beside it."""
    llm = LLM(llmc["qwen2"], max_batch_size=8)
    prompts = prompt_set(49152, seed=3, lengths=(1, 5, 17, 40))
    together = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    alone = [llm.generate([p], GREEDY)[0].token_ids for p in prompts]
    assert together == alone


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: qkv bias
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_w8a8_layers_equal_op_by_op(llmc, kind, dtype, monkeypatch):
    """The CPU backend's fused W8A8 layers (one compiled call per layer, where the build has a
    vector int8 GEMM) give the op-by-op path's logprobs to the bit, through prefill chunks,
    decode steps, a prefix-cache hit and mixed batches."""
    from pdserve.engine.backends.cpu_backend import CpuBackend
    from pdserve.kernels.cpu import load_cpu_kernels

    kernels = load_cpu_kernels()
    if kernels is None or kernels.int8_gemm_vec is None:
        pytest.skip("no vector int8 GEMM in this build: W8A8 layers run op by op")
    args = dict(dtype=dtype, num_blocks=128, max_batch_size=4, max_prefill_tokens=48)
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=0)
    fused = LLM(llmc[kind], **args)
    assert fused.engine.executor.rank.model.fused is not None
    with monkeypatch.context() as patch:
        patch.setattr(CpuBackend, "fuse_decoder_layers", lambda self, layers: None)
        plain = LLM(llmc[kind], **args)
    assert plain.engine.executor.rank.model.fused is None
    base = prompt_set(49152, seed=9, lengths=(1, 9, 40, 130))
    prompts = base + [base[-1][:100] + [5, 6, 7]]
    for _ in range(2):  # the second round hits the prefix cache
        outs = [[(o.token_ids, [lp.logprob for lp in o.logprobs]) for o in llm.generate(prompts, params)]
                for llm in (fused, plain)]
        assert outs[0] == outs[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-interpreter test (test_w8a8_gpu runs these kernels)")
def test_triton_fused_int8_gemvs_give_the_unfused_kernels_logprobs(llmc, monkeypatch):
    """Triton backend, decode steps of one row: o_proj quantizes its input inside its GEMV and
    gate_up applies SiLU-and-mul in its epilogue (kernels/int8_gemv_fused.py); the prefill: the
    gate_up GEMM does (int8.int8_gemm_silu, from 2 rows here instead of 65: the interpreter is
    slow). Logprobs equal those of the unfused kernels to the bit, and the fused kernels ran."""
    from pdserve.engine.backends import triton_backend
    from pdserve.engine.backends.torch_backend import TorchBackend
    from pdserve.engine.backends.triton_backend import TritonBackend
    from pdserve.engine.platforms.cpu import CpuPlatform
    from pdserve.kernels import int8, int8_gemv_fused
    from tests.engine.conftest import use_triton_runner

    calls: list[str] = []
    for module, name in ((int8_gemv_fused, "int8_gemv_dynamic"), (int8_gemv_fused, "int8_gemv_silu"),
                         (int8, "int8_gemm_silu")):
        kernel = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _k=kernel, _n=name, **kw: (calls.append(_n), _k(*a, **kw))[1])
    params = SamplingParams(max_tokens=3, temperature=0.0, logprobs=0, ignore_eos=True)
    monkeypatch.setattr(triton_backend, "SILU_GEMM_MIN_ROWS", 2)
    prompts = prompt_set(49152, seed=8, lengths=(5,))  # prefill: the SiLU GEMM; decode: the fused GEMVs

    def run() -> list:
        llm = LLM(llmc["llama"], dtype="float32", num_blocks=8, max_batch_size=1, compiled_cpu_kernels=False)
        use_triton_runner(llm, CpuPlatform(), ())
        return [(o.token_ids, [lp.logprob for lp in o.logprobs]) for o in llm.generate(prompts, params)]

    fused = run()
    assert {"int8_gemv_dynamic", "int8_gemv_silu", "int8_gemm_silu"} <= set(calls)
    monkeypatch.setattr(TritonBackend, "int8_linear_silu", lambda self, *a: None)
    monkeypatch.setattr(TritonBackend, "int8_linear_dynamic", TorchBackend.int8_linear_dynamic)
    calls.clear()
    assert run() == fused and not calls


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_w8a8_with_tp2_computes_the_per_rank_reference(llmc, kind):
    """Each rank rounds its own slice of a row-parallel layer's input (its own scale), as
    vLLM does; the reference rounds the same slices."""
    prompts = prompt_set(49152, seed=5, lengths=(3, 17, 40))
    expected = hf_greedy(fake_quant_model(llmc[kind], tp=2), prompts, GREEDY.max_tokens)
    llm = LLM(llmc[kind], tp=2, num_blocks=64, max_prefill_tokens=32)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == expected


@pytest.mark.parametrize("name", ["all", "qv"])
def test_w8a8_with_lora_adapters_matches_peft_on_the_fake_quant_model(tiny_models, llmc, tmp_path, name):
    """LoRA on a W8A8 base: the base matmul in int8, the adapter's delta from the unrounded input
    (qv: only the qkv layers are wrapped; the others keep their fused quantization)."""
    peft = pytest.importorskip("peft")
    from tests.engine.test_lora import ADAPTERS, make_adapter

    adapter = make_adapter(tiny_models["llama"], str(tmp_path / name), *ADAPTERS[name], seed=3)
    prompts = prompt_set(49152, seed=9, lengths=(3, 17))
    reference = peft.PeftModel.from_pretrained(fake_quant_model(llmc["llama"]), adapter)
    expected = hf_greedy(reference.eval(), prompts, GREEDY.max_tokens)
    llm = LLM(llmc["llama"], num_blocks=64, adapters=(f"{name}={adapter}",))
    wrapped = {path.rpartition(".")[2] for path, m in llm.engine.local_rank().model.named_modules()
               if isinstance(getattr(m, "method", None), LoRALinearMethod)}
    assert wrapped == ({"qkv_proj"} if name == "qv" else {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"})
    assert [o.token_ids for o in llm.generate(prompts, GREEDY, adapter=name)] == expected
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] != expected


def _with_quantization(src: str, dst, change) -> str:
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as fh:
        raw = json.load(fh)
    change(raw["quantization_config"])
    with open(os.path.join(dst, "config.json"), "w") as fh:
        json.dump(raw, fh)
    return str(dst)


def _group(q: dict) -> dict:
    return next(iter(q["config_groups"].values()))


REFUSED = {
    "4-bit weights": (lambda q: _group(q)["weights"].update(num_bits=4), "num_bits=4"),
    "static activations": (lambda q: _group(q)["input_activations"].update(dynamic=False), "dynamic=False"),
    "per-tensor weights": (lambda q: _group(q)["weights"].update(strategy="tensor"), "strategy='tensor'"),
    "weight only": (lambda q: _group(q).update(input_activations=None), "no input_activations"),
    "float8": (lambda q: _group(q)["weights"].update(type="float"), "type='float'"),
    "packed format": (lambda q: q.update(format="pack-quantized") or _group(q).update(format="pack-quantized"),
                      "format 'pack-quantized'"),
    "quantized kv cache": (lambda q: q.update(kv_cache_scheme={"num_bits": 8}), "kv_cache_scheme"),
    "another method": (lambda q: q.update(quant_method="gptq"), "quantized with 'gptq'"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_quantizations_pdserve_cannot_run_are_refused_by_name(llmc, tmp_path, case):
    change, message = REFUSED[case]
    path = _with_quantization(llmc["llama"], tmp_path / "m", change)
    with pytest.raises(UnsupportedModelError, match=message):
        load_config(resolve_model(path))


def test_a_merged_layer_quantized_in_part_is_refused(llmc, tmp_path):
    path = _with_quantization(llmc["llama"], tmp_path / "m", lambda q: q["ignore"].append("re:.*k_proj$"))
    with pytest.raises(ValueError, match="stored as one layer but only some are quantized"):
        LLM(path)


def test_a_quantized_lm_head_is_refused(llmc, tmp_path):
    path = _with_quantization(llmc["llama"], tmp_path / "m", lambda q: q.update(ignore=[]))
    with pytest.raises(UnsupportedModelError, match="quantized lm_head"):
        load_config(resolve_model(path))


def test_a_quantized_mixture_of_experts_checkpoint_is_refused(tiny_models, llmc, tmp_path):
    shutil.copytree(tiny_models["mixtral"], tmp_path / "moe")
    with open(tmp_path / "moe" / "config.json") as fh:
        raw = json.load(fh)
    with open(os.path.join(llmc["llama"], "config.json")) as fh:
        raw["quantization_config"] = json.load(fh)["quantization_config"]
    (tmp_path / "moe" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts"):
        load_config(resolve_model(str(tmp_path / "moe")))


# ---- the default model, quantized by pdserve ------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_w8a8(tmp_path_factory) -> str:
    from pdserve.engine.quant.quantize_cli import main

    out = str(tmp_path_factory.mktemp("sq") / "smollm2-w8a8")
    assert main("quantize", ["smoothquant", "--model", "smollm2", "--out", out,
                             "--calib-samples", "16", "--calib-len", "256"]) == 0
    return out


@needs_smollm2
def test_quantized_default_model_keeps_perplexity_within_3_percent(smollm2_w8a8):
    text = heldout_text()
    base = perplexity("smollm2", text, window=256, max_windows=8)
    quantized = perplexity(smollm2_w8a8, text, window=256, max_windows=8)
    assert base.tokens == quantized.tokens > 1500
    assert quantized.perplexity != base.perplexity
    assert abs(quantized.perplexity / base.perplexity - 1) < 0.03, (base, quantized)


@needs_smollm2
def test_quantized_default_model_writes_sensible_text(smollm2_w8a8):
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    base = LLM("smollm2").generate(prompts, GREEDY)
    quantized = LLM(smollm2_w8a8).generate(prompts, GREEDY)
    assert "Paris" in base[0].text and "Paris" in quantized[0].text
    assert "fibonacci" in quantized[1].text or "return" in quantized[1].text
    assert all(len(set(o.token_ids)) >= 6 for o in quantized), [o.text for o in quantized]  # not degenerate


@needs_smollm2
def test_pdserve_checkpoint_computes_its_fake_quant_reference(smollm2_w8a8):
    ref = fake_quant_model(smollm2_w8a8)
    scorer = Scorer(smollm2_w8a8)
    texts = ["SmoothQuant moves the difficulty of activation quantization into the weights.",
             "The quick brown fox jumps over the lazy dog, and then it runs into the forest to find its friends.",
             "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"]
    ours, expected = [], []
    for text in texts:
        ids = scorer.tokenizer.encode(text)
        with torch.no_grad():
            expected.append(ref(torch.tensor([ids])).logits[0])
        ours.append(scorer.logits(ids))
    assert_logits_agree(ours, expected)


@needs_smollm2
def test_pdserve_checkpoint_loads_in_transformers_with_compressed_tensors(smollm2_w8a8):
    """The standard format: compressed-tensors reads pdserve's checkpoint and computes a
    model of the same accuracy. (Its activation rounding differs, scale max|x| / 127.5, so
    its logits are a different rounding of the same model: compare perplexities.)"""
    import math

    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(smollm2_w8a8, dtype=torch.float32).eval()
    text = heldout_text()
    ids = Scorer(smollm2_w8a8).tokenizer.encode(text)
    nll = 0.0
    with torch.no_grad():
        for start in range(0, 4 * 256, 256):
            window = torch.tensor([ids[start:start + 256]])
            nll += theirs(window, labels=window).loss.item() * 255
    ours = perplexity(smollm2_w8a8, text, window=256, max_windows=4)
    assert ours.tokens == 4 * 255
    assert abs(math.exp(nll / ours.tokens) / ours.perplexity - 1) < 0.02
