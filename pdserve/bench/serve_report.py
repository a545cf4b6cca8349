"""Results of ``pdserve bench serve``: what was measured, the statistics, the JSON file, the table and the plots.

Owns the data after the requests are done. A run's ``RequestResult`` values go to
``summarize`` once, with the run's duration and SLOs, giving a ``RunSummary``; the
runs of one invocation form a ``BenchResult``, which ``to_json``/``from_json`` turn
into the ``result.json`` file and back (``--compare`` reads them). ``format_*``
make the printed tables; ``write_plots`` draws PNGs with matplotlib, imported
only there so the benchmark runs without it under ``--no-plots``.

Times are kept in seconds in ``RequestResult`` and reported in milliseconds in
``Dist``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

SCHEMA = "pdserve.bench.serve/1"


@dataclass(frozen=True)
class Load:
    """One load point: Poisson arrivals at ``value`` req/s (``inf``: all at once), or ``value`` requests in flight."""
    kind: str  # "rate" | "concurrency"
    value: float

    def label(self) -> str:
        if self.kind == "concurrency":
            return f"c={int(self.value)}"
        return "inf" if math.isinf(self.value) else f"{self.value:g}"

    def describe(self) -> str:
        if self.kind == "concurrency":
            return f"concurrency {int(self.value)}"
        return f"rate {self.label()} req/s"


@dataclass(frozen=True)
class Slo:
    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def any(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None

    def describe(self) -> str:
        parts = [f"TTFT<={self.ttft_ms:g}ms" if self.ttft_ms is not None else "",
                 f"TPOT<={self.tpot_ms:g}ms" if self.tpot_ms is not None else ""]
        return " ".join(p for p in parts if p) or "none"


@dataclass(frozen=True)
class RequestResult:
    """One request as the client saw it; ``error`` is None when it completed."""
    input_len: int  # the length the prompt was made for (tokens, approximately)
    output_len: int  # max_tokens sent
    start: float  # seconds from the run's start to sending
    error: str | None = None  # "http_<status>" | "timeout" | "connection" | "stream_error" | "empty"
    ttft: float | None = None
    e2e: float | None = None
    itl: tuple[float, ...] = ()
    output_tokens: int = 0
    prompt_tokens: int | None = None  # the server's usage.prompt_tokens, when it sent usage

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None for a single-token (or failed) output."""
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Dist:
    """A latency distribution in milliseconds; every statistic is None when ``n`` is 0."""
    n: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None


@dataclass(frozen=True)
class RunSummary:
    completed: int
    failed: int
    errors: dict[str, int]
    duration: float
    request_throughput: float
    output_throughput: float
    total_throughput: float
    good: int | None  # completed requests meeting every SLO; None without SLOs
    goodput: float | None
    mean_prompt_tokens: float | None  # server-reported
    mean_output_tokens: float | None
    ttft: Dist
    tpot: Dist
    itl: Dist
    e2e: Dist


@dataclass(frozen=True)
class RunResult:
    load: Load
    summary: RunSummary
    requests: tuple[RequestResult, ...]


@dataclass(frozen=True)
class BenchResult:
    label: str
    config: dict[str, Any]
    slo: Slo
    runs: tuple[RunResult, ...]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def dist_ms(seconds: Iterable[float]) -> Dist:
    ms = [s * 1000.0 for s in seconds]
    if not ms:
        return Dist(0, None, None, None, None)
    return Dist(len(ms), sum(ms) / len(ms), percentile(ms, 50), percentile(ms, 90), percentile(ms, 99))


def meets_slo(r: RequestResult, slo: Slo) -> bool:
    """A completed request within every SLO given; a single-token output has no TPOT and meets that one."""
    if not r.ok:
        return False
    if slo.ttft_ms is not None and r.ttft * 1000.0 > slo.ttft_ms:
        return False
    tpot = r.tpot
    return not (slo.tpot_ms is not None and tpot is not None and tpot * 1000.0 > slo.tpot_ms)


def summarize(requests: Sequence[RequestResult], duration: float, slo: Slo) -> RunSummary:
    done = [r for r in requests if r.ok]
    errors: dict[str, int] = {}
    for r in requests:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    out_tokens = sum(r.output_tokens for r in done)
    prompts = [r.prompt_tokens for r in done if r.prompt_tokens is not None]
    per_s = 1.0 / duration if duration > 0 else 0.0
    good = sum(meets_slo(r, slo) for r in done) if slo.any() else None
    return RunSummary(
        completed=len(done), failed=len(requests) - len(done), errors=dict(sorted(errors.items())),
        duration=duration, request_throughput=len(done) * per_s, output_throughput=out_tokens * per_s,
        total_throughput=(out_tokens + sum(prompts)) * per_s,
        good=good, goodput=None if good is None else good * per_s,
        mean_prompt_tokens=sum(prompts) / len(prompts) if prompts else None,
        mean_output_tokens=out_tokens / len(done) if done else None,
        ttft=dist_ms(r.ttft for r in done), tpot=dist_ms(t for r in done if (t := r.tpot) is not None),
        itl=dist_ms(gap for r in done for gap in r.itl), e2e=dist_ms(r.e2e for r in done))


# JSON: plain dataclass fields, except the load value (JSON has no infinity) and tuples (lists in JSON).

def to_json(result: BenchResult) -> dict[str, Any]:
    return {"schema": SCHEMA, "label": result.label, "config": result.config,
            "slo": dataclasses.asdict(result.slo), "runs": [_run_json(run) for run in result.runs]}


def _run_json(run: RunResult) -> dict[str, Any]:
    value = "inf" if math.isinf(run.load.value) else run.load.value
    return {"load": {"kind": run.load.kind, "value": value}, "summary": dataclasses.asdict(run.summary),
            "requests": [dataclasses.asdict(r) for r in run.requests]}


def from_json(data: dict[str, Any]) -> BenchResult:
    if data.get("schema") != SCHEMA:
        raise ValueError(f"not a pdserve bench serve result (schema {data.get('schema')!r}, expected {SCHEMA!r})")
    return BenchResult(label=data["label"], config=data["config"], slo=Slo(**data["slo"]),
                       runs=tuple(_run_from_json(run) for run in data["runs"]))


def _run_from_json(data: dict[str, Any]) -> RunResult:
    load = Load(data["load"]["kind"], float(data["load"]["value"]))
    s = dict(data["summary"])
    for name in ("ttft", "tpot", "itl", "e2e"):
        s[name] = Dist(**s[name])
    requests = tuple(RequestResult(**{**r, "itl": tuple(r["itl"])}) for r in data["requests"])
    return RunResult(load, RunSummary(**s), requests)


# The printed tables.

def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_run(run: RunResult, slo: Slo) -> str:
    s = run.summary
    errors = ", ".join(f"{k}: {v}" for k, v in s.errors.items()) or "none"
    rows = [("Completed / failed requests", f"{s.completed} / {s.failed}"), ("Errors", errors),
            ("Duration (s)", _num(s.duration)), ("Request throughput (req/s)", _num(s.request_throughput)),
            (f"Goodput (req/s, {slo.describe() if slo.any() else 'no SLO given'})", _num(s.goodput)),
            ("Output token throughput (tok/s)", _num(s.output_throughput)),
            ("Total token throughput (tok/s)", _num(s.total_throughput)),
            ("Mean prompt tokens (server)", _num(s.mean_prompt_tokens, 1)),
            ("Mean output tokens", _num(s.mean_output_tokens, 1))]
    width = max(len(k) for k, _ in rows) + 2
    title = f" {run.load.describe()} "
    lines = [title.center(width + 34, "=")] + [f"{k + ':':<{width}}{v}" for k, v in rows]
    lines.append(f"{'(ms)':<{width}}{'mean':>8}{'p50':>9}{'p90':>9}{'p99':>9}")
    for name in ("ttft", "tpot", "itl", "e2e"):
        d: Dist = getattr(s, name)
        lines.append(f"{name.upper():<{width}}" + "".join(f"{_num(v):>9}" for v in (d.mean, d.p50, d.p90, d.p99)))
    return "\n".join(lines)


def format_table(runs: Sequence[RunResult]) -> str:
    """One line per load point, for a run of several."""
    head = f"{'load':>8} {'ok':>5} {'err':>4} {'req/s':>7} {'good/s':>7} {'out tok/s':>10} " \
           f"{'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9}"
    lines = [head]
    for run in runs:
        s = run.summary
        lines.append(f"{run.load.label():>8} {s.completed:>5} {s.failed:>4} {_num(s.request_throughput):>7} "
                     f"{_num(s.goodput):>7} {_num(s.output_throughput, 1):>10} {_num(s.ttft.p50, 1):>9} "
                     f"{_num(s.ttft.p99, 1):>9} {_num(s.tpot.p50, 1):>9} {_num(s.tpot.p99, 1):>9}")
    return "\n".join(lines)


# Plots: the object-oriented matplotlib API on Agg, so no pyplot state and no display is touched.

def write_plots(results: Sequence[BenchResult], out_dir: Path) -> list[Path]:
    """Latency CDFs and throughput against load, one line per run (one result) or per result (several).

    Returns:
        The PNG files written: ``latency_cdf.png`` and ``throughput.png`` under ``out_dir``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "latency_cdf.png", out_dir / "throughput.png"]
    for draw, path in ((_draw_cdfs, paths[0]), (_draw_throughput, paths[1])):
        fig = Figure(figsize=(11, 4.2), layout="constrained")
        FigureCanvasAgg(fig)
        draw(fig, results)
        fig.savefig(path, dpi=90)
    return paths


def _draw_cdfs(fig: Any, results: Sequence[BenchResult]) -> None:
    axes = fig.subplots(1, 2)
    for ax, name in zip(axes, ("ttft", "tpot")):
        top = 0.0
        for label, run in _labelled_runs(results):
            values = sorted(v * 1000.0 for r in run.requests if (v := getattr(r, name)) is not None)
            if values:
                ax.step([values[0], *values], [0.0, *((i + 1) / len(values) for i in range(len(values)))],
                        where="post", label=label)
                top = max(top, values[-1])
        title = f"{name.upper()} CDF"
        limit = getattr(results[0].slo, f"{name}_ms")
        if limit is not None and len(results) == 1:
            # An SLO far beyond the data would squash every curve against the axis: name it instead.
            if limit <= 2 * top:
                ax.axvline(limit, color="grey", linestyle=":", label=f"SLO {limit:g} ms")
            else:
                title += f" (SLO {limit:g} ms, off the right)"
        ax.set(title=title, xlabel="ms", ylabel="fraction of requests", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")


def _labelled_runs(results: Sequence[BenchResult]) -> Iterable[tuple[str, RunResult]]:
    for result in results:
        for run in result.runs:
            if len(results) == 1:
                yield run.load.describe(), run
            else:
                yield (result.label if len(result.runs) == 1 else f"{result.label} @ {run.load.describe()}"), run


def _draw_throughput(fig: Any, results: Sequence[BenchResult]) -> None:
    """Categorical x axis: the union of the loads, so ``inf`` and concurrency levels have a place."""
    loads = sorted({run.load for result in results for run in result.runs}, key=lambda x: (x.kind, x.value))
    position = {load: i for i, load in enumerate(loads)}
    left, right = fig.subplots(1, 2)
    for result in results:
        xs = [position[run.load] for run in result.runs]
        name = result.label if len(results) > 1 else "throughput"
        line, = left.plot(xs, [run.summary.request_throughput for run in result.runs], marker="o", label=name)
        goodput = [run.summary.goodput for run in result.runs]
        if all(g is not None for g in goodput) and len(results) > 1:
            left.plot(xs, goodput, marker="s", linestyle="--", color=line.get_color(), label=f"{result.label} goodput")
        elif all(g is not None for g in goodput):
            left.plot(xs, goodput, marker="s", linestyle="--", label=f"goodput ({result.slo.describe()})")
        right.plot(xs, [run.summary.output_throughput for run in result.runs], marker="o", label=result.label)
    kind = "request rate (req/s)" if all(load.kind == "rate" for load in loads) else "load"
    for ax, title, unit in ((left, "Requests", "req/s"), (right, "Output tokens", "tok/s")):
        ax.set_xticks(range(len(loads)), [load.label() for load in loads])
        ax.set(title=f"{title} per second", xlabel=kind, ylabel=unit)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
