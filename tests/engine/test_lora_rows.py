"""The per-token LoRA slots of a step (``lora.rows.StepRows``): one persistent buffer that a
captured graph reads, rows past the step's tokens -1, no delta on steps without adapters
except while graphs are captured, a step longer than the buffer on buffers of its own; and
``AdapterSlots`` wrapping every linear layer part with zero stacks at construction."""
from __future__ import annotations

import torch

from pdserve.engine.layers import LinearBase
from pdserve.engine.lora.rows import StepRows
from pdserve.engine.lora.slots import AdapterSlots, LoRALinearMethod


def _slots(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def test_a_step_writes_the_persistent_buffer_and_pads_with_minus_one():
    rows = StepRows(num_slots=3, max_tokens=8, device=torch.device("cpu"), pin_memory=False)
    rows.write(_slots(2, -1, 0, 2, 2, 1, 0))
    step = rows.mapping(7)
    assert step.token_slots.tolist() == [2, -1, 0, 2, 2, 1, 0]
    assert step.sorted_tokens[:6].tolist() == [2, 6, 5, 0, 3, 4]
    assert step.slot_start.tolist() == [0, 2, 3] and step.slot_count.tolist() == [2, 1, 3]
    rows.write(_slots(1, 1))  # a shorter step: the rows after it are -1 again
    padded = rows.mapping(4)  # as a graph of 4 rows reads it
    assert padded.token_slots.tolist() == [1, 1, -1, -1] and padded.slot_count.tolist() == [0, 2, 0]
    assert padded.token_slots.data_ptr() == step.token_slots.data_ptr()  # one buffer for every step


def test_no_delta_without_adapter_tokens_except_while_capturing():
    rows = StepRows(num_slots=2, max_tokens=4, device=torch.device("cpu"), pin_memory=False)
    rows.write(_slots(1, 0))
    buffer = rows.mapping(2).token_slots
    rows.write(_slots(-1, -1, -1))
    assert rows.mapping(3) is None
    assert buffer.tolist() == [1, 0]  # a step without adapters copies nothing: nothing reads the buffer then
    with rows.capturing():
        captured = rows.mapping(4)
        assert captured.token_slots.tolist() == [-1] * 4 and captured.slot_count.tolist() == [0, 0]
    assert rows.mapping(3) is None
    rows.write(_slots(-1, -1, -1, -1, -1, -1))  # longer than the buffer, no adapters: no buffers of its own
    assert rows.mapping(6) is None


def test_a_step_longer_than_the_buffer_gets_its_own():
    rows = StepRows(num_slots=2, max_tokens=4, device=torch.device("cpu"), pin_memory=False)
    rows.write(_slots(0, 1, 0))
    kept = rows.mapping(4).token_slots.clone()
    rows.write(_slots(1, -1, 0, 0, 1, 1))
    long = rows.mapping(6)
    assert long.token_slots.tolist() == [1, -1, 0, 0, 1, 1] and long.slot_count.tolist() == [2, 3]
    assert torch.equal(rows.mapping(4).token_slots, kept)  # the graphs' buffer is untouched


def test_each_slots_rank_reaches_the_step_mapping():
    rows = StepRows(num_slots=3, max_tokens=4, device=torch.device("cpu"), pin_memory=False)
    rows.set_rank(0, 16)
    rows.set_rank(2, 5)
    rows.write(_slots(0, 2))
    assert rows.mapping(2).slot_rank.tolist() == [16, 0, 5]
    rows.set_rank(2, 0)
    rows.write(_slots(-1, -1, -1, -1, -1, -1))  # longer than the buffer, no adapters: no buffers of its own
    rows.write(_slots(0, 0, 0, 0, 0, 0))  # longer than the buffer: a mapping of its own, same ranks
    assert rows.mapping(6).slot_rank.tolist() == [16, 0, 0]
    with rows.capturing():
        assert rows.mapping(4).slot_rank.tolist() == [16, 0, 0]


def test_every_linear_layer_part_is_wrapped_with_zero_stacks(tiny_models):
    from pdserve.engine import LLM

    llm = LLM(tiny_models["llama"], num_blocks=16, enable_lora=True, max_loras=3, max_lora_rank=8)
    lora = llm.engine.executor.rank.lora
    layers = [m for m in llm.engine.executor.rank.model.modules() if isinstance(m, LinearBase)]
    assert layers and all(isinstance(m.method, LoRALinearMethod) for m in layers)
    assert isinstance(lora, AdapterSlots)
    # 2 layers x (q 64+64, k 64+32, v 64+32, o 64+64, gate 64+128, up 64+128, down 128+64) x 3 slots x rank 8 x 4 bytes
    assert lora.stack_bytes == 2 * (128 + 96 + 96 + 128 + 192 + 192 + 192) * 3 * 8 * 4
    qkv = layers[0]
    stack = qkv.method.stack  # q, k, v in one stack: A's rows part by part, B's in the output's order
    assert (stack.a.shape, stack.b.shape) == ((3, 3 * 8, 64), (3, 128, 8))
    assert stack.parts == ("q", "k", "v") and stack.part_ends == (64, 96, 128)
    assert not any(t.any() for m in layers for t in (m.method.stack.a, m.method.stack.b))
