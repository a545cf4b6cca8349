"""The MoE exchange benchmark runs its three schemes over real gloo processes, each bringing
every token's copies back summed (checked inside the benchmark before timing)."""
from __future__ import annotations

from pdserve.bench import moe_comm


def test_moe_exchange_benchmark_runs_and_checks_its_schemes(capsys):
    assert moe_comm.main(["--ranks", "2", "--hidden", "64", "--experts", "8", "--top-k", "2", "--tokens", "1,8,33",
                          "--reps", "2"]) == 0
    out = capsys.readouterr().out
    assert "gather+allreduce" in out and "all-to-all" in out
    assert [line.split()[0] for line in out.splitlines()[2:]] == ["1", "8", "33"]
