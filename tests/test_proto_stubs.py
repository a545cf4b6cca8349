"""The checked-in ``pdserve/v1`` stubs are exactly what ``make proto`` generates."""
from __future__ import annotations

import filecmp
import glob
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def test_stubs_match_make_proto(tmp_path: Path) -> None:
    protos = sorted(glob.glob(str(ROOT / "proto/pdserve/v1/*.proto")))
    assert protos, "no .proto files under proto/pdserve/v1"
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "proto"), f"--python_out={tmp_path}",
           f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *protos]
    subprocess.run(cmd, check=True, capture_output=True)
    fresh = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    checked_in = {p.relative_to(ROOT) for p in (ROOT / "pdserve/v1").iterdir() if p.name.endswith(GENERATED)}
    assert fresh == checked_in, "stale or missing stubs: run `make proto`"
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, ROOT / p, shallow=False)]
    assert not stale, f"stubs differ from the .proto sources: run `make proto` ({stale})"


def test_stubs_import_beside_etcd_client() -> None:
    code = ("import etcd3aio\nfrom pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, "
            "worker_pb2_grpc\nassert router_pb2.DESCRIPTOR.package == 'pdserve.v1'\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env)
