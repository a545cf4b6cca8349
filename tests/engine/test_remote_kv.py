"""Engine-level disaggregation: a prompt's KV computed by one engine and admitted by another
as already computed gives the same greedy tokens as running it in one engine."""
from __future__ import annotations

import pytest
import torch

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine import LLM
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def _run_to_end(engine: LLMEngine, rid: str) -> list[int]:
    tokens = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.req_id == rid:
                tokens += out.new_token_ids
    return tokens


def _disaggregated(p: LLMEngine, d: LLMEngine, rid: str, prompt: list[int],
                   params: SamplingParams = GREEDY) -> tuple[list[int], int]:
    bs = d.config.block_size
    d_blocks, cached = d.reserve_remote(rid, prompt, params)
    d.kv_cache[:, d_blocks[cached // bs:]] = float("nan")  # poison: every needed block must be sent
    p.add_request(rid, prompt, params.replace(max_tokens=1), hold_kv=True)
    first = _run_to_end(p, rid)
    assert len(first) == 1 and p.connector.is_sending(rid)
    p_blocks = p.kv.blocks_of(rid)
    n = len(d_blocks)
    d.kv_cache[:, d_blocks[cached // bs:]] = p.kv_cache[:, p_blocks[cached // bs:n]]
    assert p.release_held(rid)
    out = d.admit_remote(rid, first[0])
    return out.new_token_ids + _run_to_end(d, rid), cached


@pytest.mark.parametrize("length", [1, 15, 16, 17, 100])
def test_remote_prefill_matches_local(tiny_models, length):
    path = tiny_models["qwen3"]
    prompt = list(range(200, 200 + length))
    expected = LLM(path, num_blocks=64).generate([prompt], GREEDY)[0].token_ids
    p = LLMEngine(EngineConfig(model=path, num_blocks=64))
    d = LLMEngine(EngineConfig(model=path, num_blocks=64))
    got, cached = _disaggregated(p, d, "a", prompt)
    assert got == expected and cached == 0
    # the decode side now has the prefix cached: fewer blocks travel, same output
    got, cached = _disaggregated(p, d, "b", prompt)
    assert got == expected
    assert cached == ((length - 1) // 16) * 16
    for e in (p, d):
        assert e.kv_stats()["used"] == 0


def test_seeded_sampling_same_as_local(tiny_models):
    path = tiny_models["llama"]
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=7, ignore_eos=True)
    prompt = list(range(50, 90))
    expected = LLM(path, num_blocks=64).generate([prompt], params)[0].token_ids
    p = LLMEngine(EngineConfig(model=path, num_blocks=64))
    d = LLMEngine(EngineConfig(model=path, num_blocks=64))
    assert _disaggregated(p, d, "s", prompt, params)[0] == expected


def test_cancel_and_abort_of_a_reservation(tiny_models):
    d = LLMEngine(EngineConfig(model=tiny_models["llama"], num_blocks=8))
    blocks, _ = d.reserve_remote("r", list(range(50)), GREEDY)
    assert len(blocks) == 4 and d.kv_stats()["used"] == 4
    assert not d.abort("r")  # a peer may be writing: abort does not free it
    assert d.kv_stats()["used"] == 4
    assert d.reserve_remote("big", list(range(70)), GREEDY) is None  # 5 more blocks, 4 free
    assert d.kv_stats()["used"] == 4 and "big" not in d.requests
    assert d.cancel_remote("r")
    assert d.kv_stats()["used"] == 0


class _SnapshotListener:
    """Reads each layer's KV the way a transfer does: once the layer's event has passed,
    on a stream of its own (on a GPU), while the step goes on."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.snapshots: dict[int, torch.Tensor] = {}
        self.stream = torch.cuda.Stream() if engine.device.type == "cuda" else None

    def begin_step(self, rows, tables, orders):
        blocks = torch.tensor(tables[0], device=self.engine.device)

        def hook(layer: int, written) -> None:
            if self.stream is None:
                assert written.query()
                self.snapshots[layer] = self.engine.kv_cache[layer, blocks].clone()
                return
            self.stream.wait_event(written)
            with torch.cuda.stream(self.stream):
                self.snapshots[layer] = self.engine.kv_cache[layer, blocks].clone()
        return hook


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_layer_events_mark_the_kv_as_written(device: str) -> None:
    """The prefill worker sends layer l once its event has passed: by then the layer's KV
    must be final, although the host queued the layer (and called the hook) earlier."""
    engine = LLMEngine(EngineConfig(model="dummy:smollm2-135m", dtype="float32", device_type=device, num_blocks=64,
                                    max_prefill_tokens=1024))
    listener = _SnapshotListener(engine)
    engine.attach_layer_sender(listener)
    engine.add_request("r", list(range(100, 900)), SamplingParams(max_tokens=1, ignore_eos=True), hold_kv=True)
    _run_to_end(engine, "r")
    engine.synchronize()
    blocks = torch.tensor(engine.kv.blocks_of("r"), device=engine.device)
    assert sorted(listener.snapshots) == list(range(engine.model_config.num_layers))
    for layer, snap in listener.snapshots.items():
        assert torch.equal(snap, engine.kv_cache[layer, blocks]), f"layer {layer} read before it was written"
    assert engine.release_held("r") and engine.kv_stats()["used"] == 0
