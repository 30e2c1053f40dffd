"""Timing helpers shared by the benchmarks: interleaved repeats, medians, machine record, JSON output.

Method (the same for every benchmark, see ``docs/performance.md``):

- every contender is run ``warmup`` times first (allocator, caches, lazy initialisation);
- then ``repeats`` rounds; in each round every contender runs once, in a rotating order, so that a
  burst of load from another process on this shared machine hits all contenders alike;
- a contender's time is the median over rounds; a ratio A/B is the median over rounds of the
  per-round ratio (paired, so slow drifts of the machine's load cancel), and the ratio of the
  medians is recorded too;
- every JSON file records the machine (CPU model, cores, threads, load average before and after) and
  the torch version, next to the raw per-round times.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Copy-bandwidth probe: a tensor well beyond the last-level cache, so the copy streams from memory.
COPY_PROBE_BYTES = 256 * 2**20


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Flags every benchmark takes."""
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats (a smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: per benchmark)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each contender first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/<name>.json)")
    parser.add_argument("--tag", default="", help="suffix of the JSON name, e.g. _before")


def setup_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cuda_available": torch.cuda.is_available(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "shared_machine_note": "CPU shared with other agents' jobs; see load_average",
    }
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_kib"] = int(f.readline().split()[1])
    except OSError:
        pass
    return info


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], Any], device: torch.device | None = None) -> float:
    """Seconds of one call (synchronised on CUDA)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def interleaved(
    contenders: dict[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 1,
    device: torch.device | None = None,
    cpu_times: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Per-round seconds of each contender; rounds run every contender once, in a rotating order.

    ``cpu_times``, if given, also receives each call's CPU seconds of this process
    (``time.process_time``): on one thread, the wall time less the time spent waiting for a core
    that another process held.
    """
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            gc.collect()
            cpu_start = time.process_time()
            times[name].append(time_once(contenders[name], device))
            if cpu_times is not None:
                cpu_times.setdefault(name, []).append(time.process_time() - cpu_start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> dict[str, float]:
    """``num / den``: the median of the per-round ratios (primary) and the ratio of the medians."""
    rounds = [a / b for a, b in zip(times[num], times[den])]
    return {
        "median_of_round_ratios": statistics.median(rounds),
        "ratio_of_medians": median(times[num]) / median(times[den]),
        "min_round_ratio": min(rounds),
        "max_round_ratio": max(rounds),
    }


def copy_bandwidth(*, repeats: int = 5, nbytes: int = COPY_PROBE_BYTES) -> dict[str, float]:
    """Bytes moved per second by ``dst.copy_(src)`` of a large float32 tensor (read + write counted).

    This is the most an element-wise CPU loss can approach: it has to stream its inputs from memory and
    its gradient back at least once.
    """
    numel = nbytes // 4
    src = torch.rand(numel)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages
    times = [time_once(lambda: dst.copy_(src)) for _ in range(repeats)]
    t = median(times)
    return {"bytes_per_copy": 2 * numel * 4, "median_s": t, "GBps": 2 * numel * 4 / t / 1e9}


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:10.2f}"


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    """A plain fixed-width table."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    sys.stdout.flush()


def write_json(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    """``benchmarks/results/<name>.json`` (or ``out``) with the machine record added."""
    path = out or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine_info(), "command": " ".join(sys.argv), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def extra_peak_rss(fn: Callable[[], Any]) -> dict[str, Any]:
    """Extra peak resident memory of one call of ``fn``, in this (fresh) process.

    Resets the high-water mark (``/proc/self/clear_refs``), calls ``fn`` once and reports
    ``VmHWM - VmRSS before``; where ``clear_refs`` is unavailable, ``ru_maxrss`` of the whole
    process (an upper bound). Returns ``extra_peak_mib``, ``resident_before_mib``, ``seconds`` and
    ``method``.
    """
    import resource

    rss_before = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        method = "VmHWM after clear_refs"
    except OSError:
        method = "getrusage ru_maxrss (peak of the whole process, an upper bound)"
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"extra_peak_mib": (peak - rss_before) / 1024, "resident_before_mib": rss_before / 1024,
            "seconds": seconds, "method": method}


def profile_calls(calls: dict[str, Callable[[], object]], rows: int = 25) -> dict[str, str]:
    """One warm-up call, then a torch.profiler table (by self CPU time) of one call of each."""
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for name, fn in calls.items():
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
        print(f"\n== profile of one call: {name}\n{tables[name]}")
    return tables
