"""The router and the launcher never import torch or the engine."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULES = ["pdserve.router.cli", "pdserve.router.app", "pdserve.router.http_server",
           "pdserve.router.grpc_server", "pdserve.router.dispatch", "pdserve.router.policies",
           "pdserve.cluster.discovery", "pdserve.cluster.registry", "pdserve.launcher.cli",
           "pdserve.common.tokenizer"]


def test_router_imports_no_torch() -> None:
    code = "\n".join([f"import {m}" for m in MODULES] + [
        "import sys",
        "heavy = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'pdserve.engine')))",
        "assert not heavy, heavy",
    ])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
