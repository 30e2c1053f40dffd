"""The experiment runner (hcral ablate), its statistics and the figures."""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from hcral.experiments import ablate
from hcral.experiments.stats import mean, paired_difference, std, student_t_cdf, student_t_quantile

# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("df", "expected"),
    [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (29, 2.045), (10**7, 1.960)],
)
def test_t_quantile_matches_tables(df, expected):
    assert student_t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)


def test_t_cdf_closed_forms():
    # df = 1 is Cauchy: F(t) = 1/2 + atan(t)/π; df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t²)).
    for t in (-7.0, -1.0, 0.0, 0.3, 2.5, 40.0):
        assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert student_t_quantile(0.025, 4) == pytest.approx(-student_t_quantile(0.975, 4))
    assert student_t_quantile(0.995, 5) == pytest.approx(4.032, abs=5e-4)
    with pytest.raises(ValueError, match="p must be in"):
        student_t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="df must be"):
        student_t_cdf(0.0, 0)


def test_paired_difference_by_hand():
    base = {0: 0.30, 1: 0.32, 2: 0.31, 7: 0.5}
    treat = {0: 0.33, 1: 0.33, 2: 0.35, 5: 0.9}  # seeds 5 and 7 have no partner: left out
    d = paired_difference(treat, base)
    assert d.diffs == pytest.approx({0: 0.03, 1: 0.01, 2: 0.04})
    # mean 0.08/3; sample std of (0.03, 0.01, 0.04) = sqrt(((1/3)^2 + (5/3)^2 + (4/3)^2)/2)·0.01
    m = 0.08 / 3
    s = math.sqrt(((0.03 - m) ** 2 + (0.01 - m) ** 2 + (0.04 - m) ** 2) / 2)
    half = 4.303 * s / math.sqrt(3)
    assert d.n == 3 and d.mean == pytest.approx(m) and d.std == pytest.approx(s)
    assert d.ci_low == pytest.approx(m - half, abs=1e-5) and d.ci_high == pytest.approx(m + half, abs=1e-5)  # 4.303 rounded
    # Five pairs use t_{0.975, 4} = 2.776.
    d5 = paired_difference({i: float(i * i) for i in range(5)}, {i: 0.0 for i in range(5)})
    vals = [0.0, 1.0, 4.0, 9.0, 16.0]
    assert d5.half_width == pytest.approx(2.776 * std(vals) / math.sqrt(5), rel=2e-4)  # table value rounded
    assert mean(vals) == 6.0
    # One pair: a difference but no interval.
    d1 = paired_difference({0: 1.0}, {0: 0.5})
    assert d1.mean == 0.5 and math.isnan(d1.ci_low) and math.isnan(d1.std)
    assert paired_difference({}, {}).n == 0


# ---------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------

TINY = [
    "model.fpn_channels=16", "model.head_channels=16", "model.head_convs=1",
    "data.synthetic_train=4", "data.synthetic_val=2", "data.synthetic_size=64",
    "data.short_side=64", "data.max_side=64", "data.batch_size=2", "data.num_workers=0",
    "train.epochs=1", "train.max_iters=2", "train.warmup_iters=1", "train.log_interval=1", "train.lr=0.01",
    "eval.batch_size=2",
]  # fmt: skip


def _spec(tmp_path, axes, seeds=(0, 1), baseline=None, **extra):
    data = {
        "name": "tiny grid",
        "base_overrides": TINY,
        "axes": axes,
        "seeds": list(seeds),
        "baseline": baseline or {a: next(iter(v)) for a, v in axes.items()},
        "out_dir": str(tmp_path / "runs"),
        "results": str(tmp_path / "results" / "tiny"),
        **extra,
    }
    return ablate.spec_from_dict(data, where="test-spec")


GRID = {
    "det": {"fcos": ["model.detector=fcos_atss"], "atss": ["model.detector=atss"]},
    "cls": {"focal": ["loss.cls=focal"], "hcra_c": ["loss.cls=hcra_c"]},
}


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_grid_runs_resumes_and_writes_tables(tmp_path):
    spec = _spec(tmp_path, GRID, baseline={"cls": "focal"})
    logs: list[str] = []
    results = ablate.run_grid(spec, in_process=True, threads=1, command="hcral ablate tiny.yaml", log=logs.append)
    assert [(r.cell, r.seed) for r in results] == [
        (c, s) for c in ("fcos/focal", "fcos/hcra_c", "atss/focal", "atss/hcra_c") for s in (0, 1)
    ]
    assert all(r.status == "ok" and set(r.metrics) == {"AP", "AP50", "AP75"} for r in results), [r.error for r in results]
    for r in results:
        assert r.run_dir.endswith(f"{r.cell.replace('/', '__')}/seed{r.seed}")
        record = json.loads((tmp_path / r.run_dir / ablate.RUN_RECORD).read_text())
        assert record["status"] == "ok" and record["wall_s"] > 0 and record["cpu"] == ablate.cpu_name()
    # The seed and the cell's overrides reached the run's config.
    cfg = ablate.load_config(tmp_path / "runs" / "atss__hcra_c" / "seed1" / ablate.RUN_CONFIG)
    assert (cfg.model.detector, cfg.loss.cls, cfg.train.seed, cfg.train.eval_interval) == ("atss", "hcra_c", 1, 0)

    cells = _read_csv(tmp_path / "results" / "tiny.csv")
    assert list(cells[0]) == [
        "cell", "det", "cls", "baseline", "n", "n_failed", "n_pending",
        *(f"{p}{m}{q}" for m in ("AP", "AP50", "AP75") for p, q in
          [("", "_mean"), ("", "_std"), ("d", "_mean"), ("d", "_ci_low"), ("d", "_ci_high"), ("d", "_n")]),
        "wall_s_mean",
    ]  # fmt: skip
    assert [c["cell"] for c in cells] == ["fcos/focal", "fcos/hcra_c", "atss/focal", "atss/hcra_c"]
    # Partial baseline: each loss is compared with focal loss on its own detector.
    assert [c["baseline"] for c in cells] == ["fcos/focal", "fcos/focal", "atss/focal", "atss/focal"]
    by = {(r.cell, r.seed): r.metrics["AP"] for r in results}
    expected = paired_difference({s: by[("atss/hcra_c", s)] for s in (0, 1)}, {s: by[("atss/focal", s)] for s in (0, 1)})
    row = cells[3]
    assert int(row["n"]) == 2 and int(row["dAP_n"]) == 2
    assert float(row["AP_mean"]) == pytest.approx(mean([by[("atss/hcra_c", 0)], by[("atss/hcra_c", 1)]]), abs=1e-6)
    assert float(row["dAP_mean"]) == pytest.approx(expected.mean, abs=1e-6)
    assert float(row["dAP_ci_high"]) == pytest.approx(expected.ci_high, abs=1e-6)
    runs = _read_csv(tmp_path / "results" / "tiny_runs.csv")
    assert len(runs) == 8 and {r["status"] for r in runs} == {"ok"} and {r["cpu"] for r in runs} == {ablate.cpu_name()}
    md = (tmp_path / "results" / "tiny.md").read_text()
    assert "Command: `hcral ablate tiny.yaml`" in md and "Seeds: 0, 1" in md and f"CPU: {ablate.cpu_name()}, " in md
    assert "| cell | n | AP | AP50 | AP75 | ΔAP vs baseline | ΔAP50 vs baseline | ΔAP75 vs baseline | s/run |" in md

    # Re-running trains nothing: every run is found finished and reused, with the same numbers.
    again = ablate.run_grid(spec, in_process=True, threads=1, log=logs.append)
    assert all(r.reused for r in again)
    assert [r.metrics for r in again] == [r.metrics for r in results]
    assert "8 finished already, 0 failed (stale config), 0 to run" in logs[-1]

    # Run folders are scratch: with them gone, the committed runs CSV is the record. Nothing is
    # trained again and the tables are written back unchanged, not overwritten as pending.
    tables = {p.name: p.read_text() for p in (tmp_path / "results").iterdir()}
    shutil.rmtree(tmp_path / "runs")
    recovered = ablate.run_grid(spec, in_process=True, threads=1, log=logs.append)
    assert not (tmp_path / "runs").exists()
    assert "8 finished already (8 of them from " in logs[-1] and "0 to run" in logs[-1]
    assert all(r.reused and r.status == "ok" for r in recovered)
    assert [r.metrics for r in recovered] == [{k: round(v, 6) for k, v in r.metrics.items()} for r in results]
    assert (tmp_path / "results" / "tiny_runs.csv").read_text() == tables["tiny_runs.csv"]
    # The cell table is recomputed from the CSV's rounding (metrics to 1e-6, wall_s to 0.1 s): a
    # wall_s_mean, itself printed to 0.1 s, may move one step (0.3 against 0.4 differ by 0.1 + 3e-17).
    for new_row, old_row in zip(_read_csv(tmp_path / "results" / "tiny.csv"), cells, strict=True):
        for k, v in old_row.items():
            tol = 0.1 + 1e-9 if k == "wall_s_mean" else 1e-5
            assert new_row[k] == v or float(new_row[k]) == pytest.approx(float(v), abs=tol), k
    # A row without every metric of the SPEC (or not "ok") is no record: that run is planned again.
    rows = (tmp_path / "results" / "tiny_runs.csv").read_text().splitlines()
    rows[1] = rows[1].replace(",ok,", ",pending,", 1)
    (tmp_path / "results" / "tiny_runs.csv").write_text("\n".join(rows) + "\n")
    planned = ablate.run_grid(spec, dry_run=True, log=logs.append)
    assert [r.status for r in planned] == ["pending"] + ["ok"] * 7
    assert "7 finished already (7 of them from " in logs[-9] and "1 to run" in logs[-9]


def test_score_iou_metrics_reach_the_tables_scaled_like_ap_and_counts_as_they_are(tmp_path):
    # Every evaluation writes score_iou_* into metrics.json; a SPEC that names them gets them in
    # its CSVs straight from there, so they outlive the run folder.
    metrics = ["AP", "score_iou_spearman", "score_iou_n"]
    spec = _spec(tmp_path, {"v": {"a": [], "b": ["loss.cls=hcra_c"]}}, seeds=(0,), metrics=metrics)
    results = ablate.run_grid(spec, in_process=True, threads=1, log=lambda s: None)
    for r, row in zip(results, _read_csv(tmp_path / "results" / "tiny_runs.csv"), strict=True):
        recorded = json.loads((tmp_path / r.run_dir / "metrics.json").read_text())
        assert float(row["score_iou_n"]) == recorded["score_iou_n"]
        assert row["score_iou_spearman"] == (f"{recorded['score_iou_spearman']:.6f}" if "score_iou_spearman" in recorded else "")
    # The Markdown: a correlation x 100 like AP, a count unscaled; paired by seed.
    made = [
        ablate.RunResult("a", s, "x", "ok", {"AP": 0.2, "score_iou_spearman": rho, "score_iou_n": n}, wall_s=1.0)
        for s, rho, n in ((0, 0.415, 37.0), (1, 0.400, 40.0))
    ] + [ablate.RunResult("b", s, "y", "ok", {"AP": 0.1, "score_iou_spearman": 0.3, "score_iou_n": 30.0}, wall_s=1.0) for s in (0, 1)]
    spec = _spec(tmp_path, {"v": {"a": [], "b": []}}, metrics=metrics)
    md = ablate.markdown(spec, made, ablate.summarize(spec, made))
    assert "score_iou_* (score-IoU consistency" in md
    assert "| `a` | 2 | 20.0 ± 0.0 | 40.8 ± 1.1 | 38.5 ± 2.1 | (baseline) |" in md
    assert "| `b` | 2 | 10.0 ± 0.0 | 30.0 ± 0.0 | 30.0 ± 0.0 | -10.00 " in md
    assert "| `a` | 1 | ok | 20.0 | 40.0 | 40.0 |" in md
    plain = _spec(tmp_path, {"v": {"a": [], "b": []}})
    assert "score-IoU consistency" not in ablate.markdown(plain, made, ablate.summarize(plain, made))


def test_interrupted_run_is_resumed_and_failures_are_kept(tmp_path):
    axes = {"variant": {
        "ok": ["model.detector=fcos_atss"],
        "bad_data": ["data.dataset=voc", f"data.root={tmp_path / 'no_data'}"],  # fails in training
        "bad_value": ["loss.cls=nope"],  # rejected by the config
    }}  # fmt: skip
    spec = _spec(tmp_path, axes, seeds=(0,), baseline="ok")
    plan = ablate.plan_runs(spec)
    # A crashed run: its folder has a config and a checkpoint but no metrics.json.
    first = ablate.run_grid(spec, in_process=True, threads=1, log=lambda s: None)
    ok_dir = tmp_path / first[0].run_dir
    (ok_dir / "metrics.json").unlink()
    # ... killed on another CPU: the record written before training names it, and the resume keeps it.
    record = ok_dir / ablate.RUN_RECORD
    record.write_text(json.dumps({**json.loads(record.read_text()), "status": "running", "cpu": "Other CPU"}))
    ckpt = ablate.load_config(ok_dir / ablate.RUN_CONFIG)
    assert (ok_dir / "checkpoint.pt").is_file() and ckpt.train.max_iters == 2
    results = ablate.run_grid(spec, in_process=True, threads=1, log=lambda s: None)
    assert [r.status for r in results] == ["ok", "failed", "failed"]
    assert not results[0].reused  # re-run (resumed from its checkpoint at the last iteration)
    assert results[0].cpu == f"Other CPU + {ablate.cpu_name()}"
    assert json.loads(record.read_text())["cpu"] == results[0].cpu
    assert "DatasetError" in results[1].error and "no_data" in results[1].error
    assert results[2].error.startswith("config:") and "nope" in results[2].error
    assert [r.run_dir for r in results] == [str(p.run_dir) for p in plan]
    runs = _read_csv(tmp_path / "results" / "tiny_runs.csv")
    assert [r["status"] for r in runs] == ["ok", "failed", "failed"] and "no_data" in runs[1]["error"]
    cells = _read_csv(tmp_path / "results" / "tiny.csv")
    assert [(c["n"], c["n_failed"]) for c in cells] == [("1", "0"), ("0", "1"), ("0", "1")]
    md = (tmp_path / "results" / "tiny.md").read_text()
    assert "1 finished, 2 failed" in md and "| `bad_value` | 0 | failed |" in md

    # A changed SPEC does not silently reuse a finished run made with another config.
    changed = _spec(tmp_path, {"variant": {"ok": ["model.detector=fcos_atss", "train.lr=0.02"]}}, seeds=(0,), baseline="ok")
    stale = ablate.run_grid(changed, in_process=True, threads=1, log=lambda s: None)
    assert stale[0].status == "failed" and "different config" in stale[0].error


def test_subprocess_workers_and_cli(tmp_path, monkeypatch):
    import yaml

    from hcral.cli import main

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "cli grid", "base_overrides": TINY, "seeds": [3],
        "axes": {"v": {
            "ok": ["model.detector=fcos_atss"],
            # A valid config whose run fails: the data folder does not exist.
            "bad": ["model.detector=fcos_atss", "data.dataset=voc", f"data.root={tmp_path / 'no_data'}"],
        }},
        "baseline": "ok", "out_dir": str(tmp_path / "runs"), "results": str(tmp_path / "res" / "cli"),
    }, sort_keys=False))  # fmt: skip
    assert main(["ablate", str(spec_path), "--dry-run"]) == 0
    assert not (tmp_path / "res").exists()  # a dry run writes no tables
    # Two subprocesses at once; the failing one makes the exit status 1 and is in the tables.
    assert main(["ablate", str(spec_path), "--workers", "2", "--threads", "1"]) == 1
    runs = _read_csv(tmp_path / "res" / "cli_runs.csv")
    assert [(r["cell"], r["status"]) for r in runs] == [("ok", "ok"), ("bad", "failed")]
    assert runs[1]["error"].startswith("exit code 1") and "no_data" in runs[1]["error"]
    assert "hcral train" in (tmp_path / "runs" / "bad" / "seed3" / ablate.RUN_LOG).read_text()
    md = (tmp_path / "res" / "cli.md").read_text()
    assert f"Command: `hcral ablate {spec_path} --workers 2 --threads 1`" in md


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"axes": {}}, "axes must be a non-empty"),
        ({"seeds": [0, 0]}, "distinct"),
        ({"baseline": "nope"}, "baseline 'nope' is not a cell"),
        ({"baseline": {"v": "zz"}}, "baseline v='zz'"),
        ({"extra_key": 1}, "unknown key"),
        ({"axes": {"v": {"a b": []}}}, "value name"),
    ],
)
def test_bad_spec_is_named(tmp_path, data, match):
    base = {"name": "x", "axes": {"v": {"a": []}}, "seeds": [0], "baseline": "a", "out_dir": "o", "results": "r"}
    with pytest.raises(ablate.SpecError, match=match):
        ablate.spec_from_dict({**base, **data}, where="spec.yaml")
    with pytest.raises(ablate.SpecError, match="not found"):
        ablate.load_spec(tmp_path / "missing.yaml")


def test_committed_specs_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    specs = sorted((root / "experiments").glob("*.yaml"))
    assert specs, "experiments/*.yaml missing"
    for path in specs:
        spec = ablate.load_spec(path)
        if path.name.startswith("diagnosis_"):  # explains, decides nothing (one seed may do)
            assert "a diagnosis, not a verdict" in spec.description, path
        elif ", part " in spec.name and "part 1" not in spec.name:  # adds seeds to part 1's, never alone
            assert "pooled by seed with part 1" in spec.description, path
        else:
            assert len(spec.seeds) >= 3, path
        for run in ablate.plan_runs(spec)[:: len(spec.seeds)]:
            ablate.load_config(root / spec.base_config if spec.base_config else None, run.overrides)


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_formula_figures(tmp_path):
    pytest.importorskip("matplotlib")
    from hcral.experiments import figures

    paths = figures.make_figures(tmp_path, only_curves=True)
    assert {p.name for p in paths} == {"fig3b_omega.png", "fig3c_t.png"}
    assert all(_is_png(p) for p in paths)
    # The curves are the loss functions' own weights.
    u, omega = figures.omega_curve(mu=0.5, positive=False)
    assert omega[0] == pytest.approx(1.0) and min(omega) < 1.0
    q, t = figures.t_curve(gamma=1.0)
    assert t == pytest.approx([1 - v for v in q], abs=1e-5)


def test_model_figures_from_runs(tmp_path):
    pytest.importorskip("matplotlib")
    from hcral.experiments import figures
    from hcral.runner import train

    runs = {}
    for name, extra in {"base": [], "hcral": ["loss.cls=hcra_c", "loss.reg=hcra_r", "loss.assigner=eatss"]}.items():
        cfg = ablate.load_config(None, [*TINY, "model.detector=fcos_atss", "train.max_iters=3", *extra, f"out_dir={tmp_path / name}"])
        train(cfg, progress=False)
        runs[name] = tmp_path / name
    paths = figures.make_figures(tmp_path / "img", baseline_run=runs["base"], hcral_run=runs["hcral"])
    names = {p.name for p in paths}
    assert {"fig3a_score_iou.png", "fig_priors_weights.png", "fig_loss_curves.png"} <= names
    assert all(_is_png(p) for p in paths)
    data = figures.prior_data(runs["hcral"], image_index=0)
    n = data["centers"].shape[0]
    assert data["w"].shape == (n,) and data["omega"].shape == (n,)
    assert data["rho"].shape == data["t"].shape == (int(data["pos"].sum()),)
    assert bool((data["expanded"] <= data["pos"]).all())
    (curve,) = figures.make_figures(tmp_path / "img", ap_curves=list(runs.values()))  # the final evaluations
    assert _is_png(curve)
    assert not any("grad_pos" in r for r in figures.read_log(runs["base"]))  # train.log_grad_share is off


def test_ap_curve_figure_reads_the_evaluations_of_a_log(tmp_path):
    pytest.importorskip("matplotlib")
    from hcral.experiments import figures

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"iter": 4, "loss": 1.0}, {"iter": 4, "val_AP": 0.1, "val_AP50": 0.3}, {"iter": 8, "val_AP": 0.2, "val_AP50": 0.4}]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path,) = figures.make_figures(tmp_path / "img", ap_curves=[run])
    assert path.name == "ap_vs_iteration.png" and _is_png(path)
    (run / "log.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match="eval_interval"):
        figures.make_figures(tmp_path / "img", ap_curves=[run])


def test_grad_share_is_logged_per_interval_and_plotted(tmp_path):
    pytest.importorskip("matplotlib")
    from hcral.cli import main
    from hcral.experiments import figures
    from hcral.runner import train

    run = tmp_path / "run"
    extra = ["loss.cls=hcra_c", "loss.hcra_cls_base=focal", "loss.hcra_cls_normalize=true"]
    steps = ["data.synthetic_train=6", "train.max_iters=3", "train.log_interval=2", "train.log_grad_share=true"]
    train(ablate.load_config(None, [*TINY, *steps, *extra, f"out_dir={run}"]), progress=False)
    rows = [r for r in figures.read_log(run) if "loss" in r]
    assert [(r["iter"], r["grad_iters"]) for r in rows] == [(2, 2), (3, 1)]  # sums over each interval
    for r in rows:
        assert r["grad_pos"] > 0 and r["grad_neg"] > 0
        for side in ("pos", "neg"):
            assert r[f"grad_{side}"] == pytest.approx(r[f"grad_{side}_r1"] + r[f"grad_{side}_r2"])
            assert r[f"grad_n_{side}"] == r[f"grad_n_{side}_r1"] + r[f"grad_n_{side}_r2"]
    # Same input size every step: the same number of elements per iteration.
    per_iter = [(r["grad_n_pos"] + r["grad_n_neg"]) / r["grad_iters"] for r in rows]
    assert per_iter[0] == per_iter[1] > 0
    curves = figures.grad_share_curves(run)
    assert curves["iter"] == [2, 3]
    assert curves["neg_share"][0] == pytest.approx(rows[0]["grad_neg"] / (rows[0]["grad_pos"] + rows[0]["grad_neg"]))
    assert main(["figures", "--grad-share", str(run), "--out", str(tmp_path / "img")]) == 0
    assert _is_png(tmp_path / "img" / "grad_share.png")
    # A run trained without the switch is named, with the setting to use.
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "log.jsonl").write_text(json.dumps({"iter": 1, "loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="train.log_grad_share=true"):
        figures.make_figures(tmp_path / "img", grad_share=[tmp_path / "plain"])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_run_labels_tell_ablation_runs_apart():
    from hcral.experiments.figures import run_labels

    assert list(run_labels(["runs/a", "runs/b"])) == ["a", "b"]
    assert list(run_labels(["x/focal/seed0", "x/ghmc/seed0", "x/ghmc/seed1"])) == ["focal/seed0", "ghmc/seed0", "ghmc/seed1"]
    with pytest.raises(ValueError, match="given twice"):
        run_labels(["x/a", "x/a"])


def test_cpu_dispatch_compare_by_hand(experiment_script):
    compare = experiment_script("cpu_dispatch.py").compare
    ref = [{"iter": 1, "loss": 2.0, "grad_norm": 1.0}, {"iter": 2, "loss": 1.5, "grad_norm": 4.0}]
    assert compare(ref, [dict(r) for r in ref]) == (None, 0.0)
    moved = [dict(ref[0]), {"iter": 2, "loss": 1.5, "grad_norm": 4.004}]
    first, worst = compare(ref, moved)
    assert first == 2 and worst == pytest.approx(1e-3)
    with pytest.raises(ValueError):  # a run that logged fewer iterations is not compared silently
        compare(ref, ref[:1])


def test_a_run_repeats_bit_for_bit_in_a_fresh_process(tmp_path, experiment_script):
    # What the consistency reruns rely on (docs/results.md, section 12): the same config, seed and
    # thread count on this CPU give the same losses in two processes.
    script = experiment_script("cpu_dispatch.py")
    config = tmp_path / "tiny.yaml"
    config.write_text("{}\n")
    sets = [s for s in TINY if not s.startswith(("train.max_iters", "train.log_interval"))]
    a, b = (script.train_log(str(config), sets, 2, 1, {}, tmp_path / f"run{i}") for i in range(2))
    assert [r["iter"] for r in a] == [1, 2]
    assert script.compare(a, b) == (None, 0.0)


def _diff(per_seed_ap_points: list[float]):
    """A PairedDiff whose per-seed differences are these AP points (AP in [0, 1], as the CSVs)."""
    return paired_difference({s: d / 100 for s, d in enumerate(per_seed_ap_points)}, {s: 0.0 for s in range(len(per_seed_ap_points))})


def test_calibration_criterion_condition_by_condition(experiment_script):
    verdict = experiment_script("calibrate_figure.py").verdict
    level, behind, atss_wins, atss_ties = _diff([-0.5, 0.5, -0.3]), _diff([-0.8, -0.9, -1.0]), _diff([3.0, 4.0, 3.5]), _diff([-1.0, 1.0, 0.5])
    assert verdict(0.17, 0.12, {}) == "not run"
    assert verdict(0.17, 0.12, {"GHM-C − focal": _diff([-0.5, 0.4])}) == "not judged: 2 of 3 seeds"  # the design has 3
    assert verdict(0.10, 0.12, {"GHM-C − focal": level}) == "no: (0) focal below base"
    assert verdict(0.17, 0.12, {"GHM-C − focal": behind}) == "no: (1)"  # inside 1 AP, CI excludes 0
    assert verdict(0.17, 0.12, {"GHM-C − focal": _diff([-3.0, 2.0, -2.5])}) == "no: (1)"  # CI has 0, mean beyond 1 AP
    assert verdict(0.17, 0.12, {"GHM-C − focal": level}) == "(1) yes; (2) not run"
    partial = {"GHM-C − focal": level, "ATSS − RetinaNet": _diff([3.0, 4.0])}
    assert verdict(0.17, 0.12, partial) == "(1) yes; (2) not judged: 2 of 3 seeds"
    assert verdict(0.17, 0.12, {"GHM-C − focal": level, "ATSS − RetinaNet": atss_ties}) == "no: (2)"
    assert verdict(0.17, 0.12, {"GHM-C − focal": level, "ATSS − RetinaNet": atss_wins}) == "yes"
    # The second stage (Point.stage2): only a positive 3-seed mean whose CI reaches 0 goes on, to 5 seeds.
    ties = {"GHM-C − focal": level, "ATSS − RetinaNet": atss_ties}  # mean +0.17, CI reaches 0
    five_win, five_tie = _diff([3.0, 4.0, 3.5, 2.0, 2.5]), _diff([-1.0, 1.0, 0.5, -0.5, 0.3])
    assert verdict(0.17, 0.12, ties, _diff([3.0, 4.0, 3.5])) == "(1) yes; (2) not judged: stage 2, 3 of 5 seeds"
    assert verdict(0.17, 0.12, ties, five_win) == "yes, at stage 2"
    assert verdict(0.17, 0.12, ties, five_tie) == "no: (2), at stage 2"
    behind_atss = {"GHM-C − focal": level, "ATSS − RetinaNet": _diff([-1.0, 0.5, -0.5])}  # mean below 0: no second look
    assert verdict(0.17, 0.12, behind_atss, five_win) == "no: (2)"
    assert verdict(0.17, 0.12, {"GHM-C − focal": level, "ATSS − RetinaNet": atss_wins}, five_tie) == "yes"  # passed at 3


def test_calibration_trend_fit_and_second_draws(experiment_script):
    script = experiment_script("calibrate_figure.py")
    a, b = script.log_linear_fit([(0.01, -5.0), (0.1, -2.0), (1.0, 1.0)])  # on the line 1 + 3 log10 x
    assert (a, b) == (pytest.approx(1.0), pytest.approx(3.0))
    original = {0: 0.17, 1: 0.16}
    assert script._second_draws({0: 0.17, 1: 0.16 + 2e-6, 2: 0.15}, original) == {1, 2}  # seed 2: no original


def test_calibration_points_name_cells_of_their_specs(experiment_script):
    # Each regime's compute is counted from its SPEC cell, and its runs are looked up by cell name:
    # a renamed cell would silently read as "not run".
    script = experiment_script("calibrate_figure.py")
    root = Path(__file__).resolve().parents[1]

    def cells_of(csv_name: str) -> set[str]:  # a runs CSV is named after its SPEC: <stem>_runs.csv
        return {c.name for c in ablate.load_spec(root / "experiments" / csv_name.replace("_runs.csv", ".yaml")).cells()}

    for point in script.POINTS:
        names = {c.name for c in ablate.load_spec(root / point.spec).cells()}
        assert point.spec_cell in names, (point.regime, sorted(names))
        for treated, base in [*point.pairs.values(), *([point.stage2] if point.stage2 else [])]:
            for csv_name, cell in (treated, base):
                assert cell in cells_of(csv_name), (point.regime, csv_name, cell)
    for regime, verdict in script.VERDICTS.items():
        assert (root / verdict.spec).is_file(), (regime, verdict.spec)
        for treated, base in verdict.comparisons().values():
            for csv_name, cell in (*treated, *base):
                assert cell in cells_of(csv_name), (regime, csv_name, cell)
    spec = ablate.load_spec(Path(__file__).resolve().parents[1] / "experiments/calibrate_schedule9x_batch16_fcos_atss_aquarium.yaml")
    with pytest.raises(ValueError, match="no cell '9x_batch16/ghm'.*its cells: 9x_batch16/focal, 9x_batch16/ghmc"):
        spec.cell("9x_batch16/ghm")  # a typo names the valid cells
