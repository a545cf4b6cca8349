"""Chaos: streaming load on a real 2P2D ``pdserve up`` cluster while its parts are killed.

The cluster is the product's own (``pdserve up`` with its supervisor) on an etcd this
test owns, so etcd can die and come back with or without its data; like the etcd
``pdserve up`` starts, it speaks mutual TLS, and comes back with the same certificates. Faults, in turn,
every ``PDSERVE_CHAOS_GAP`` seconds (default 20): SIGKILL a decode worker, stop etcd
and restart it empty, SIGKILL a prefill worker, SIGTERM (drain) a decode worker,
SIGKILL etcd and restart it with its data. Then, with the load stopped:

- no request hung past its deadline;
- no request failed before its first token (a healthy worker of its role remained);
- every token any request received is the offline engine's (a forged, stale or
  misplaced KV write would change them);
- the supervisor brought every worker back, and every live worker's KV blocks, queues
  and reservations are back to zero.

``make test`` runs a short version; ``make chaos`` runs it for ``PDSERVE_CHAOS_SECONDS``
(default 600) with ``PDSERVE_CHAOS_STREAMS`` concurrent streams (default 16) and prints
the counts recorded in docs/benchmarks.md.
"""
from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest
from pdserve.v1 import common_pb2, router_pb2

from pdserve.launcher.certs import create_etcd_certs
from pdserve.launcher.etcd_server import EtcdServer, start_etcd
from pdserve.launcher.processes import ProcessGroup, free_port
from tests.disagg.helpers import corpus_ids, prompt, stats
from tests.services.clients import http_json, live_workers, router_stub, wait_for

ROOT = Path(__file__).resolve().parents[2]
SECONDS = float(os.environ.get("PDSERVE_CHAOS_SECONDS", "60"))
STREAMS = int(os.environ.get("PDSERVE_CHAOS_STREAMS", "4"))
GAP = float(os.environ.get("PDSERVE_CHAOS_GAP", "20"))
MAX_TOKENS = 16
DEADLINE = 120.0  # seconds per request; a request past it "hung"

pytestmark = pytest.mark.timeout(int(SECONDS) + 600)


@dataclass
class Tally:
    ok: int = 0
    failed_streaming: collections.Counter = field(default_factory=collections.Counter)
    failed_before_first: collections.Counter = field(default_factory=collections.Counter)
    hung: int = 0
    wrong: list[str] = field(default_factory=list)
    faults: collections.Counter = field(default_factory=collections.Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, got: list[int], want: list[int], error: grpc.RpcError | None) -> None:
        with self.lock:
            if got != want[:len(got)]:
                self.wrong.append(f"{got} is not a prefix of {want}")
            if error is None:
                self.ok += got == want
            elif error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                self.hung += 1
            elif got:
                self.failed_streaming[error.code().name] += 1
            else:
                self.failed_before_first[f"{error.code().name}: {error.details()[:120]}"] += 1

    def summary(self) -> str:
        return (f"requests ok {self.ok}, failed after streaming {dict(self.failed_streaming)}, failed before the "
                f"first token {dict(self.failed_before_first)}, hung {self.hung}, wrong tokens {len(self.wrong)}, "
                f"faults {dict(self.faults)}")


class Cluster:
    """``pdserve up --prefill 2 --decode 2`` on an etcd of the test's own."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir, self.group, self.certs = log_dir, ProcessGroup(), create_etcd_certs(parent=str(log_dir))
        self.etcd: EtcdServer = start_etcd(self.group, str(log_dir), data_dir=str(log_dir / "etcd-data"),
                                           tls=self.certs)
        self.http_port, self.grpc_port = free_port(), free_port()
        client = self.certs.client
        argv = [sys.executable, "-m", "pdserve.cli", "up", "--etcd", self.etcd.url, "--etcd-ca", client.ca,
                "--etcd-cert", client.cert, "--etcd-key", client.key, "--prefill", "2", "--decode", "2",
                "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port), "--log-dir", str(log_dir),
                "--max-restarts", "50", "--worker-args", "--num-blocks 256 --max-batch-size 16",
                "--router-args", "--local-prefill-threshold 16"]
        self.out = open(log_dir / "up.out", "w")
        self.up = subprocess.Popen(argv, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1"),
                                   stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: "Ctrl-C stops everything" in self.output() or self.up.poll() is not None, 300.0,
                 interval=0.2, what="pdserve up ready")
        assert self.up.poll() is None, self.output()

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def output(self) -> str:
        return (self.log_dir / "up.out").read_text()

    def workers(self, role: str | None = None) -> list[dict]:
        try:
            return [w for w in live_workers(self.http_url) if role is None or w["role"] == role]
        except OSError:
            return []

    def signal_worker(self, role: str, sig: int) -> None:
        pids = [int(w["id"].split("-")[-2]) for w in self.workers(role)]
        os.kill(random.choice([p for p in pids if Path(f"/proc/{p}").exists()]), sig)

    def restart_etcd(self, keep_data: bool) -> None:
        ports, data_dir = self.etcd.ports, self.etcd.data_dir
        if keep_data:
            self.etcd.child.signal(signal.SIGKILL)
            self.etcd.child.wait(10.0)
        else:
            self.etcd.stop(keep_data=False)
        self.etcd = start_etcd(self.group, str(self.log_dir), ports=ports, data_dir=data_dir, tls=self.etcd.tls)

    def stop(self) -> None:
        if self.up.poll() is None:
            self.up.send_signal(signal.SIGINT)
            try:
                self.up.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.up.pid, signal.SIGKILL)
        self.out.close()
        self.etcd.stop()
        self.group.stop_all(5.0)
        self.certs.remove()


@pytest.fixture(scope="module")
def reference() -> Iterator[tuple[list[list[int]], list[list[int]]]]:
    from pdserve.common.sampling_params import SamplingParams
    from pdserve.engine import LLM

    llm = LLM(model="smollm2", num_blocks=512, max_batch_size=16)
    ids = corpus_ids(llm.tokenizer)
    prompts = [prompt(ids, n, offset=113 * i) for i, n in enumerate((20, 48, 90, 150, 200, 260))]
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    yield prompts, [list(o.token_ids) for o in outs]


def _stream(cluster: Cluster, ids: list[int], tally: Tally, want: list[int]) -> bool:
    """One request; whether it succeeded."""
    request = router_pb2.GenerateRequest(
        token_ids=router_pb2.TokenIds(ids=ids), stream=True,
        params=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    got: list[int] = []
    try:
        for response in router_stub(f"127.0.0.1:{cluster.grpc_port}").Generate(request, timeout=DEADLINE):
            got.extend(response.token_ids)
        tally.record(got, want, None)
        return True
    except grpc.RpcError as error:
        tally.record(got, want, error)
        return False


def _load(cluster: Cluster, prompts: list[list[int]], wants: list[list[int]], tally: Tally,
          stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        i = rng.randrange(len(prompts))
        if not _stream(cluster, prompts[i], tally, wants[i]):
            stop.wait(0.2)  # as a client would back off


def _faults(cluster: Cluster) -> list[tuple[str, Callable[[], None]]]:
    return [("sigkill decode", lambda: cluster.signal_worker("decode", signal.SIGKILL)),
            ("etcd restart without data", lambda: cluster.restart_etcd(keep_data=False)),
            ("sigkill prefill", lambda: cluster.signal_worker("prefill", signal.SIGKILL)),
            ("sigterm decode", lambda: cluster.signal_worker("decode", signal.SIGTERM)),
            ("etcd sigkill, restart with data", lambda: cluster.restart_etcd(keep_data=True))]


def _recovered(cluster: Cluster) -> bool:
    live = cluster.workers()
    if sorted(w["role"] for w in live) != ["decode", "decode", "prefill", "prefill"]:
        return False
    for w in live:
        s = stats(w)
        if s.running or s.waiting or s.inflight_streams or s.kv_blocks_used or s.remote_reservations \
                or s.remote_prefills_active:
            return False
    return True


def test_streaming_load_survives_killed_workers_and_etcd(tmp_path: Path, reference) -> None:
    prompts, wants = reference
    cluster = Cluster(tmp_path)
    tally, stop = Tally(), threading.Event()
    threads = [threading.Thread(target=_load, args=(cluster, prompts, wants, tally, stop, s), daemon=True)
               for s in range(STREAMS)]
    try:
        wait_for(lambda: len(cluster.workers()) == 4, 60.0, what="four workers")
        for t in threads:
            t.start()
        start, faults = time.monotonic(), _faults(cluster)
        while time.monotonic() - start < SECONDS:
            time.sleep(min(GAP, max(0.0, SECONDS - (time.monotonic() - start))))
            if time.monotonic() - start >= SECONDS:
                break
            name, fault = faults[sum(tally.faults.values()) % len(faults)]
            wait_for(lambda: len(cluster.workers()) == 4, 90.0, what=f"every worker back before {name}")
            fault()
            tally.faults[name] += 1
        stop.set()
        for t in threads:
            t.join(DEADLINE + 10)
        assert not any(t.is_alive() for t in threads), "a load thread is stuck"
        wait_for(lambda: _recovered(cluster), 120.0, interval=0.5, what="all four workers back and quiet")
        print(f"\nchaos {SECONDS:.0f} s, {STREAMS} streams: {tally.summary()}")
        assert cluster.up.poll() is None, cluster.output()[-3000:]
        assert tally.hung == 0 and not tally.wrong and not tally.failed_before_first, tally.summary()
        assert tally.ok > 0 and sum(tally.faults.values()) >= 1, tally.summary()
        status, _ = http_json(f"{cluster.http_url}/health")
        assert status == 200
    finally:
        stop.set()
        cluster.stop()
