"""Benchmark harness of lowrank_ops: ``python -m lowrank_ops.bench [--quick] ...``.

Suites live in ``lowrank_ops.bench.suites.<family>`` (one per op family, run
on their own by ``benchmarks/ops/bench_<op>.py``) and register named cases
with :func:`register`.  A case builds its tensors once, checks our result
against the reference, then hands :func:`measure` one :class:`Impl` per
implementation:

* ``ours``  — the lowrank_ops op or layer,
* ``ref``   — what people use today (the composed reference, or peft),
* ``floor`` — per suite (:func:`describe_roles`): the part of the work no
  implementation can skip where one exists (the frozen base GEMM, reading ``W``
  once), so ``vs floor`` shows the adapter overhead; for the linalg suites the
  exact dense factorisation or the product being factored.

Every row reports the median time per call (:func:`lowrank_ops.bench.timing.time_interleaved`: implementations timed in alternating rounds, ratios paired round by round),
GFLOP/s over the nominal flop count of the math that row computes, the
time ratios ``vs ref`` and ``vs floor`` (this row / that row; < 1 is faster),
peak extra memory for training steps, and ✓/✗ for ours vs ref agreement —
a wrong result is flagged rather than silently timed.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence, TextIO

import torch

from .timing import Timing, gbps, gflops, paired_ratio, peak_extra_memory, time_interleaved

__all__ = [
    "Config", "Impl", "Row", "Case", "Report",
    "register", "cases", "load_suites", "measure", "rel_err", "run", "header", "format_header",
    "format_table_header", "format_row", "write_json", "default_json_path",
    "time_interleaved", "paired_ratio", "gflops", "gbps", "peak_extra_memory", "Timing",
]

# Relative Frobenius error allowed between ours and the reference for ✓: loose
# (the check catches wrong results, not ulp differences), scaled to the dtype.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass(frozen=True)
class Config:
    device: torch.device
    dtype: torch.dtype
    quick: bool = False
    min_run_time: float = 2.0  # seconds of timed calls per implementation (interleaved rounds)
    min_runs: int = 5  # at least this many interleaved rounds
    warmup: int = 1  # untimed calls before the block-size probe

    @property
    def tol(self) -> float:
        return TOLERANCE[self.dtype]


@dataclass
class Impl:
    """One implementation of a case, ready to time.

    ``fn`` performs one call (one inference, or one forward+backward step);
    ``flops`` is the nominal flop count of the math it performs (``nbytes``,
    optional, the bytes it must move, for GB/s).  ``outputs`` performs the same
    call and returns the tensors to compare (output, and gradients for a
    training step); it defaults to ``[fn()]``.  ``reset`` frees what an earlier
    call left behind (gradients) so the memory measurement starts from the
    steady state.  ``interleave=False`` times the row in rounds of its own
    instead of alternating it with the others (its ratios are then ratios of
    medians): for a baseline so much slower, and so different in kind, that
    running it between the others changes their conditions (see the linalg
    suite's ``linalg.svd`` rows).  ``contract`` (for an ``ours`` row of a case
    without a reference row) returns the error of ours against its definition
    (e.g. a factorisation's relative residual), checked against the tolerance
    like the error against a reference; NaN counts as a failure.
    """

    name: str
    role: str  # "ours" | "ref" | "floor", or another name for an extra row (e.g. "floor_mirror")
    fn: Callable[[], object]
    flops: float
    nbytes: float = 0.0
    outputs: Optional[Callable[[], Sequence[torch.Tensor]]] = None
    reset: Optional[Callable[[], None]] = None
    interleave: bool = True
    contract: Optional[Callable[[], float]] = None

    def run_outputs(self) -> list:
        if self.outputs is not None:
            return list(self.outputs())
        out = self.fn()
        return list(out) if isinstance(out, (list, tuple)) else [out]


@dataclass
class Row:
    case: str
    impl: str
    role: str
    ms: float
    iqr_ms: float
    runs: int
    gflops: float
    vs_ref: Optional[float]
    vs_floor: Optional[float]
    peak_extra_mb: Optional[float]
    check: Optional[bool]
    max_rel_err: Optional[float]
    flops: float
    gbps: Optional[float]
    shape: dict = field(default_factory=dict)
    case_wall_s: Optional[float] = None  # wall time of the whole case (setup, check, timing, memory)


@dataclass
class Case:
    suite: str
    name: str
    run: Callable[[Config], list]  # -> list[Row]
    quick: bool = True
    shape: dict = field(default_factory=dict)


@dataclass
class Report:
    header: dict
    rows: list


_REGISTRY: dict[str, Case] = {}
_ROLES: dict[str, str] = {}  # suite -> what its ref / floor / check rows are


def describe_roles(suite: str, text: str) -> None:
    """What ``ref``, ``floor`` and the check column mean in ``suite`` (printed under its rows)."""
    _ROLES[suite] = text


def register(suite: str, name: str, run: Callable[[Config], list], *, quick: bool = True, shape: Optional[dict] = None) -> Case:
    """Register case ``name`` of ``suite``; ``quick`` cases make up ``--quick``."""
    if name in _REGISTRY:
        raise ValueError(f"lowrank_ops.bench: case {name!r} is registered twice")
    case = Case(suite, name, run, quick, dict(shape or {}))
    _REGISTRY[name] = case
    return case


def load_suites() -> None:
    from . import suites  # noqa: F401  (registers every suite's cases)


def cases(suite: Optional[str] = None, filter: Optional[str] = None, quick: bool = False) -> list[Case]:
    """Registered cases in registration order; ``filter`` is comma-separated substrings of case names."""
    load_suites()
    pats = [p for p in (filter or "").split(",") if p]
    return [
        c for c in _REGISTRY.values()
        if (suite is None or c.suite == suite)
        and (not quick or c.quick)
        and (not pats or any(p in c.name for p in pats))
    ]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``‖actual − expected‖ / ‖expected‖`` in float64; inf on a shape mismatch or a non-finite value."""
    if actual.shape != expected.shape:
        return float("inf")
    a, e = actual.detach().double(), expected.detach().double()
    err = ((a - e).norm() / e.norm().clamp_min(1e-30)).item()
    return err if math.isfinite(err) else float("inf")


def measure(cfg: Config, case: str, impls: Sequence[Impl], *, memory: bool = False, shape: Optional[dict] = None) -> list[Row]:
    """Time every implementation of one case, check ours against ref, derive the ratio columns.

    The outputs compared come from one untimed call before timing (which also
    warms up) or, with ``memory``, from the call whose peak memory is measured
    after timing (steady state), so checking costs no extra call.
    """
    outputs: dict = {}
    if not memory:
        for impl in impls:
            if impl.role in ("ours", "ref"):
                outputs[impl.name] = impl.run_outputs()
    peaks = {}
    together = [i for i in impls if i.interleave]
    tlist, rounds = [], []
    if together:
        tlist, rounds = time_interleaved([i.fn for i in together], cfg.min_run_time, device=cfg.device,
                                         warmup=cfg.warmup, min_rounds=cfg.min_runs)
    timings = {impl.name: t for impl, t in zip(together, tlist)}
    for impl in impls:
        if not impl.interleave:
            timings[impl.name] = time_interleaved([impl.fn], cfg.min_run_time, device=cfg.device,
                                                  warmup=cfg.warmup, min_rounds=cfg.min_runs)[0][0]
    if memory:
        for impl in impls:
            if impl.reset is not None:
                impl.reset()
            peaks[impl.name] = peak_extra_memory(
                lambda: outputs.__setitem__(impl.name, impl.run_outputs()), cfg.device) / 2**20

    ref_impl = next((i for i in impls if i.role == "ref"), None)
    errors = {}
    if ref_impl is not None:
        want = outputs[ref_impl.name]
        for impl in impls:
            if impl.role == "ours":
                got = outputs[impl.name]
                errors[impl.name] = (max(rel_err(a, b) for a, b in zip(got, want))
                                     if len(got) == len(want) else float("inf"))
    else:
        for impl in impls:
            if impl.role == "ours" and impl.contract is not None:
                err = float(impl.contract())
                errors[impl.name] = err if math.isfinite(err) else float("inf")
    outputs.clear()

    idx = {impl.name: k for k, impl in enumerate(together)}  # column in `rounds`
    floor_impl = next((i for i in impls if i.role == "floor"), None)

    def ratio(impl: Impl, base: Optional[Impl]) -> Optional[float]:
        """Paired ratio over the rounds where both alternated, else the ratio of medians."""
        if base is None:
            return None
        if impl.interleave and base.interleave:
            return paired_ratio(rounds, idx[impl.name], idx[base.name])
        return timings[impl.name].median / timings[base.name].median

    rows = []
    for impl in impls:
        t = timings[impl.name]
        err = errors.get(impl.name)
        rows.append(Row(
            case=case,
            impl=impl.name,
            role=impl.role,
            ms=t.median * 1e3,
            iqr_ms=t.iqr * 1e3,
            runs=t.runs,
            gflops=gflops(impl.flops, t.median),
            vs_ref=ratio(impl, ref_impl),
            vs_floor=ratio(impl, floor_impl),
            peak_extra_mb=peaks.get(impl.name),
            check=None if err is None else bool(err <= cfg.tol),
            max_rel_err=err,
            flops=impl.flops,
            gbps=gbps(impl.nbytes, t.median) if impl.nbytes else None,
            shape=dict(shape or {}),
        ))
    return rows


# --------------------------------------------------------------------------- report


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(cfg: Config) -> dict:
    import lowrank_ops

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    dev = cfg.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    return {
        "device": dev.type,
        "device_name": name,
        "torch": torch.__version__,
        "dtype": str(cfg.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "lowrank_ops": lowrank_ops.__version__,
        "build_info": lowrank_ops.BUILD_INFO,
        "peft": peft_version,
        "python": platform.python_version(),
        "quick": cfg.quick,
        "min_run_time_s": cfg.min_run_time,
        "min_runs": cfg.min_runs,
        "warmup": cfg.warmup,
        "tolerance": cfg.tol,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def format_header(h: dict) -> str:
    return (
        f"lowrank_ops bench | device {h['device']} ({h['device_name']}) | torch {h['torch']} | "
        f"dtype {h['dtype']} | threads {h['threads']} | lowrank_ops {h['lowrank_ops']} ({h['build_info']}) | "
        f"peft {h['peft'] or 'not installed'}{' | quick' if h['quick'] else ''}"
    )


def _marks(stream: TextIO) -> tuple:
    try:
        "✓✗".encode(getattr(stream, "encoding", None) or "ascii")
        return "✓", "✗"
    except (UnicodeEncodeError, LookupError):
        return "ok", "FAIL"


_COLS = (("case", 21, "<"), ("impl", 12, "<"), ("ms", 10, ">"), ("GFLOP/s", 8, ">"), ("vs ref", 7, ">"),
         ("vs floor", 8, ">"), ("peak MB", 8, ">"), ("check", 5, "^"))


def _line(cells) -> str:
    return " | ".join(f"{c:{a}{w}}" for c, (_, w, a) in zip(cells, _COLS)).rstrip()


def format_table_header() -> str:
    head = _line([name for name, _, _ in _COLS])
    return head + "\n" + "-+-".join("-" * w for _, w, _ in _COLS)


def _ms(v: float) -> str:
    return f"{v:.4f}" if v < 0.1 else f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def format_row(r: Row, marks=("✓", "✗")) -> str:
    ratio = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
    check = "" if r.check is None else marks[0] if r.check else marks[1]
    peak = "" if r.peak_extra_mb is None else f"{r.peak_extra_mb:.1f}"
    return _line([r.case, r.impl, _ms(r.ms), f"{r.gflops:.1f}", ratio(r.vs_ref), ratio(r.vs_floor), peak, check])


LEGEND = (
    "ms: median per call (one inference, or one forward+backward step) | GFLOP/s: nominal flops of the row's math / time\n"
    "vs ref, vs floor: time ratio this row / that row, < 1 = faster (paired round by round)\n"
    "peak MB: peak extra MiB allocated during one step (CPU: torch.profiler memory events; CUDA: max_memory_allocated)\n"
    "check: max relative error against the case's check (below, per suite) <= tolerance in the header"
)


def run(cfg: Config, selected: Sequence[Case], stream: TextIO = sys.stdout) -> Report:
    """Run ``selected`` cases, printing the table as rows arrive; returns every row."""
    h = header(cfg)
    marks = _marks(stream)
    print(format_header(h), file=stream)
    print(format_table_header(), file=stream, flush=True)
    rows: list[Row] = []
    start = time.perf_counter()
    failed: list[tuple[str, str]] = []
    for case in selected:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        try:
            case_rows = case.run(cfg)
        except Exception as e:  # one broken case must not lose the others' results
            msg = f"{type(e).__name__}: {e}".splitlines()[0]
            failed.append((case.name, msg))
            print(f"{case.name:<21} | {marks[1]} failed: {msg}", file=stream, flush=True)
            continue
        for r in case_rows:
            r.case_wall_s = time.perf_counter() - t0
            print(format_row(r, marks), file=stream, flush=True)
        rows.extend(case_rows)
    h["wall_s"] = time.perf_counter() - start  # the cases only, not imports
    h["failed_cases"] = [{"case": n, "error": m} for n, m in failed]
    print(LEGEND.replace("tolerance in the header", f"{cfg.tol:g}"), file=stream)
    for suite in dict.fromkeys(c.suite for c in selected):
        if suite in _ROLES:
            print(f"[{suite}] {_ROLES[suite]}", file=stream)
    bad = [r for r in rows if r.check is False]
    if bad:
        print(f"{marks[1]} results disagree with the reference (timings of these rows are not meaningful): "
              + ", ".join(f"{r.case}/{r.impl} (rel err {r.max_rel_err:.2e})" for r in bad), file=stream)
    if failed:
        print(f"{marks[1]} cases that raised (no rows): " + ", ".join(n for n, _ in failed), file=stream)
    return Report(h, rows)


def default_json_path(device: str) -> str:
    return os.path.join("benchmarks", "results", f"{device}-{datetime.date.today().isoformat()}.json")


def write_json(report: Report, path: str) -> None:
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"header": report.header, "rows": [asdict(r) for r in report.rows]}, f, indent=1, ensure_ascii=False)
        f.write("\n")
