"""`pdserve bench offline` end to end on a tiny model: both engines run, the ratio is printed per round."""
from __future__ import annotations

import re

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
