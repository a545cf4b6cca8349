"""``pdserve bench serve`` checked against an independent client, NVIDIA's ``aiperf``: the same
workload (streaming completions, fixed concurrency, fixed prompt and output lengths, fixed
request count) against the same local cluster, and both tools' TTFT and output token
throughput agree within 10%.

Both tools define the two metrics the same way: TTFT is the time from sending the request to
the first streamed chunk that carries content; output throughput is all output tokens over the
time from the first request sent to the last response received. aiperf counts output tokens
with the model's tokenizer on the streamed text unless ``--use-server-token-count`` is given;
we count ``usage.completion_tokens``, so aiperf gets that flag (re-tokenizing the text may
merge tokens at chunk boundaries, e.g. 30 instead of 32). Each tool runs three times, alternately,
and the medians are compared, since the server shares a few CPU cores with both clients.
Both send the same request body (``max_tokens``, ``ignore_eos``, temperature 0, streaming with
usage); only the prompt text differs (aiperf's corpus vs our word list, same token count).

The server (etcd, router, worker) runs on one half of the machine's cores and the clients on the
other: aiperf's own processes take about 60% of a core, and on shared cores they slow the CPU
server while it measures (TTFT and throughput 18-25% apart on 2 shared cores, though the
definitions match). Needs at least 2 cores.

aiperf lives in its own virtual environment, made once and cached: it cannot be installed
next to the project (it pins ``huggingface-hub<2`` and an older aiohttp than
``constraints.txt``), so its version is pinned here instead.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import contextlib
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from pdserve.bench import serve
from pdserve.common.model_source import resolve_model
from pdserve.common.tokenizer import tokenizer_dir
from tests.services.cluster_fixture import local_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

# Outside constraints.txt: aiperf's own pins conflict with the project's (see the docstring).
AIPERF_VERSION = "0.13.0"
CONCURRENCY = 4
INPUT_LEN = 128
OUTPUT_LEN = 32
NUM_REQUESTS = 24
ROUNDS = 3
TOLERANCE = 0.10
AIPERF_TIMEOUT = 300.0


@contextlib.contextmanager
def pinned(cores: set[int]) -> Iterator[None]:
    """This process (and every process it starts meanwhile) on ``cores`` only."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def split_cores() -> tuple[set[int], set[int]]:
    """The server's cores and the clients' cores: two halves of this process's cores."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("the server and the clients need a core each")
    half = len(cores) // 2
    return set(cores[:half]), set(cores[half:])


def aiperf_venv() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "pdserve" / "aiperf-venv"


@pytest.fixture(scope="module")
def aiperf() -> Path:
    """The ``aiperf`` executable of the pinned version, installing it on first use (skips if it cannot)."""
    venv = aiperf_venv()
    exe = venv / "bin" / "aiperf"
    stamp = venv / f"installed-aiperf-{AIPERF_VERSION}"
    if stamp.exists() and exe.exists():
        return exe
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    steps = ([sys.executable, "-m", "venv", str(venv)],
             [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
              "--retries", "1", "--timeout", "30", f"aiperf=={AIPERF_VERSION}"])
    for cmd in steps:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            shutil.rmtree(venv, ignore_errors=True)
            pytest.skip(f"installing aiperf=={AIPERF_VERSION} timed out")
        if proc.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
            pytest.skip(f"cannot install aiperf=={AIPERF_VERSION} ({' '.join(cmd[-2:])}): {tail}")
    stamp.touch()
    return exe


def run_aiperf(exe: Path, url: str, tokenizer: str, out: Path, seed: int) -> dict[str, float]:
    """One aiperf run of the workload; TTFT (ms) and output throughput (tok/s) from its JSON export."""
    cmd = [str(exe), "profile", "--model", "smollm2", "--url", url, "--endpoint-type", "completions",
           "--streaming", "--concurrency", str(CONCURRENCY), "--request-count", str(NUM_REQUESTS),
           "--isl", str(INPUT_LEN), "--isl-stddev", "0", "--osl", str(OUTPUT_LEN), "--osl-stddev", "0",
           # the body ours sends: ignore_eos and greedy (not min_tokens, which ours does not send)
           "--extra-inputs", "ignore_eos:true", "--extra-inputs", "temperature:0",
           "--tokenizer", tokenizer, "--use-server-token-count",
           "--random-seed", str(seed), "--warmup-request-count", "2", "--artifact-dir", str(out),
           "--ui", "none", "--no-server-metrics", "--no-gpu-telemetry",
           # a small footprint: the server shares this machine's CPU cores with the client
           "--workers-max", "1", "--record-processors", "1"]
    log = out.parent / f"{out.name}.log"
    with log.open("w") as sink:
        # its own session, so that aiperf's service processes can all be ended as one group
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=AIPERF_TIMEOUT)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # anything of aiperf's still running
            except ProcessLookupError:
                pass
            proc.wait()
    assert rc == 0, f"aiperf exited with {rc}:\n" + "\n".join(log.read_text().splitlines()[-40:])
    data = json.loads((out / "profile_export_aiperf.json").read_text())
    assert data["request_count"]["avg"] == NUM_REQUESTS, data["request_count"]
    assert not data.get("error_summary"), data["error_summary"]
    assert data["usage_completion_tokens"]["min"] == OUTPUT_LEN == data["usage_completion_tokens"]["max"]
    return {"ttft_ms": data["time_to_first_token"]["avg"], "output_tps": data["output_token_throughput"]["avg"]}


def run_pdserve(url: str, out: Path, seed: int) -> dict[str, float]:
    """One ``pdserve bench serve`` run of the workload; TTFT (ms) and output throughput from result.json."""
    argv = ["--base-url", url, "--endpoint", "completions", "--concurrency", str(CONCURRENCY),
            "--num-prompts", str(NUM_REQUESTS), "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN),
            "--seed", str(seed), "--output-dir", str(out), "--no-plots"]
    assert serve.main(argv) == 0
    summary = json.loads((out / "result.json").read_text())["runs"][0]["summary"]
    assert (summary["completed"], summary["failed"]) == (NUM_REQUESTS, 0), summary
    assert summary["mean_output_tokens"] == OUTPUT_LEN
    return {"ttft_ms": summary["ttft"]["mean"], "output_tps": summary["output_throughput"]}


def test_bench_serve_agrees_with_aiperf(tmp_path: Path, aiperf: Path) -> None:
    tokenizer = tokenizer_dir(resolve_model("smollm2"))
    ours: list[dict[str, float]] = []
    theirs: list[dict[str, float]] = []
    server_cores, client_cores = split_cores()
    with contextlib.ExitStack() as stack:
        with pinned(server_cores):
            cluster = stack.enter_context(local_cluster(hybrid=1, log_dir=str(tmp_path / "logs")))
        with pinned(client_cores):
            for i in range(ROUNDS):
                theirs.append(run_aiperf(aiperf, cluster.http_url, tokenizer, tmp_path / f"aiperf-{i}", seed=i + 1))
                ours.append(run_pdserve(cluster.http_url, tmp_path / f"pdserve-{i}", seed=i + 1))
    rows = []
    for metric in ("ttft_ms", "output_tps"):
        a = statistics.median(r[metric] for r in theirs)
        b = statistics.median(r[metric] for r in ours)
        rows.append((metric, a, b, abs(b - a) / a))
        print(f"{metric}: aiperf {[round(r[metric], 2) for r in theirs]} median {a:.2f} | "
              f"pdserve {[round(r[metric], 2) for r in ours]} median {b:.2f} | diff {abs(b - a) / a:.1%}")
    off = [f"{m}: aiperf {a:.2f} vs pdserve {b:.2f} ({d:.1%})" for m, a, b, d in rows if d > TOLERANCE]
    assert not off, "pdserve bench serve disagrees with aiperf by more than 10%: " + "; ".join(off)
