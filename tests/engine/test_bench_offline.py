"""`pdserve bench offline` end to end on a tiny model: both engines run, the ratio is printed per round."""
from __future__ import annotations

import re

import pytest

from pdserve.bench.offline import main


def test_bench_offline_rounds_print_the_median(tiny_models, capsys) -> None:
    code = main(["--model", tiny_models["llama"], "--num-prompts", "3", "--prompt-len", "9", "--output-len", "4",
                 "--hf-batch-size", "2", "--rounds", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert len(re.findall(r"pdserve: +12 output tokens", out)) == 2
    assert len(re.findall(r"transformers: +12 output tokens", out)) == 2
    assert re.search(r"median ratio over 2 rounds: \d+\.\d\dx", out), out


def test_bench_offline_runs_tensor_parallel(tiny_models, capsys) -> None:
    code = main(["--model", tiny_models["llama"], "--num-prompts", "3", "--prompt-len", "9", "--output-len", "4",
                 "--skip-hf", "--tp", "2"])
    assert code == 0 and re.search(r"pdserve: +12 output tokens", capsys.readouterr().out)


def test_bench_offline_batch_reports_latency_and_the_roofline(tiny_models, capsys) -> None:
    code = main(["--model", tiny_models["llama"], "--num-prompts", "3", "--prompt-len", "9", "--output-len", "5",
                 "--skip-hf", "--batch", "1"])
    out = capsys.readouterr().out
    assert code == 0 and re.search(r"batch 1: 15 output tokens", out), out
    assert re.search(r"TTFT ms: median \d+\.\d", out) and re.search(r"inter-token ms: median \d+\.\d+", out), out
    roof = re.search(r"roofline (\d+\.\d+) ms per step; median step (\d+\.\d+) ms = (\d+\.\d+)x", out)
    assert roof and float(roof.group(1)) > 0 and float(roof.group(3)) > 0, out


def test_bench_offline_batch_refuses_adapters(tiny_models) -> None:
    with pytest.raises(SystemExit, match="--batch runs the base model only"):
        main(["--model", tiny_models["llama"], "--batch", "1", "--adapters", "a=/nowhere", "--skip-hf"])


def test_bench_offline_batch_must_be_positive(tiny_models) -> None:
    with pytest.raises(SystemExit, match="--batch must be 1 or more"):
        main(["--model", tiny_models["llama"], "--batch", "-2", "--skip-hf"])
