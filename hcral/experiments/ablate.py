"""``hcral ablate SPEC.yaml``: a resumable grid of training runs and its results table.

A SPEC file (YAML, paths relative to the directory ``hcral ablate`` runs in, as configs are)::

    name: module_ablation_fcos_atss_synthetic    # title of the tables
    description: one paragraph for the Markdown header   # optional
    base_config: configs/synthetic_fcos_atss_baseline.yaml   # optional (defaults otherwise)
    base_overrides: [train.epochs=12, ...]        # optional, applied after base_config
    axes:                                         # cells = product of the axes, in this order
      variant:                                    # axis name -> {value name: [overrides]}
        baseline: [loss.cls=focal, loss.reg=giou, loss.assigner=atss]
        hcral: [loss.cls=hcra_c, loss.reg=hcra_r, loss.assigner=eatss]
    seeds: [0, 1, 2]                              # train.seed of each run
    metrics: [AP, AP50, AP75]                     # optional (this default); any key of metrics.json, e.g. score_iou_spearman
    baseline: {variant: baseline}                 # reference of the paired differences, see below
    out_dir: runs/ablate/module_ablation          # run folders
    results: experiments/results/module_ablation  # writes <results>.csv, <results>_runs.csv, <results>.md

A cell is one value of every axis; its name is the value names joined by ``/`` (``atss/qfl``).
``baseline`` is either a full cell name or a mapping ``{axis: value}`` over some of the axes: each
cell is then compared with the cell that has those values on those axes and its own values on the
others (so ``{cls: focal}`` compares every loss with focal loss *on the same detector*).

A run is one cell with one seed, in ``<out_dir>/<value>__<value>/seed<k>``. Its resolved config is
written there as ``ablate_config.yaml`` and trained with ``hcral train ... --resume``, so a crashed
run continues from its checkpoint. Periodic evaluation is switched off (``train.eval_interval=0``),
so ``metrics.json`` is written only by the final evaluation: a run whose ``metrics.json`` exists is
finished and is skipped on the next invocation. A run whose folder is gone (run folders are
scratch; the tables are what is committed) but that ``<results>_runs.csv`` records as finished, with
every metric, is taken from there rather than trained again or overwritten as pending; change a
SPEC's overrides only with a new ``results`` path. A run whose folder holds a different config fails
with a message instead of mixing results. Every run that fails (bad override, crash) is kept in the
tables with its status and error; the error's full log is ``train.log`` in the run folder.
"""

from __future__ import annotations

import csv
import functools
import io
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hcral.config import ConfigError, config_to_dict, load_config, save_config
from hcral.experiments.stats import PairedDiff, format_ci, mean, paired_difference, std
from hcral.utils import write_text_atomic

__all__ = ["Cell", "RunResult", "Spec", "load_spec", "plan_runs", "run_grid", "summarize", "write_tables"]

DEFAULT_METRICS = ("AP", "AP50", "AP75")
SPEC_KEYS = (
    "name", "description", "base_config", "base_overrides", "axes", "seeds", "metrics", "baseline", "out_dir", "results",
)
RUN_RECORD = "ablate_run.json"
RUN_CONFIG = "ablate_config.yaml"
RUN_LOG = "train.log"
RUNS_TABLE = "_runs.csv"  # <results>_runs.csv: one row per run, the committed record of finished runs
# Every run's metrics.json must come from its final evaluation only (it marks the run finished).
FORCED_OVERRIDES = ("train.eval_interval=0",)
CONFIDENCE = 0.95
_NAME = re.compile(r"^[A-Za-z0-9_.=+-]+$")
# Markdown shows AP as percentage points, and a correlation (score_iou_spearman, ...) x 100 alike;
# a count of metrics.json (score_iou_n) as it is.
PCT = 100.0
COUNT_METRICS = ("score_iou_n",)


def _scale(metric: str) -> float:
    return 1.0 if metric in COUNT_METRICS else PCT


class SpecError(ValueError):
    """A SPEC file is malformed; the message names the file and the field."""


@dataclass(frozen=True)
class Cell:
    """One value of every axis: ``values`` maps axis -> value name, ``overrides`` is their union."""

    values: dict[str, str]
    overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        return "/".join(self.values.values())

    @property
    def folder(self) -> str:
        return "__".join(self.values.values())


@dataclass
class Spec:
    name: str
    axes: dict[str, dict[str, list[str]]]
    seeds: list[int]
    out_dir: str
    results: str
    baseline: dict[str, str] | str
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    base_config: str | None = None
    base_overrides: list[str] = field(default_factory=list)
    description: str = ""
    path: str = ""

    def cells(self) -> list[Cell]:
        names = list(self.axes)
        cells = []
        for combo in itertools.product(*(self.axes[a].items() for a in names)):
            values = {a: v for a, (v, _) in zip(names, combo)}
            overrides = tuple(o for _, ovs in combo for o in ovs)
            cells.append(Cell(values, overrides))
        return cells

    def cell(self, name: str) -> Cell:
        """The cell called ``name`` (axis values joined by ``/``); a ValueError names the valid ones."""
        cells = self.cells()
        for c in cells:
            if c.name == name:
                return c
        raise ValueError(f"{self.path or self.name}: no cell {name!r}; its cells: {', '.join(c.name for c in cells)}")

    def baseline_of(self, cell: Cell) -> str:
        """Name of the cell ``cell`` is compared with."""
        if isinstance(self.baseline, str):
            return self.baseline
        return "/".join(self.baseline.get(a, v) for a, v in cell.values.items())


@dataclass
class RunResult:
    cell: str
    seed: int
    run_dir: str
    status: str  # "ok", "failed" or "pending"
    metrics: dict[str, float] = field(default_factory=dict)
    wall_s: float = math.nan
    error: str = ""
    reused: bool = False
    cpu: str = ""  # the CPU model(s) that trained it (cpu_name), " + "-joined if a resume changed it


# ---------------------------------------------------------------------------------------------
# SPEC
# ---------------------------------------------------------------------------------------------


def _str_list(where: str, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SpecError(f"{where}: expected a list of 'key=value' strings, got {value!r}")
    return list(value)


def load_spec(path: str | Path) -> Spec:
    """Read and check a SPEC file; errors name the file and the field."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SpecError(f"SPEC file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise SpecError(f"{path}: the top level must be a mapping")
    return spec_from_dict(data, where=str(path))


def spec_from_dict(data: dict[str, Any], *, where: str = "SPEC") -> Spec:
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(SPEC_KEYS)}")
    for key in ("name", "axes", "seeds", "out_dir", "results", "baseline"):
        if key not in data:
            raise SpecError(f"{where}: missing required key {key!r}")
    axes_in = data["axes"]
    if not isinstance(axes_in, dict) or not axes_in:
        raise SpecError(f"{where}: axes must be a non-empty mapping of axis name -> {{value name: [overrides]}}")
    axes: dict[str, dict[str, list[str]]] = {}
    for axis, values in axes_in.items():
        if not isinstance(values, dict) or not values:
            raise SpecError(f"{where}: axes.{axis} must be a non-empty mapping of value name -> [overrides]")
        axes[str(axis)] = {}
        for value, overrides in values.items():
            if not _NAME.match(str(value)):
                raise SpecError(f"{where}: axes.{axis}: value name {value!r} may hold only letters, digits and _.=+-")
            axes[str(axis)][str(value)] = _str_list(f"{where}: axes.{axis}.{value}", overrides)
    seeds = data["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SpecError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"{where}: seeds must be distinct, got {seeds!r}")
    metrics = data.get("metrics", list(DEFAULT_METRICS))
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
        raise SpecError(f"{where}: metrics must be a non-empty list of metric names, got {metrics!r}")
    spec = Spec(
        name=str(data["name"]), axes=axes, seeds=list(seeds), out_dir=str(data["out_dir"]), results=str(data["results"]),
        baseline=data["baseline"], metrics=list(metrics), base_config=data.get("base_config"),
        base_overrides=_str_list(f"{where}: base_overrides", data.get("base_overrides")),
        description=str(data.get("description") or "").strip(), path=where,
    )  # fmt: skip
    names = {c.name for c in spec.cells()}
    if isinstance(spec.baseline, dict):
        for axis, value in spec.baseline.items():
            if axis not in axes or value not in axes[axis]:
                raise SpecError(f"{where}: baseline {axis}={value!r} is not a value of the axes {sorted(axes)}")
    elif not isinstance(spec.baseline, str) or spec.baseline not in names:
        raise SpecError(f"{where}: baseline {spec.baseline!r} is not a cell; cells are {', '.join(sorted(names))}")
    return spec


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


@dataclass
class PlannedRun:
    cell: Cell
    seed: int
    run_dir: Path
    overrides: list[str]


def plan_runs(spec: Spec) -> list[PlannedRun]:
    """Every (cell, seed) run, cell-major, with its folder and its full list of overrides."""
    runs = []
    for cell in spec.cells():
        for seed in spec.seeds:
            run_dir = Path(spec.out_dir) / cell.folder / f"seed{seed}"
            overrides = [
                *spec.base_overrides, *cell.overrides, f"train.seed={seed}", *FORCED_OVERRIDES, f"out_dir={run_dir}",
            ]
            runs.append(PlannedRun(cell, seed, run_dir, overrides))
    return runs


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@functools.cache  # the CPU does not change under a process
def cpu_name() -> str:
    """The CPU model, e.g. ``AMD EPYC (family 25, model 17)``: a run can only be expected to repeat
    bit for bit per thread count on one CPU model, whose kernels (AVX2, AVX-512) set the rounding."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())  # the first processor's
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']}, model {info['model']})"
    return name


def _finished(run: PlannedRun, metric_keys: list[str]) -> RunResult | None:
    metrics = _read_json(run.run_dir / "metrics.json")
    if not metrics:
        return None
    record = _read_json(run.run_dir / RUN_RECORD)
    return RunResult(
        run.cell.name, run.seed, str(run.run_dir), "ok", {k: float(metrics[k]) for k in metric_keys if k in metrics},
        wall_s=float(record.get("wall_s", math.nan)), reused=True, cpu=str(record.get("cpu", "")),
    )  # fmt: skip


def _table(spec: Spec, suffix: str) -> Path:
    """``<results><suffix>``: one of the tables ``write_tables`` writes."""
    prefix = Path(spec.results)
    return prefix.with_name(prefix.name + suffix)


def _recorded(spec: Spec, path: Path) -> dict[tuple[str, int, str], RunResult]:
    """Finished runs that the runs table at ``path`` records, by (cell, seed, run folder), with every metric."""
    if not path.is_file():
        return {}
    found = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                metrics = {m: float(row[m]) for m in spec.metrics}
                key = (row["cell"], int(row["seed"]), row["run_dir"])
                ok = row["status"] == "ok" and all(math.isfinite(v) for v in metrics.values())
            except (KeyError, TypeError, ValueError):  # another SPEC's columns or a pending row
                continue
            if ok:
                found[key] = RunResult(*key, "ok", metrics, wall_s=float(row.get("wall_s") or math.nan), reused=True,
                                       cpu=row.get("cpu", ""))  # fmt: skip
    return found


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "error" in ln.lower() or "exception" in ln.lower():
            return ln
    return lines[-1] if lines else "no output"


def _stale_config(spec: Spec, run: PlannedRun) -> str | None:
    """An error if the run folder holds a config other than the one the SPEC now resolves to."""
    stored = run.run_dir / RUN_CONFIG
    if not stored.is_file():
        return None
    try:
        cfg = load_config(spec.base_config, run.overrides)
    except ConfigError as e:
        return f"config: {e}"
    try:
        # Loaded, not compared as text: a config key added to hcral since the run (with its default)
        # does not make the run stale.
        previous = load_config(stored)
    except ConfigError as e:
        return f"{stored} no longer loads ({e}); delete {run.run_dir} or change out_dir in the SPEC"
    if config_to_dict(previous) != config_to_dict(cfg):
        return (
            f"{stored} holds a different config than the SPEC now gives; "
            f"delete {run.run_dir} or change out_dir in the SPEC"
        )
    return None


def _prepare(spec: Spec, run: PlannedRun) -> str | None:
    """Resolve and store the run's config; returns an error message instead of raising."""
    try:
        cfg = load_config(spec.base_config, run.overrides)
    except ConfigError as e:
        return f"config: {e}"
    stored = run.run_dir / RUN_CONFIG
    if stored.is_file():
        stale = _stale_config(spec, run)
        if stale is not None:
            return stale
    else:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, stored)
    return None


def _execute(spec: Spec, run: PlannedRun, *, threads: int, in_process: bool) -> RunResult:
    error = _prepare(spec, run)
    record = _read_json(run.run_dir / RUN_RECORD)
    unfinished = record.get("status") != "ok"  # an earlier try failed or was killed: its time and CPU count
    previous_wall = float(record.get("wall_s", 0.0)) if unfinished else 0.0
    cpus = str(record.get("cpu", "")).split(" + ") if unfinished and record.get("cpu") else []
    here = cpu_name()
    cpu = " + ".join(cpus if here in cpus else [*cpus, here])
    if error is None:  # kept if the process is killed, so that a resume elsewhere still names this CPU
        write_text_atomic(run.run_dir / RUN_RECORD, json.dumps(
            {"cell": run.cell.name, "seed": run.seed, "status": "running", "wall_s": previous_wall, "cpu": cpu}))  # fmt: skip
    started = time.perf_counter()
    if error is None:
        error = (_train_in_process if in_process else _train_subprocess)(run, threads, evaluate=False)
    if error is None and not (run.run_dir / "metrics.json").is_file() and (run.run_dir / "checkpoint.pt").is_file():
        # Training had already ended (a crash during the final evaluation): evaluate its checkpoint.
        error = (_train_in_process if in_process else _train_subprocess)(run, threads, evaluate=True)
    wall = previous_wall + time.perf_counter() - started
    result = _finished(run, spec.metrics) if error is None else None
    if result is None:
        result = RunResult(run.cell.name, run.seed, str(run.run_dir), "failed", error=error or "no metrics.json written")
    result.wall_s, result.reused, result.cpu = wall, False, cpu
    if run.run_dir.is_dir():
        write_text_atomic(
            run.run_dir / RUN_RECORD,
            json.dumps(
                {"cell": result.cell, "seed": run.seed, "status": result.status, "error": result.error, "wall_s": wall,
                 "cpu": cpu}  # fmt: skip
            ),
        )
    return result


def _train_in_process(run: PlannedRun, threads: int, *, evaluate: bool) -> str | None:
    import torch

    from hcral.runner import evaluate_checkpoint, train

    cfg = load_config(run.run_dir / RUN_CONFIG)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if evaluate:
            evaluate_checkpoint(cfg, run.run_dir / "checkpoint.pt", run.run_dir)
        else:
            train(cfg, resume=True, progress=False)
    except Exception as e:  # recorded with the run, never dropped
        (run.run_dir / RUN_LOG).write_text(traceback.format_exc())
        return f"{type(e).__name__}: {e}"
    finally:
        torch.set_num_threads(old_threads)
    return None


def _train_subprocess(run: PlannedRun, threads: int, *, evaluate: bool) -> str | None:
    config = str(run.run_dir / RUN_CONFIG)
    if evaluate:
        cmd = [sys.executable, "-m", "hcral", "eval", config, "--checkpoint", str(run.run_dir / "checkpoint.pt"),
               "--out", str(run.run_dir)]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "hcral", "train", config, "--resume", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(run.run_dir / RUN_LOG, "a") as log:
        log.write(f"$ {' '.join(cmd)}  (OMP_NUM_THREADS={threads})\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = (run.run_dir / RUN_LOG).read_text()[-4000:]
        return f"exit code {proc.returncode}: {_last_error_line(tail)}"
    return None


def run_grid(
    spec: Spec,
    *,
    workers: int = 1,
    dry_run: bool = False,
    in_process: bool = False,
    command: str = "",
    cores: int | None = None,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> list[RunResult]:
    """Run every unfinished run of ``spec`` and (unless ``dry_run``) write its tables.

    Args:
        workers: runs at a time, each a ``python -m hcral train`` subprocess with
            ``cores // workers`` torch threads (``in_process=True`` runs them one at a time in this
            process instead, which tests use to skip the interpreter start-up).
        dry_run: only report what would run (configs are still resolved, so bad overrides show).
        command: the command line recorded in the Markdown header.
        cores: CPU cores to share (default ``os.cpu_count()``).
        threads: torch threads per run (default ``cores // workers``). On a machine shared with
            other work, 1 is much faster than 2: OpenMP threads that wait for a busy core stall
            every operation (measured here: 0.11 s/iteration with 1 thread, 1-6 s with 2).

    Returns:
        One :class:`RunResult` per (cell, seed), in plan order; failed runs included.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    cores = cores or os.cpu_count() or 1
    threads = threads or max(1, cores // workers)
    plan = plan_runs(spec)
    results: dict[int, RunResult] = {}
    todo = []
    runs_table = _table(spec, RUNS_TABLE)
    recorded = _recorded(spec, runs_table)
    n_recorded = 0
    for i, run in enumerate(plan):
        done = _finished(run, spec.metrics)
        if done is None and not run.run_dir.exists():
            done = recorded.get((run.cell.name, run.seed, str(run.run_dir)))
            n_recorded += done is not None
        stale = _stale_config(spec, run) if done is not None else None
        if stale is not None:
            results[i] = RunResult(run.cell.name, run.seed, str(run.run_dir), "failed", error=stale)
        elif done is not None:
            results[i] = done
        else:
            todo.append(i)
    # Seed-major: an interrupted grid still has every cell paired with its baseline on the first seeds.
    todo.sort(key=lambda i: (spec.seeds.index(plan[i].seed), i))
    n_stale = sum(r.status == "failed" for r in results.values())
    from_csv = f" ({n_recorded} of them from {runs_table}: their folders are gone)" if n_recorded else ""
    log(f"{spec.name}: {len(plan)} runs, {len(results) - n_stale} finished already{from_csv}, {n_stale} failed "
        f"(stale config), {len(todo)} to run "
        f"({workers} at a time, {threads} threads each)")  # fmt: skip
    if dry_run:
        for i, run in enumerate(plan):
            state = "finished" if i in results else ("resume" if (run.run_dir / "checkpoint.pt").is_file() else "new")
            try:
                load_config(spec.base_config, run.overrides)
                check = ""
            except ConfigError as e:
                check = f"  CONFIG ERROR: {e}"
            log(f"  [{state:8}] {run.cell.name} seed={run.seed} -> {run.run_dir}{check}")
        return [results.get(i) or RunResult(r.cell.name, r.seed, str(r.run_dir), "pending") for i, r in enumerate(plan)]

    def current() -> list[RunResult]:
        return [results.get(i) or RunResult(r.cell.name, r.seed, str(r.run_dir), "pending") for i, r in enumerate(plan)]

    def one(i: int) -> None:
        run = plan[i]
        log(f"  start {run.cell.name} seed={run.seed} -> {run.run_dir}")
        res = _execute(spec, run, threads=threads, in_process=in_process)
        results[i] = res
        msg = " ".join(f"{k}={v:.3f}" for k, v in res.metrics.items()) if res.status == "ok" else res.error
        log(f"  {res.status:6} {run.cell.name} seed={run.seed} ({res.wall_s:.0f} s) {msg}")

    write_tables(spec, current(), command=command, threads=threads, workers=workers)
    if in_process or workers == 1:
        for i in todo:
            one(i)
            write_tables(spec, current(), command=command, threads=threads, workers=workers)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(one, todo):
                write_tables(spec, current(), command=command, threads=threads, workers=workers)
    final = current()
    write_tables(spec, final, command=command, threads=threads, workers=workers)
    return final


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


@dataclass
class CellSummary:
    cell: Cell
    baseline: str
    n: int
    n_failed: int
    n_pending: int
    mean: dict[str, float]
    std: dict[str, float]
    diff: dict[str, PairedDiff]
    wall_mean_s: float


def summarize(spec: Spec, results: list[RunResult]) -> list[CellSummary]:
    """Per cell: finished runs, mean and std of each metric, paired differences vs its baseline."""
    by_cell: dict[str, list[RunResult]] = {}
    for r in results:
        by_cell.setdefault(r.cell, []).append(r)
    values = {
        name: {m: {r.seed: r.metrics[m] for r in rs if r.status == "ok" and m in r.metrics} for m in spec.metrics}
        for name, rs in by_cell.items()
    }
    out = []
    for cell in spec.cells():
        rs = by_cell.get(cell.name, [])
        ok = [r for r in rs if r.status == "ok"]
        base = spec.baseline_of(cell)
        base_values = values.get(base, {m: {} for m in spec.metrics})
        out.append(CellSummary(
            cell=cell, baseline=base, n=len(ok),
            n_failed=sum(r.status == "failed" for r in rs), n_pending=sum(r.status == "pending" for r in rs),
            mean={m: mean(list(values[cell.name][m].values())) for m in spec.metrics},
            std={m: std(list(values[cell.name][m].values())) for m in spec.metrics},
            diff={m: paired_difference(values[cell.name][m], base_values[m], confidence=CONFIDENCE) for m in spec.metrics},
            wall_mean_s=mean([r.wall_s for r in rs if r.status == "ok" and not math.isnan(r.wall_s)]),
        ))  # fmt: skip
    return out


def _num(x: float, digits: int = 6) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def cells_csv(spec: Spec, summaries: list[CellSummary]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    header = ["cell", *spec.axes, "baseline", "n", "n_failed", "n_pending"]
    for m in spec.metrics:
        header += [f"{m}_mean", f"{m}_std", f"d{m}_mean", f"d{m}_ci_low", f"d{m}_ci_high", f"d{m}_n"]
    header.append("wall_s_mean")
    w.writerow(header)
    for s in summaries:
        row: list[Any] = [s.cell.name, *s.cell.values.values(), s.baseline, s.n, s.n_failed, s.n_pending]
        for m in spec.metrics:
            d = s.diff[m]
            row += [_num(s.mean[m]), _num(s.std[m]), _num(d.mean), _num(d.ci_low), _num(d.ci_high), d.n]
        row.append(_num(s.wall_mean_s, 1))
        w.writerow(row)
    return buf.getvalue()


def runs_csv(spec: Spec, results: list[RunResult]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cells = {c.name: c for c in spec.cells()}
    base_metrics = {(r.cell, r.seed): r.metrics for r in results if r.status == "ok"}
    w.writerow([
        "cell", *spec.axes, "seed", "status", *spec.metrics, *(f"d{m}" for m in spec.metrics), "wall_s", "cpu", "run_dir",
        "error",
    ])  # fmt: skip
    for r in results:
        base = base_metrics.get((spec.baseline_of(cells[r.cell]), r.seed), {})
        diffs = [_num(r.metrics[m] - base[m]) if m in r.metrics and m in base else "" for m in spec.metrics]
        w.writerow([
            r.cell, *cells[r.cell].values.values(), r.seed, r.status,
            *(_num(r.metrics.get(m, math.nan)) for m in spec.metrics),
            *diffs, _num(r.wall_s, 1), r.cpu, r.run_dir, r.error,
        ])  # fmt: skip
    return buf.getvalue()


def _pm(m: float, s: float, scale: float = PCT) -> str:
    if math.isnan(m):
        return "–"
    return f"{m * scale:.1f}" + (f" ± {s * scale:.1f}" if not math.isnan(s) else "")


def _code_version() -> str:
    """The git commit of the working tree, flagged when ``hcral/`` has uncommitted changes."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "hcral"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{commit}" + (" with uncommitted changes in hcral/" if dirty else "")


def markdown(
    spec: Spec,
    results: list[RunResult],
    summaries: list[CellSummary],
    *,
    command: str = "",
    threads: int = 1,
    workers: int = 1,
) -> str:
    """The Markdown report: header (command, SPEC, seeds, wall time), the per-cell table, every run."""
    ok = [r for r in results if r.status == "ok"]
    failed = [r for r in results if r.status == "failed"]
    pending = [r for r in results if r.status == "pending"]
    walls = [r.wall_s for r in ok if not math.isnan(r.wall_s)]
    lines = [f"# {spec.name}", ""]
    if spec.description:
        lines += [spec.description, ""]
    base = spec.baseline if isinstance(spec.baseline, str) else ", ".join(f"{a}={v}" for a, v in spec.baseline.items())
    lines += [
        f"- Command: `{command or f'hcral ablate {spec.path}'}`",
        f"- SPEC: `{spec.path}`; base config: `{spec.base_config or '(defaults)'}`; "
        f"base overrides: `{' '.join(spec.base_overrides) or '(none)'}`",
        f"- Seeds: {', '.join(map(str, spec.seeds))} (`train.seed`; data fixed); {len(spec.cells())} cells x "
        f"{len(spec.seeds)} seeds = {len(results)} runs: {len(ok)} finished, {len(failed)} failed, {len(pending)} pending",
        f"- Baseline for the paired differences: {base} (same seed); 95% CI: Student t over the per-seed differences",
        f"- Wall time: {sum(walls):.0f} s in all, {mean(walls):.0f} s per run on average "
        f"({workers} run(s) at a time, {threads} torch thread(s) each, {platform.machine()} CPU: "
        f"{'; '.join(sorted({r.cpu for r in results if r.cpu})) or 'model not recorded'}, "
        f"{os.cpu_count()} cores shared with other work)" if walls else "- Wall time: no run finished yet",
        f"- Written: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} at code version "
        f"{_code_version()}; run folders under `{spec.out_dir}`",
        "",
        "AP in percentage points (COCO AP x 100): mean ± standard deviation over the finished seeds; Δ = cell - "
        "baseline, paired by seed, mean [95% CI]; `*` marks a CI that excludes 0."
        + (" score_iou_* (score-IoU consistency of the matched detections, as `hcral analyze` measures it): "
           "correlations x 100 too, counts as they are." if any(m.startswith("score_iou_") for m in spec.metrics) else ""),
        "",
    ]  # fmt: skip
    head = ["cell", "n", *spec.metrics, *(f"Δ{m} vs baseline" for m in spec.metrics), "s/run"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        n = f"{s.n}" + (f" ({s.n_failed} failed)" if s.n_failed else "") + (f" ({s.n_pending} pending)" if s.n_pending else "")
        is_base = s.baseline == s.cell.name
        row = [
            f"`{s.cell.name}`", n, *(_pm(s.mean[m], s.std[m], _scale(m)) for m in spec.metrics),
            *(("(baseline)" if is_base else format_ci(s.diff[m], scale=_scale(m))) for m in spec.metrics),
            "–" if math.isnan(s.wall_mean_s) else f"{s.wall_mean_s:.0f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    run_head = ["cell", "seed", "status", *spec.metrics, f"Δ{spec.metrics[0]}", "wall s", "error"]
    lines += ["", "## Runs", "", "| " + " | ".join(run_head) + " |", "|" + "---|" * len(run_head)]
    cell_of = {c.name: c for c in spec.cells()}
    by_key = {(r.cell, r.seed): r for r in ok}
    for r in results:
        b = by_key.get((spec.baseline_of(cell_of[r.cell]), r.seed))
        m0 = spec.metrics[0]
        d = f"{(r.metrics[m0] - b.metrics[m0]) * _scale(m0):+.2f}" if b is not None and m0 in r.metrics and m0 in b.metrics else "–"
        vals = " | ".join(f"{r.metrics[m] * _scale(m):.1f}" if m in r.metrics else "–" for m in spec.metrics)
        wall = "–" if math.isnan(r.wall_s) else f"{r.wall_s:.0f}"
        err = r.error.replace("|", "\\|").replace("\n", " ")[:300]
        lines.append(f"| `{r.cell}` | {r.seed} | {r.status} | {vals} | {d} | {wall} | {err} |")
    lines.append("")
    return "\n".join(lines)


def write_tables(spec: Spec, results: list[RunResult], *, command: str = "", threads: int = 1, workers: int = 1) -> list[Path]:
    """Write ``<results>.csv`` (per cell), ``<results>_runs.csv`` (per run) and ``<results>.md``."""
    summaries = summarize(spec, results)
    paths = [_table(spec, suffix) for suffix in (".csv", RUNS_TABLE, ".md")]
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(paths[0], cells_csv(spec, summaries))
    write_text_atomic(paths[1], runs_csv(spec, results))
    write_text_atomic(paths[2], markdown(spec, results, summaries, command=command, threads=threads, workers=workers))
    return paths
