"""LoRA on a CUDA device: decode steps with adapters run in captured graphs (the Triton LoRA
kernels inside them, every linear layer wrapped before the capture) and give the same tokens
as eager steps and as transformers + peft, for one mixed batch of base and adapter rows."""
from __future__ import annotations

import pytest
import torch

from pdserve.engine import LLM
from tests.engine.conftest import prompt_set

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
peft = pytest.importorskip("peft")
from tests.engine.test_lora import ADAPTERS, GREEDY, make_adapter, reference  # noqa: E402  (needs peft)


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters-gpu")
    return {name: make_adapter(tiny_models["llama"], str(root / name), *spec, seed=i)
            for i, (name, spec) in enumerate(ADAPTERS.items())}


def _generate(base: str, adapters: dict[str, str], rows: list[tuple[list[int], str | None]], **kw) -> list[list[int]]:
    """Greedy tokens of every row; asserts that decode steps ran in graphs unless eager."""
    llm = LLM(base, device_type="cuda", num_blocks=256, adapters=tuple(f"{n}={p}" for n, p in adapters.items()), **kw)
    graphs = llm.engine.executor.rank.runner.graphs
    replays = []
    if graphs is not None:
        run = graphs.run
        graphs.run = lambda batch, *args: (replays.append(batch.num_rows), run(batch, *args))[1]
    outs = llm.generate([p for p, _ in rows], GREEDY, adapter=[n for _, n in rows])
    assert (graphs is None) == bool(kw.get("enforce_eager")) and (graphs is None or replays)
    return [o.token_ids for o in outs]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_decode_graphs_equal_eager_steps_and_peft(tiny_models, adapters, dtype):
    base = tiny_models["llama"]
    prompts = prompt_set(49152, seed=31, lengths=(3, 17, 40, 9, 25))
    names = [None, *adapters]
    rows = [(p, n) for n in names for p in prompts]  # 20 rows: decode in the graph of 32, 12 padding rows
    graphs = _generate(base, adapters, rows, dtype=dtype)
    eager = _generate(base, adapters, rows, dtype=dtype, enforce_eager=True)
    assert graphs == eager
    if dtype == "float32":
        expected = {n: reference(base, adapters.get(n), prompts) for n in names}
        assert graphs == [expected[n][prompts.index(p)] for p, n in rows]
