"""The benchmark registry and harness behind ``catkit bench``.

A suite is a function ``fn(quick: bool) -> list[dict]`` registered with ``@register``. Each row is
one measurement; rows that compare catkit with an anchor carry ``"correct": bool`` from a check
run in the same process. The harness prints a table, and writes JSON with the card, versions and
rows. A row whose correctness check failed keeps its timings but loses its speedup columns.
"""

from __future__ import annotations

import datetime
import importlib
import json
import math
import os
import platform
from dataclasses import dataclass
from typing import Callable

import torch

# Modules that define suites; imported lazily so ``catkit bench --list`` stays cheap.
_SUITE_MODULES = [
    "catkit.bench.attention",
    "catkit.bench.delta_rule",
    "catkit.bench.sparse_attention",
    "catkit.bench.comm",
    "catkit.bench.comm_symm",
    "catkit.bench.serve",
    "catkit.bench.ngram",
]


@dataclass
class Suite:
    name: str
    fn: Callable[[bool], list[dict]]
    help: str
    needs_gpu: bool


SUITES: dict[str, Suite] = {}


def register(name: str, help: str, needs_gpu: bool = False):
    """Decorator: ``@register("delta_rule", "FG2-GDN vs fla", needs_gpu=True)``."""

    def deco(fn):
        if name in SUITES:
            raise ValueError(f"benchmark suite {name!r} registered twice")
        SUITES[name] = Suite(name, fn, help, needs_gpu)
        return fn

    return deco


def load_suites() -> dict[str, Suite]:
    for mod in _SUITE_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError as e:  # a suite whose optional dependency is missing stays unlisted
            print(f"[bench] skipping {mod}: {e}")
    return SUITES


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def time_cuda(fn: Callable[[], object], warmup: int = 3, rep: int = 10) -> float:
    """Median milliseconds of ``fn()``: CUDA events on a GPU, wall clock on the CPU."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup * 5, rep=rep * 10, return_mode="median"))
    import time

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def _meta() -> dict:
    meta = {
        "device": device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    return meta


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4g}"
    return str(v)


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _redact_failed(rows: list[dict]) -> list[dict]:
    """Drop speedup columns from rows whose correctness check failed (never report them)."""
    out = []
    for r in rows:
        if r.get("correct") is False:
            r = {k: v for k, v in r.items() if not (k.startswith("speedup") or k.startswith("ratio"))}
            r["note"] = "correctness check FAILED: no speedup reported"
        out.append(r)
    return out


def run_suite(name: str, quick: bool = False, out_dir: str | None = None) -> dict:
    """Run one suite, print its table, write ``<out_dir>/<name>-<card>.json``; return the record."""
    suites = load_suites()
    if name not in suites:
        raise ValueError(f"suite: unknown benchmark {name!r}; choose from {sorted(suites)}")
    suite = suites[name]
    if suite.needs_gpu and not torch.cuda.is_available():
        raise RuntimeError(f"benchmark {name!r} needs a CUDA GPU; none is visible")
    rows = _redact_failed(suite.fn(quick))
    record = {"suite": name, "quick": quick, **_meta(), "rows": rows}
    print(f"\n== {name} on {record['device']} (torch {record['torch']}, triton {record['triton']})")
    print(format_table(rows))
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        card = record["device"].split("(")[0].strip().replace(" ", "_").replace("/", "_")
        path = os.path.join(out_dir, f"{name}-{card}{'-quick' if quick else ''}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(path + ".tmp", path)
        print(f"wrote {path}")
    record["ok"] = all(r.get("correct", True) is not False for r in rows)
    return record
