"""Child processes of the launcher (and of the test fixtures), each in its own process group.

Lifecycle of a ``Child``: ``spawn()`` starts it in a new session (so signals to the
parent's terminal do not reach it and the whole group can be signalled) -> ``alive``
/ ``returncode`` while it runs -> ``stop()`` sends SIGTERM to the group, waits up to
a deadline, then SIGKILLs the group. A child given ``cpus`` is pinned to those cores
from its first instruction (what it starts inherits them). ``ProcessGroup`` owns a
list of children and stops them in reverse start order; it is idempotent and also
registered with atexit so an interrupted parent leaves no orphans.
"""
from __future__ import annotations

import atexit
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free right now on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def pdserve_command(*args: str) -> list[str]:
    """Run a pdserve subcommand with this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "pdserve.cli", *args]


def parse_cpu_list(text: str) -> frozenset[int]:
    """The cores of a Linux CPU list such as ``0-3,8`` (the syntax of ``taskset -c``)."""
    cores: set[int] = set()
    for part in text.split(","):
        lo, dash, hi = part.partition("-")
        try:
            first = int(lo)
            last = int(hi) if dash else first
        except ValueError:
            raise ValueError(f"CPU list {text!r}: expected cores and ranges such as 0-3,8") from None
        if first < 0 or last < first:
            raise ValueError(f"CPU list {text!r}: bad range {part.strip()!r}")
        cores.update(range(first, last + 1))
    return frozenset(cores)


def format_cpu_list(cores: Iterable[int]) -> str:
    """The shortest CPU list of ``cores``: runs become ranges, e.g. {0, 1, 2, 3, 8} -> ``0-3,8``."""
    parts: list[str] = []
    run: list[int] = []
    for core in sorted(set(cores)):
        if run and core != run[-1] + 1:
            parts.append(_cpu_range(run))
            run = []
        run.append(core)
    if run:
        parts.append(_cpu_range(run))
    return ",".join(parts)


def _cpu_range(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for children: ours, plus the repository root on PYTHONPATH so the
    generated ``pdserve.v1`` stubs import even without a fresh editable install."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: str | None = None
    env: dict[str, str] | None = None
    cpus: frozenset[int] = frozenset()  # pin to these cores; empty: wherever the OS runs it
    proc: subprocess.Popen | None = None
    _log: IO | None = field(default=None, repr=False)
    _reaped: bool = field(default=False, repr=False)  # its group was SIGKILLed after it exited: pgid may be reused

    def spawn(self) -> "Child":
        self._log = open(self.log_path, "ab") if self.log_path else None
        self._reaped = False
        out = self._log if self._log is not None else None
        # NOTE: pinned between fork and exec, so no thread of the child ever runs on another core.
        pin = functools.partial(os.sched_setaffinity, 0, self.cpus) if self.cpus else None
        self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT if out else None,
                                     stdin=subprocess.DEVNULL, env=self.env or child_env(), start_new_session=True,
                                     preexec_fn=pin)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "spawn() first"
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the child's whole process group (no-op once it is gone)."""
        if self.proc is not None and not self._reaped:
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def wait(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the group, wait up to ``timeout`` s, then SIGKILL it; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            if self.wait(timeout) is None:
                self.signal(signal.SIGKILL)
                self.wait(5.0)
        # NOTE: the leader may be gone while grandchildren in its group live on.
        self.signal(signal.SIGKILL)
        self._reaped = self.proc.returncode is not None
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode


class ProcessGroup:
    """Children started by one owner, stopped together (reverse order) exactly once."""

    def __init__(self) -> None:
        self.children: list[Child] = []
        atexit.register(self.stop_all, 3.0)

    def spawn(self, child: Child) -> Child:
        self.children.append(child.spawn())
        return child

    def first_dead(self) -> Child | None:
        return next((c for c in self.children if not c.alive), None)

    def stop_all(self, timeout: float = 10.0) -> None:
        """Stop every child; SIGTERM all first so they drain in parallel."""
        for child in reversed(self.children):
            if child.alive:
                child.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in reversed(self.children):
            child.stop(max(0.1, deadline - time.monotonic()))
        self.children.clear()
