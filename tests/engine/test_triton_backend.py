"""The Triton backend and the decode-graph path of the runner, on the CPU.

The kernels run under Triton's interpreter here (on a GPU they run for real through
test_parity's cuda cases). The graph path runs with a stand-in platform whose
"graph" re-runs the captured function on the same static buffers, which is what a
CUDA graph replay does: it checks the padding, the static block tables and the
upper-bound metadata that the captured decode step is built with.
"""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine import LLM
from pdserve.engine.backends.triton_backend import TritonBackend
from pdserve.engine.model_runner import graph_batch_sizes
from pdserve.engine.platforms import get_platform, platform_names
from pdserve.engine.platforms.cpu import CpuPlatform
from tests.engine.conftest import use_triton_runner

GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
# With a GPU, Triton compiles for it and cannot take these CPU tensors.
interpreted = pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="CPU-interpreter test; on a GPU test_parity's cuda cases run the kernels")


class _Replay:
    def __init__(self, fn: Callable[[], torch.Tensor], out: torch.Tensor):
        self.fn, self.out = fn, out

    def replay(self) -> None:
        self.out.copy_(self.fn())


class ReplayPlatform(CpuPlatform):
    """The CPU platform with stand-in graphs (capture = run once; replay = run again in place)."""

    supports_graphs = True

    def capture_graph(self, fn: Callable[[], Any], pool: Any) -> tuple[_Replay, Any]:
        out = fn()
        return _Replay(fn, out), out


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    base = torch.randint(3, 49152, (40,), generator=g).tolist()
    return [base[:3], base[:37], base[:20] + [9, 9], base[5:23]]  # the third shares a prefix with the second


@interpreted
@pytest.mark.parametrize("kind", ["llama", "qwen3", "qwen3_moe"])  # qwen3: q/k norms in the rotary launch
def test_triton_backend_matches_torch(tiny_models, kind):
    path = tiny_models[kind]
    prompts = _prompts()
    ref = [o.token_ids for o in LLM(path, num_blocks=32).generate(prompts, GREEDY)]
    llm = LLM(path, num_blocks=32, max_prefill_tokens=24, compiled_cpu_kernels=False)  # chunked prefill: mixed steps
    use_triton_runner(llm, CpuPlatform(), ())
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == ref


@interpreted
@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_decode_graphs_pad_and_replay(tiny_models, overlap):
    """``overlap``: each step launched before the previous one's tokens are read, its
    inputs copied into the graph's static buffer from the previous step's tokens."""
    path = tiny_models["llama"]
    prompts = _prompts()[:3]  # 3 sequences decode in the padded graph of 4
    ref = [o.token_ids for o in LLM(path, num_blocks=32).generate(prompts, GREEDY)]
    llm = LLM(path, num_blocks=32, max_batch_size=4, async_scheduling=overlap, compiled_cpu_kernels=False)
    runner = use_triton_runner(llm, ReplayPlatform(), graph_batch_sizes(4))
    assert sorted(runner.graphs.graphs) == [1, 2, 4]
    replays = []
    for b, (graph, _) in runner.graphs.graphs.items():
        graph.replay = (lambda g=graph, b=b: (replays.append(b), _Replay.replay(g)))
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == ref
    assert replays and set(replays) <= {4}  # every decode step ran in the padded graph
    assert llm.kv_stats()["used"] == 0
    assert (llm.engine.stats()["overlapped_steps_total"] > 0) == overlap


def test_graph_batch_sizes():
    assert graph_batch_sizes(1) == (1,)
    assert graph_batch_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert graph_batch_sizes(100) == (1, 2, 4, 8, 16, 32, 64, 128)
    assert graph_batch_sizes(1000)[-1] == 256


def test_platform_registry():
    assert {"cpu", "cuda"} <= set(platform_names())
    cpu = get_platform("cpu")
    free, total = cpu.memory_info(cpu.device())
    assert 0 < free <= total and not cpu.supports_graphs
    with pytest.raises(ValueError, match="no platform"):
        get_platform("tpu")


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_single_row_gemv_matches_matmul(rows, bias):
    """One bf16 row goes through our GEMV kernel, more rows through cuBLAS/torch; both
    equal a float64 matmul within bf16 rounding, bias included."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(rows, 96, dtype=torch.bfloat16, device=device)
    w = torch.randn(40, 96, dtype=torch.bfloat16, device=device)
    b = torch.randn(40, dtype=torch.bfloat16, device=device) if bias else None
    out = TritonBackend().linear(x, w, b)
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    assert out.shape == (rows, 40) and out.dtype == torch.bfloat16
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2
