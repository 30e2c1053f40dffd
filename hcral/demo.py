"""``hcral demo``: train FCOS+ATSS with HCRA-C + HCRA-R + EATSS on built-in synthetic shapes.

Needs no files. Sized for a 2-core CPU: a small backbone, 160-px images, a few minutes of training.
``--compare`` trains the FL + GIoU + ATSS baseline with the same seed and prints both.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from hcral.checkpoint import RUN_FILES
from hcral.config import Config, ConfigError, DataConfig, EvalConfig, LossConfig, ModelConfig, TrainConfig, apply_overrides
from hcral.runner import build_dataset, train
from hcral.visualize import draw_dataset_detections

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def demo_config(out_dir: str | Path = "runs/demo", *, seed: int = 0) -> Config:
    """The demo's config: FCOS+ATSS, small backbone, HCRA-C + HCRA-R + EATSS, synthetic data."""
    return Config(
        model=ModelConfig(detector="fcos_atss", backbone="small", fpn_channels=64, head_channels=64, head_convs=2),
        loss=LossConfig(cls="hcra_c", reg="hcra_r", assigner="eatss"),
        data=DataConfig(
            dataset="synthetic", synthetic_train=640, synthetic_val=64, synthetic_size=160,
            short_side=160, max_side=160, batch_size=8, num_workers=1,
        ),
        train=TrainConfig(
            epochs=16, lr=0.02, warmup_iters=100, lr_steps=[12, 15], seed=seed,
            log_interval=10, eval_interval=0, checkpoint_interval=1,
        ),
        eval=EvalConfig(batch_size=8),
        out_dir=str(out_dir),
    )


def baseline_of(cfg: Config) -> Config:
    """The same run with FL + GIoU + ATSS."""
    return replace(cfg, loss=replace(cfg.loss, cls="focal", reg="giou", assigner="atss"))


def format_table(rows: dict[str, dict[str, float]]) -> str:
    header = f"{'run':<24}" + "".join(f"{k:>8}" for k in METRIC_KEYS) + f"{'time':>9}"
    lines = [header, "-" * len(header)]
    for name, m in rows.items():
        lines.append(f"{name:<24}" + "".join(f"{m.get(k, float('nan')):8.3f}" for k in METRIC_KEYS) + f"{m['seconds']:8.0f}s")
    return "\n".join(lines)


def run_demo(out_dir: str | Path = "runs/demo", *, compare: bool = False, overrides: list[str] | None = None) -> dict:
    out = Path(out_dir)
    runs = {"HCRAL (FCOS+ATSS)": apply_overrides(demo_config(out / "hcral"), overrides or [])}
    if compare:
        runs["FL+GIoU+ATSS baseline"] = baseline_of(replace(runs["HCRAL (FCOS+ATSS)"], out_dir=str(out / "baseline")))
    taken = [cfg.out_dir for cfg in runs.values() if any((Path(cfg.out_dir) / f).exists() for f in RUN_FILES)]
    if taken:
        raise ConfigError(f"--out {out}: {', '.join(taken)} already holds a demo run; pass another --out (nothing was changed)")
    rows = {}
    for name, cfg in runs.items():
        print(f"== training {name} -> {cfg.out_dir}", flush=True)
        start = time.perf_counter()
        metrics = train(cfg)
        rows[name] = {**metrics, "seconds": time.perf_counter() - start}
        run = Path(cfg.out_dir)
        detections = json.loads((run / "detections.json").read_text())
        picture = draw_dataset_detections(build_dataset(cfg, train=False), detections, run / "detections.png")
        print(f"   detections drawn in {picture}", flush=True)
    print()
    print(format_table(rows))
    return rows
