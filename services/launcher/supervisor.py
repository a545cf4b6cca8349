"""Keeps the workers of a running ``LocalCluster`` up: restarts one that exits, with backoff.

Owns, per worker (one *slot* per ``Child`` in ``cluster.workers``), when it was
started and how many times in a row it failed to stay up. Lifecycle of a slot,
driven by ``Supervisor.poll()`` (``pdserve up`` calls it every half second once
the cluster is ready, and stops calling it when asked to shut down, so nothing is
restarted during shutdown):

  running --exits (any exit: crash, signal, or a clean drain nobody asked for)-->
  backoff: one log line (worker, role, exit code or signal, uptime) and its log
  tail; the dead process's group is reaped; restart after
  ``RestartPolicy.after_exit`` seconds (1, 2, 4 ... capped at 30 s) -->
  running again: same command line, ports and environment (a new process, so a
  new worker id and a fresh etcd lease); the others keep serving meanwhile.

A worker that stayed up ``stable_after`` seconds before exiting starts counting
from one again. When the count of failures in a row exceeds ``max_restarts``, or
the router or the launcher's own etcd exits (they are not restarted), ``poll()``
returns a message and the caller stops everything.
"""
from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable

from pdserve.launcher.cluster import LocalCluster
from pdserve.launcher.processes import Child


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5  # restarts in a row of one worker before giving up (0: never restart)
    initial_backoff: float = 1.0
    max_backoff: float = 30.0
    stable_after: float = 60.0  # uptime after which an exit no longer counts as "failed to stay up"

    def __post_init__(self) -> None:
        if self.max_restarts < 0 or self.initial_backoff < 0 or self.max_backoff < self.initial_backoff:
            raise ValueError(f"restart policy {self}: expected max_restarts >= 0 and "
                             "0 <= initial_backoff <= max_backoff")

    def after_exit(self, failures: int, uptime: float) -> tuple[int, float | None]:
        """A worker exited after ``uptime`` s, having failed ``failures`` times in a row
        before: (failures in a row now, seconds to wait before restarting it, or None
        to give up)."""
        failures = 1 if uptime >= self.stable_after else failures + 1
        if failures > self.max_restarts:
            return failures, None
        return failures, min(self.max_backoff, self.initial_backoff * 2 ** (failures - 1))


@dataclass
class Slot:
    """The supervisor's state about one worker."""
    started_at: float
    failures: int = 0
    restart_at: float | None = None  # set while the worker is down, waiting out its backoff


def describe_exit(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def worker_role(child: Child) -> str:
    argv = child.argv
    return argv[argv.index("--role") + 1] if "--role" in argv[:-1] else "?"


def indent(text: str) -> str:
    return "".join(f"  | {line}\n" for line in text.rstrip("\n").splitlines()) or "  | (empty)\n"


def stderr_line(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Supervisor:
    """Restarts the workers of ``cluster`` as they exit; see the module docstring."""

    def __init__(self, cluster: LocalCluster, policy: RestartPolicy = RestartPolicy(),
                 clock: Callable[[], float] = time.monotonic, emit: Callable[[str], None] = stderr_line,
                 stopping: Callable[[], bool] = lambda: False, tail_lines: int = 20) -> None:
        self.cluster = cluster
        self.policy = policy
        self.clock = clock
        self.emit = emit
        self.stopping = stopping
        self.tail_lines = tail_lines
        # by Child.name, unique per worker; workers added later get a slot when first seen
        self.slots: dict[str, Slot] = {c.name: Slot(started_at=clock()) for c in cluster.workers}

    def poll(self) -> str | None:
        """Handle exits and due restarts; a message when everything must stop, else None."""
        fatal = self._essential_exit()
        if fatal is not None:
            return fatal
        now = self.clock()
        for child in list(self.cluster.workers):
            slot = self.slots.setdefault(child.name, Slot(started_at=now))
            if slot.restart_at is None and not child.alive:
                verdict = self._on_exit(child, slot, now)
                if verdict is not None:
                    return verdict
            elif slot.restart_at is not None and now >= slot.restart_at and not self.stopping():
                self._restart(child, slot, now)
        return None

    def _essential_exit(self) -> str | None:
        etcd = self.cluster.etcd_server.child if self.cluster.etcd_server is not None else None
        for child in (self.cluster.router, etcd):
            if child is not None and not child.alive:
                return (f"pdserve up: {child.name} {describe_exit(child.proc.returncode)}; it is not restarted, "
                        f"stopping everything. Last lines of {child.log_path}:\n"
                        + indent(self.cluster.log_tail(child, self.tail_lines)))
        return None

    def _on_exit(self, child: Child, slot: Slot, now: float) -> str | None:
        uptime = now - slot.started_at
        how = describe_exit(child.proc.returncode if child.proc is not None else None)
        tail = indent(self.cluster.log_tail(child, self.tail_lines))
        child.stop(0.1)  # already exited: reap what is left of its process group, close its log
        slot.failures, delay = self.policy.after_exit(slot.failures, uptime)
        head = f"pdserve up: {child.name} (role {worker_role(child)}, pid {child.pid}) {how} after {uptime:.1f} s"
        if delay is None:
            self.emit(f"{head}. Last lines of {child.log_path}:\n{tail}")
            times = f"{slot.failures} time{'s' if slot.failures != 1 else ''}"
            return (f"pdserve up: giving up on {child.name}: it failed to stay up {times} in a row "
                    f"(--max-restarts {self.policy.max_restarts}); stopping everything")
        slot.restart_at = now + delay
        self.emit(f"{head}; restarting it in {delay:g} s (restart {slot.failures} of at most "
                  f"{self.policy.max_restarts} in a row). Last lines of {child.log_path}:\n{tail}")
        return None

    def _restart(self, child: Child, slot: Slot, now: float) -> None:
        mark_log(child, f"=== pdserve up: restarting {child.name} (restart {slot.failures} in a row) ===\n")
        child.spawn()
        slot.started_at, slot.restart_at = now, None
        self.emit(f"pdserve up: restarted {child.name} (role {worker_role(child)}, new pid {child.pid})")


def mark_log(child: Child, line: str) -> None:
    """Separate the runs of a restarted worker in its (appended) log file."""
    if child.log_path:
        try:
            with open(child.log_path, "a") as fh:
                fh.write(line)
        except OSError:
            pass
