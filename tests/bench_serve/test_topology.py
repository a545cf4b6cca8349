"""``pdserve bench topology``: unit tests of its flags, the split of the machine, worker pinning, the
comparison (rows, JSON, table); one end-to-end run of the real command on this machine's CPU that
brings up both topologies and leaves no process behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pdserve.bench import cli as bench_cli
from pdserve.bench import topology
from pdserve.bench.serve_report import (BenchResult, Load, RequestResult, RunResult, Slo, from_json, summarize)
from pdserve.launcher.cluster import ClusterSpec, LocalCluster
from pdserve.launcher.processes import Child, format_cpu_list, parse_cpu_list

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[2]


def config(*flags: str, cores: frozenset[int] = frozenset(range(8))) -> topology.TopologyConfig:
    return topology.config_from_args(topology.build_parser().parse_args(list(flags)), cores, 16 << 30)


# Flags and the split of the machine.

def test_cpu_lists_parse_and_format() -> None:
    assert parse_cpu_list("0-3,8") == frozenset({0, 1, 2, 3, 8})
    assert parse_cpu_list(" 5 ") == frozenset({5})
    assert format_cpu_list({8, 0, 1, 2, 3, 10, 11}) == "0-3,8,10-11"
    assert format_cpu_list([]) == ""
    for bad in ("", "x", "3-1", "-1", "0-", "1,,2"):
        with pytest.raises(ValueError, match="CPU list"):
            parse_cpu_list(bad)


def test_default_split_is_two_halves_of_the_cores() -> None:
    assert config().cpus == ("0-3", "4-7")
    assert config(cores=frozenset({0, 1})).cpus == ("0", "1")
    assert config(cores=frozenset({2, 5, 6})).cpus == ("2", "5-6")  # the odd one out: the second worker
    with pytest.raises(ValueError, match="1 core available"):
        config(cores=frozenset({0}))


def test_cpus_flag_gives_each_worker_its_set() -> None:
    assert config("--cpus", "0-3+8-11,4-7", cores=frozenset(range(16))).cpus == ("0-3,8-11", "4-7")
    assert config("--cpus", "1,0").cpus == ("1", "0")
    on_gpus = config("--gpus", "0, 1")
    assert on_gpus.gpus == ("0", "1") and on_gpus.cpus == ()  # GPU workers: unpinned unless --cpus
    assert config("--gpus", "0,1", "--cpus", "0-3,4-7").cpus == ("0-3", "4-7")


def test_worker_args_get_a_kv_budget_on_cpu_only() -> None:
    cpu = config("--worker-args", "--max-batch-size 16")
    assert cpu.worker_args[:2] == ("--max-batch-size", "16") and "--cache-memory-fraction" in cpu.worker_args
    assert config("--worker-args=--device-type cuda", "--gpus", "0,1").worker_args == ("--device-type", "cuda")
    assert config("--worker-args", "--num-blocks 64").worker_args == ("--num-blocks", "64")


def test_serve_config_comes_through_the_serve_flags() -> None:
    cfg = config("--num-prompts", "6", "--request-rate", "4,inf", "--input-len", "32", "--output-len", "8",
                 "--slo-ttft-ms", "500", "--seed", "3", "--output-dir", "out")
    s = cfg.serve
    assert s.loads == (Load("rate", 4.0), Load("rate", float("inf")))
    assert (s.num_prompts, s.input_len, s.output_len, s.seed) == (6, (32, 32), (8, 8), 3)
    assert s.slo == Slo(ttft_ms=500.0) and s.api_key is None and s.output_dir is None
    assert cfg.output_dir == Path("out") and cfg.log_dir == Path("out/logs")
    assert config("--log-dir", "logs").log_dir == Path("logs")


@pytest.mark.parametrize("flags, message", [
    (["--cpus", "0,0"], "overlap"), (["--cpus", "0"], "two core sets"), (["--cpus", "0,1,2"], "two core sets"),
    (["--cpus", "0,x"], "CPU list"), (["--cpus", "0,4096"], "not available"), (["--gpus", "0"], "two GPUs"),
    (["--request-rate", "0"], "--request-rate"), (["--request-rate", "-1"], "--request-rate"),
    (["--num-prompts", "0"], "--num-prompts"), (["--input-len", "0"], "--input-len"),
    (["--slo-tpot-ms", "-5"], "--slo-tpot-ms")])
def test_bad_flags_exit_2_with_the_reason(flags: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert bench_cli.main("bench", ["topology", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pdserve bench topology: error:") and message in err


def test_unparsable_flag_exits_2() -> None:
    with pytest.raises(SystemExit) as exit_:
        topology.main(["--num-prompts", "x"])
    assert exit_.value.code == 2


# Pinning in the launcher.

def test_cluster_spec_pins_worker_i_to_its_cores() -> None:
    cluster = LocalCluster(ClusterSpec(prefill=1, decode=1, hybrid=0, cpus=("0-1", "2-4")))
    assert [cluster.worker_cpus(i) for i in range(3)] == [{0, 1}, {2, 3, 4}, {0, 1}]
    assert [cluster.worker_env(i)["OMP_NUM_THREADS"] for i in range(2)] == ["2", "3"]
    plain = LocalCluster(ClusterSpec())
    assert plain.worker_cpus(0) == frozenset()
    assert plain.worker_env(0).get("OMP_NUM_THREADS") == os.environ.get("OMP_NUM_THREADS")  # left as it was
    with pytest.raises(ValueError, match="cpus="):
        ClusterSpec(cpus=("0-x",))


def test_a_pinned_child_runs_only_on_its_cores(tmp_path: Path) -> None:
    core = min(os.sched_getaffinity(0))
    log = tmp_path / "child.log"
    child = Child("probe", [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"], str(log),
                  cpus=frozenset({core})).spawn()
    assert child.wait(30) == 0
    child.stop()
    assert log.read_text().strip() == f"[{core}]"


# The comparison.

def fake_result(label: str, ttft: float, slo: Slo, loads: tuple[float, ...] = (4.0, float("inf"))) -> BenchResult:
    runs = []
    for rate in loads:
        requests = [RequestResult(32, 8, 0.1 * i, ttft=ttft * (1 + i % 2), e2e=ttft + 0.7, itl=(0.1,) * 7,
                                  output_tokens=8, prompt_tokens=32) for i in range(6)]
        runs.append(RunResult(Load("rate", rate), summarize(requests, 3.0, slo), tuple(requests)))
    return BenchResult(label, {"model": "m"}, slo, tuple(runs))


def test_rows_goodput_ratio_and_table() -> None:
    slo = Slo(ttft_ms=150.0)
    pd, hybrid = fake_result("1P1D", 0.07, slo), fake_result("2 hybrid", 0.1, slo)  # TTFTs: 70/140, 100/200 ms
    rows = topology.comparison_rows([pd, hybrid])
    assert [row.load.label() for row in rows] == ["4", "inf"]
    assert rows[0].summaries[0].good == 6 and rows[0].summaries[1].good == 3
    assert rows[0].goodput_ratio == pytest.approx(2.0)
    table = topology.format_comparison(["1P1D", "2 hybrid"], rows)
    head, labels, first, second = table.splitlines()
    assert "TTFT p50 ms" in head and "goodput req/s" in head and labels.split()[0] == "rate"
    assert labels.endswith("1P1D/2 hybrid") and labels.count("2 hybrid") == 7
    cells = first.split("|")
    assert cells[0].strip() == "4" and cells[1].split() == ["105.0", "150.0"] and cells[-1].strip() == "2.00"
    assert second.split("|")[0].strip() == "inf"
    assert len({len(line) for line in table.splitlines()[1:]}) == 1  # columns line up

    no_slo = topology.comparison_rows([fake_result("a", 0.1, Slo()), fake_result("b", 0.1, Slo())])
    assert no_slo[0].goodput_ratio is None
    assert topology.format_comparison(["a", "b"], no_slo).splitlines()[2].endswith("-")
    with pytest.raises(ValueError, match="different loads"):
        topology.comparison_rows([pd, fake_result("x", 0.1, slo, loads=(2.0, 4.0))])


def test_comparison_json_is_plain_json() -> None:
    slo = Slo(ttft_ms=150.0, tpot_ms=200.0)
    cfg = config("--slo-ttft-ms", "150", "--slo-tpot-ms", "200")
    runs = []
    for topo, ttft in zip(topology.TOPOLOGIES, (0.1, 0.2)):
        workers = tuple(topology.Placement(f"worker-{i}-{role}", role, str(i), None)
                        for i, role in enumerate(topo.roles()))
        result = fake_result(topo.label, ttft, slo)
        meta = topology.topology_json(topo, workers, 3.2, {"remote": 6})
        result = BenchResult(result.label, {**result.config, "base_url": "u", "topology": meta}, slo, result.runs)
        runs.append(topology.TopologyRun(topo, workers, 3.2, {"remote": 6}, result))
    data = topology.comparison_json(cfg, runs, topology.comparison_rows([r.result for r in runs]))
    text = json.dumps(data, allow_nan=False)
    assert json.loads(text)["schema"] == topology.SCHEMA
    assert [t["name"] for t in data["topologies"]] == ["1p1d", "hybrid"]
    assert [w["role"] for w in data["topologies"][0]["workers"]] == ["prefill", "decode"]
    assert data["topologies"][1]["result"] == "hybrid.json" and data["config"]["serve"] == {"model": "m"}
    assert [r["load"]["value"] for r in data["rates"]] == [4.0, "inf"]
    assert data["rates"][0]["1p1d"]["goodput"] > data["rates"][0]["hybrid"]["goodput"] == 0
    assert data["rates"][0]["goodput_ratio"] is None  # the second's goodput is 0


def test_notes_name_the_local_prefill_threshold_and_missing_slos() -> None:
    short = topology.notes(config("--input-len", "16"))
    assert any("--local-prefill-threshold" in n for n in short) and any("no SLO" in n for n in short)
    assert topology.notes(config("--input-len", "16", "--router-args", "--local-prefill-threshold 0",
                                 "--slo-ttft-ms", "100")) == []


# End to end: the real command on this machine's CPU.

def _marked_processes(marker: bytes) -> list[int]:
    """Live processes whose environment carries ``marker`` (every child the command started inherits it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.mark.timeout(300)
def test_the_command_runs_both_topologies_and_leaves_nothing(tmp_path: Path) -> None:
    out, logs = tmp_path / "out", tmp_path / "logs"
    marker = f"PDSERVE_TOPOLOGY_TEST={uuid.uuid4().hex}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    argv = [sys.executable, "-m", "pdserve.cli", "bench", "topology", "--num-prompts", "6", "--input-len", "48",
            "--output-len", "8", "--request-rate", "4,inf", "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000",
            "--worker-args=--num-blocks 256 --max-batch-size 16 --dtype float32 --device-type cpu", "--seed", "1",
            "--output-dir", str(out), "--log-dir", str(logs)]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    print(done.stdout[-4000:], done.stderr[-4000:])  # for -s runs and failures
    assert done.returncode == 0

    deadline = time.monotonic() + 10.0
    while _marked_processes(marker.encode()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _marked_processes(marker.encode()) == []

    cores = sorted(os.sched_getaffinity(0))
    halves = [format_cpu_list(cores[:len(cores) // 2]), format_cpu_list(cores[len(cores) // 2:])]
    for name, label, roles in (("1p1d", "1P1D", ["prefill", "decode"]), ("hybrid", "2 hybrid", ["hybrid"] * 2)):
        result = from_json(json.loads((out / f"{name}.json").read_text()))
        assert result.label == label and [run.load.label() for run in result.runs] == ["4", "inf"]
        assert all(run.summary.completed > 0 for run in result.runs)
        workers = result.config["topology"]["workers"]
        assert [w["role"] for w in workers] == roles and [w["cpus"] for w in workers] == halves
        assert {p.name for p in (logs / name).iterdir()} >= {f"worker-{i}-{r}.log" for i, r in enumerate(roles)}

    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["schema"] == topology.SCHEMA and comparison["config"]["cpus"] == halves
    assert [t["name"] for t in comparison["topologies"]] == ["1p1d", "hybrid"]
    assert comparison["topologies"][0]["prefills"].get("remote", 0) > 0  # 1P1D really handed prompts over
    assert comparison["topologies"][1]["prefills"].get("remote", 0) == 0
    for rate in comparison["rates"]:
        assert rate["1p1d"]["completed"] > 0 and rate["hybrid"]["completed"] > 0
        assert rate["goodput_ratio"] is not None
    for name in ("latency_cdf.png", "throughput.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)

    printed = done.stdout
    for line in ("1P1D @ rate 4 req/s:", "1P1D @ rate inf req/s:", "2 hybrid @ rate 4 req/s:",
                 "2 hybrid @ rate inf req/s:"):
        assert line in printed
    table = printed[printed.index("TTFT p50 ms") - 10:].splitlines()
    assert table[1].endswith("1P1D/2 hybrid") and table[2].split("|")[0].strip() == "4"
