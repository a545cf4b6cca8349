"""LoRA adapters in the engine: random PEFT adapters made here with ``peft`` on tiny random
models; greedy output per adapter token-identical (float32) to transformers + peft, one
mixed batch of base and adapter rows equal to each alone, the prefix cache kept apart per
adapter, tp=2 with the adapters' shards following their layers, the Triton kernels inside
padded decode graphs (CPU interpreter, stand-in graphs), and clear refusals."""
from __future__ import annotations

import pytest
import torch

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine import LLM
from pdserve.engine.backends.triton_backend import TritonBackend
from pdserve.engine.layers import LinearBase
from pdserve.engine.lora import LoRALinearMethod
from pdserve.engine.model_runner import ModelRunner, RunnerConfig, graph_batch_sizes
from tests.engine.conftest import hf_greedy, prompt_set
from tests.engine.test_triton_backend import ReplayPlatform

peft = pytest.importorskip("peft")
GREEDY = SamplingParams(max_tokens=10, temperature=0.0)
ADAPTERS = {  # name -> (rank, alpha, targets, rsLoRA)
    "qv": (8, 16, ["q_proj", "v_proj"], False),
    "all": (4, 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], True),
    "mlp": (16, 32, ["gate_proj", "down_proj"], False),
}


def make_adapter(base_path: str, out: str, rank: int, alpha: int, targets: list[str], rslora: bool, seed: int) -> str:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, lora_dropout=0.0)
    model = peft.get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:  # NOTE: peft starts B at zero (no effect); random A and B make each adapter count
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tiny_models["llama"], str(root / name), *spec, seed=i)
            for i, (name, spec) in enumerate(ADAPTERS.items())}


def reference(base_path: str, adapter_dir: str | None, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    if adapter_dir is not None:
        model = peft.PeftModel.from_pretrained(model, adapter_dir)
    return hf_greedy(model.eval(), prompts, GREEDY.max_tokens)


def test_each_adapter_and_a_mixed_batch_match_peft(tiny_models, adapters):
    base = tiny_models["llama"]
    prompts = prompt_set(49152, seed=13, lengths=(3, 17, 40))
    expected = {name: reference(base, path, prompts) for name, path in [(None, None), *adapters.items()]}
    assert len({str(v) for v in expected.values()}) == len(expected)  # every adapter changes the output
    llm = LLM(base, num_blocks=128, max_prefill_tokens=32, adapters=tuple(f"{n}={p}" for n, p in adapters.items()))
    for name in expected:
        assert [o.token_ids for o in llm.generate(prompts, GREEDY, adapter=name)] == expected[name], name
    mixed = [(p, name) for name in expected for p in prompts]  # one batch: base and three adapters, chunked
    got = llm.generate([p for p, _ in mixed], GREEDY, adapter=[n for _, n in mixed])
    assert [o.token_ids for o in got] == [expected[n][prompts.index(p)] for p, n in mixed]
    assert llm.engine.stats()["kv_blocks_used"] == 0


def test_the_prefix_cache_is_kept_apart_per_adapter(tiny_models, adapters):
    llm = LLM(tiny_models["llama"], num_blocks=64, adapters=(f"qv={adapters['qv']}", f"all={adapters['all']}"))
    prompt = list(range(100, 150))
    first = llm.generate([prompt], GREEDY, adapter="qv")[0]
    again = llm.generate([prompt], GREEDY, adapter="qv")[0]
    other = llm.generate([prompt], GREEDY, adapter="all")[0]
    base = llm.generate([prompt], GREEDY)[0]
    assert first.num_cached_tokens == 0 and again.num_cached_tokens == 48
    assert other.num_cached_tokens == 0 and base.num_cached_tokens == 0
    assert again.token_ids == first.token_ids


def test_tp2_adapters_follow_their_layers_split(tiny_models, adapters):
    base = tiny_models["llama"]
    prompts = prompt_set(49152, seed=17, lengths=(5, 33))
    expected = reference(base, adapters["all"], prompts)
    llm = LLM(base, tp=2, num_blocks=64, adapters=(f"all={adapters['all']}",))
    try:
        assert [o.token_ids for o in llm.generate(prompts, GREEDY, adapter="all")] == expected
    finally:
        llm.engine.close()


def test_bad_adapters_are_refused_clearly(tiny_models, adapters, tmp_path):
    base = tiny_models["llama"]
    with pytest.raises(ValueError, match="rank r=16 is outside \\[1, max_lora_rank=8\\]"):
        LLM(base, num_blocks=16, adapters=(f"mlp={adapters['mlp']}",), max_lora_rank=8)
    head = make_adapter(base, str(tmp_path / "head"), 4, 8, ["lm_head"], False, seed=9)
    with pytest.raises(ValueError, match="adapter 'head': tensor .*lm_head.* is not a LoRA A/B matrix"):
        LLM(base, num_blocks=16, adapters=(f"head={head}",))
    with pytest.raises(ValueError, match="adapters entry 'nameless' is invalid: expected name=path"):
        LLM(base, num_blocks=16, adapters=("nameless",))
    llm = LLM(base, num_blocks=16, adapters=(f"qv={adapters['qv']}",))
    with pytest.raises(ValueError, match="unknown adapter 'nope'; loaded: \\['qv'\\]"):
        llm.generate([[1, 2, 3]], GREEDY, adapter="nope")
    assert llm.engine.stats()["kv_blocks_used"] == 0


def test_lora_wraps_only_the_layers_of_its_target_modules(tiny_models, adapters):
    """By default the start adapters' modules (mlp: gate_proj, down_proj); an adapter training
    another layer is refused at load and the engine keeps serving; "all" wraps every layer."""
    base = tiny_models["llama"]
    prompts = prompt_set(49152, seed=23, lengths=(4, 19))
    llm = LLM(base, num_blocks=64, adapters=(f"mlp={adapters['mlp']}",), max_loras=2)
    rank = llm.engine.local_rank()
    wrapped = {path.rpartition(".")[2] for path, m in rank.model.named_modules()
               if isinstance(m, LinearBase) and isinstance(m.method, LoRALinearMethod)}
    assert wrapped == {"gate_up_proj", "down_proj"}
    # 2 layers x (gate 64+128, up 64+128, down 128+64) x 2 slots x rank 64 x 4 bytes
    assert rank.lora.stack_bytes == 2 * (192 + 192 + 192) * 2 * 64 * 4
    with pytest.raises(ValueError, match="adapter 'qv' targets 'model.layers.0.self_attn.q_proj', but this engine "
                                         "wraps only the lora_target_modules \\['down_proj', 'gate_proj'\\]"):
        llm.engine.load_adapter("qv", adapters["qv"])
    assert [o.token_ids for o in llm.generate(prompts, GREEDY, adapter="mlp")] == reference(base, adapters["mlp"],
                                                                                            prompts)
    assert llm.engine.adapters == {"mlp"} and llm.engine.stats()["kv_blocks_used"] == 0
    everything = LLM(base, num_blocks=16, adapters=(f"mlp={adapters['mlp']}",), lora_target_modules=("all",))
    assert everything.engine.local_rank().lora.stack_bytes == 2 * 1024 * 4 * 64 * 4
    only_o = LLM(base, num_blocks=16, enable_lora=True, lora_target_modules=("o_proj",))
    assert only_o.engine.local_rank().lora.stack_bytes == 2 * 128 * 4 * 64 * 4


def test_adapters_load_and_unload_at_run_time(tiny_models, adapters):
    base = tiny_models["llama"]
    prompts = prompt_set(49152, seed=19, lengths=(6, 21))
    expected = {name: reference(base, adapters[name], prompts) for name in ("qv", "all", "mlp")}
    llm = LLM(base, num_blocks=64, enable_lora=True, max_loras=2, max_lora_rank=16)
    engine = llm.engine
    engine.load_adapter("qv", adapters["qv"])
    engine.load_adapter("all", adapters["all"])
    assert [o.token_ids for o in llm.generate(prompts, GREEDY, adapter="qv")] == expected["qv"]
    with pytest.raises(ValueError, match="all max_cpu_loras=2 adapters are loaded"):
        engine.load_adapter("mlp", adapters["mlp"])
    with pytest.raises(ValueError, match="already loaded"):
        engine.load_adapter("qv", adapters["qv"])
    engine.add_request("in-flight", prompts[1], GREEDY, adapter="qv")
    tokens = [t for out in engine.step() for t in out.new_token_ids]
    engine.unload_adapter("qv")  # a request still uses it: it finishes with it, new ones are refused
    with pytest.raises(ValueError, match="unknown adapter 'qv'"):
        engine.add_request("late", prompts[0], GREEDY, adapter="qv")
    while engine.has_unfinished():
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    assert tokens == expected["qv"][1] and engine.stats()["kv_blocks_used"] == 0
    engine.load_adapter("mlp", adapters["mlp"])  # into qv's freed (and zeroed) slot
    got = llm.generate(prompts, GREEDY, adapter=["mlp", "all"])
    assert [o.token_ids for o in got] == [expected["mlp"][0], expected["all"][1]]
    assert sorted(engine.adapters) == ["all", "mlp"]


def test_residency_swaps_the_least_recently_used_adapter_no_running_request_uses():
    from pdserve.engine.lora.residency import AdapterResidency

    slots = AdapterResidency(2)
    assert slots.claim("a", set()) and slots.claim("b", set())
    assert slots.take_swaps() == ((0, "a"), (1, "b")) and slots.take_swaps() == ()
    assert slots.claim("a", set())  # resident: no swap, now most recently used
    assert not slots.claim("c", {"a", "b"})  # both in use: c waits
    assert slots.claim("c", {"a"}) and slots.resident() == {"a": 0, "c": 1}  # b (not in use) goes
    slots.forget("a")
    assert slots.claim("d", {"c"}) and slots.resident() == {"c": 1, "d": 0}
    assert slots.take_swaps() == ((1, "c"), (0, "d")) and slots.swaps_total == 4


def test_more_adapters_than_device_slots_swap_in_by_lru(tiny_models, adapters):
    """max_loras=1 slot, three adapters registered: a mixed batch still gives each request its
    own adapter's output; a request whose adapter has no slot waits, base requests do not."""
    base = tiny_models["llama"]
    prompts = prompt_set(49152, seed=23, lengths=(4, 19))
    expected = {name: reference(base, path, prompts) for name, path in [(None, None), *adapters.items()]}
    llm = LLM(base, num_blocks=64, max_loras=1, max_cpu_loras=3,
              adapters=tuple(f"{n}={p}" for n, p in adapters.items()))
    engine = llm.engine
    engine.add_request("qv-0", prompts[0], GREEDY, adapter="qv")
    engine.add_request("all-0", prompts[0], GREEDY, adapter="all")
    engine.add_request("base-0", prompts[0], GREEDY)
    engine.step()
    assert [r.req_id for r in engine.scheduler.running] == ["qv-0", "base-0"]  # all-0 waits for the slot
    while engine.has_unfinished():
        engine.step()
    mixed = [(p, name) for name in expected for p in prompts]
    got = llm.generate([p for p, _ in mixed], GREEDY, adapter=[n for _, n in mixed])
    assert [o.token_ids for o in got] == [expected[n][prompts.index(p)] for p, n in mixed]
    stats = engine.stats()
    assert stats["lora_swaps_total"] >= 4 and stats["kv_blocks_used"] == 0


@pytest.mark.slow  # NOTE: ~35 s under the interpreter; the kernels' own tests (tests/kernels/test_lora_kernels.py)
# stay in `make test`, and `make test-gpu` runs this with real graphs (test_lora_gpu.py)
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-interpreter test; on a GPU test_lora_gpu.py runs it")
def test_adapters_in_padded_decode_graphs_on_the_triton_backend(tiny_models, adapters):
    """Every linear layer is wrapped before the graphs are captured, so the graphs hold the
    LoRA kernels; each replay reads the step's slots (padding rows: -1) from the buffer the
    rank wrote. 7 rows of three adapters and the base model, in the graph of 8; a batch of
    base-model rows only replays the graph captured without the LoRA kernels."""
    base = tiny_models["llama"]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    names = [None, *adapters]
    prompts = prompt_set(49152, seed=29, lengths=(3, 11, 6, 9, 4, 12, 7))
    per_prompt = [names[i % len(names)] for i in range(len(prompts))]
    specs = tuple(f"{n}={p}" for n, p in adapters.items())
    expected = LLM(base, num_blocks=64, adapters=specs).generate(prompts, params, adapter=per_prompt)
    llm = LLM(base, num_blocks=64, max_batch_size=8, compiled_cpu_kernels=False, adapters=specs)
    engine, rank = llm.engine, llm.engine.executor.rank
    cfg = RunnerConfig(engine.config.block_size, engine.max_model_len, graph_batch_sizes(8))
    rank.runner = ModelRunner(rank.model, engine.kv_cache, TritonBackend(), ReplayPlatform(), engine.device, cfg)
    rank.runner.capture_graphs(rank.lora.capturing)
    replays = []
    for kind, graphs in (("lora", rank.runner.graphs.graphs), ("plain", rank.runner.graphs.plain)):
        for size, (graph, _) in graphs.items():
            graph.replay = (lambda g=graph, key=(kind, size): (replays.append(key), type(g).replay(g)))
    got = llm.generate(prompts, params, adapter=per_prompt)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert replays and set(replays) == {("lora", 8)}
    replays.clear()  # base-model rows only: the graphs captured without the LoRA kernels
    base_only = llm.generate(prompts[:3], params)
    assert [o.token_ids for o in base_only] == [o.token_ids for o in LLM(base, num_blocks=64).generate(prompts[:3], params)]
    assert replays and set(replays) == {("plain", 4)}
