"""Command line: ``hcral train | eval | predict | check-data | demo | ablate | figures | analyze``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from hcral.config import ConfigError, load_config

# Exit codes: argparse's 2 for a wrong command line or config, 1 for a run that failed.
EXIT_USAGE, EXIT_FAILED = 2, 1
FROM_CHECKPOINT = (
    "; eval and predict take the model, class and resolution settings from the checkpoint, so the "
    "config and --set only supply evaluation settings (eval.*, train.device, data paths; see docs/reliability.md)"
)


def _add_config_args(p: argparse.ArgumentParser, *, config_help: str = "YAML config file (see configs/)",
                     optional: bool = False, out_help: str = "run folder (overrides out_dir)") -> None:
    p.add_argument("config", nargs="?" if optional else None, help=config_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=0.02 (repeatable)")
    p.add_argument("--out", help=out_help)


def _config(args: argparse.Namespace):
    overrides = list(args.overrides)
    if getattr(args, "out", None):
        overrides.append(f"out_dir={args.out}")
    return load_config(args.config, overrides)


def _check_data(cfg, *, full_decode: bool) -> int:
    """``hcral check-data``: every problem of both splits on stderr (exit 1), else a summary."""
    from hcral.data.check import box_count, check_splits
    from hcral.runner import build_splits

    train_set, val_set = build_splits(cfg)
    problems = check_splits(train_set, val_set, full_decode=full_decode)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"hcral check-data: {len(problems)} problems", file=sys.stderr)
        return 1
    for role, dataset in (("train", train_set), ("val", val_set)):
        print(f"{role}: {len(dataset)} images, {box_count(dataset)} boxes")
    print(f"classes: {train_set.class_names}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hcral", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a detector")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/checkpoint.pt if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the JSONL log is still written)")

    p = sub.add_parser("eval", help="COCO metrics of a checkpoint on the validation set")
    _add_config_args(p, optional=True, config_help="YAML config file (optional)" + FROM_CHECKPOINT,
                     out_help="folder for the results (default: eval, eval2, ... beside the checkpoint)")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by hcral train")

    p = sub.add_parser("predict", help="detect objects in images; writes predictions.json and PNGs")
    _add_config_args(p, config_help="YAML config file" + FROM_CHECKPOINT,
                     out_help="folder for predictions.json and the drawn PNGs (required)")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by hcral train")
    p.add_argument("--score-thr", type=float, default=None, metavar="S",
                   help="draw detections with a score of at least S into the PNGs (default 0.3); "
                        "predictions.json keeps all of them")
    p.add_argument("images", nargs="+", help="image files, or folders (every image file in them)")

    p = sub.add_parser("check-data", help="check every image and annotation of the training and validation sets")
    _add_config_args(p)
    p.add_argument("--full-decode", action="store_true",
                   help="decode every image (slower); by default only files that do not end as their format should")

    p = sub.add_parser("demo", help="train and evaluate FCOS+ATSS with HCRAL on built-in synthetic data")
    p.add_argument("--out", default="runs/demo",
                   help="folder for the runs: <out>/hcral (and <out>/baseline with --compare); default runs/demo")
    p.add_argument("--compare", action="store_true", help="also train the FL+GIoU+ATSS baseline, same seed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the demo's config, e.g. --set train.epochs=4 (repeatable)")

    p = sub.add_parser("ablate", help="run a grid of trainings from a SPEC file; writes CSV and Markdown tables")
    p.add_argument("spec", help="SPEC YAML file (see experiments/)")
    p.add_argument("--workers", type=int, default=1, help="runs at a time, sharing the CPU cores (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (default: cores // workers; use 1 on a busy machine)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state; train nothing")

    p = sub.add_parser("figures", help="draw the paper's figures and the analysis plots (PNG)")
    p.add_argument("--out", default="docs/img", help="folder for the PNGs (default docs/img)")
    p.add_argument("--baseline", default=None, help="run folder of a trained baseline (FL+GIoU+ATSS)")
    p.add_argument("--hcral", default=None, help="run folder of a trained HCRAL model (HCRA-C + HCRA-R + EATSS)")
    p.add_argument("--image-index", type=int, default=0, help="validation image drawn in the per-prior figure")
    p.add_argument("--only-curves", action="store_true", help="only the figures that need no trained model")
    p.add_argument("--ap-curves", nargs="+", metavar="RUN", default=None,
                   help="only the validation AP-versus-iteration plot of these run folders")
    p.add_argument("--grad-share", nargs="+", metavar="RUN", default=None,
                   help="only the classification-gradient share plot of these run folders (train.log_grad_share=true)")

    p = sub.add_parser("analyze", help="score-IoU consistency, AP at IoU 0.5/0.75/0.9 and TP/FP scores of trained runs")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (checkpoint.pt); writes RUN/analysis.json and PNGs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override an evaluation setting of every run, as for eval, e.g. --set eval.score_thr=0.01")
    p.add_argument("--compare", metavar="TABLE_MD", help="also write one Markdown table of all the runs")
    p.add_argument("--baseline", metavar="CELL",
                   help="with --compare, for an ablation's <cell>/seed<k> runs: also a per-cell table, "
                        "means over seeds and differences paired by seed against CELL")
    p.add_argument("--reuse", action="store_true",
                   help="take RUN/analysis.json as it is when it was written after the checkpoint with the same --set")
    p.add_argument("--pool-parts", action="store_true",
                   help="with --baseline, for a study split into parts (several SPECs, same cell names): "
                        "name each cell by its own folder, so the parts' runs pool by cell and seed")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from hcral.demo import run_demo

            run_demo(args.out, compare=args.compare, overrides=args.overrides)
            return 0
        if args.command == "ablate":
            from hcral.experiments.ablate import load_spec, run_grid

            command = f"hcral ablate {args.spec} --workers {args.workers}"
            command += (f" --threads {args.threads}" if args.threads else "") + (" --dry-run" if args.dry_run else "")
            results = run_grid(
                load_spec(args.spec), workers=args.workers, threads=args.threads, dry_run=args.dry_run, command=command
            )
            return 1 if any(r.status == "failed" for r in results) else 0
        if args.command == "figures":
            from hcral.experiments.figures import make_figures

            for path in make_figures(
                args.out, baseline_run=args.baseline, hcral_run=args.hcral, image_index=args.image_index,
                only_curves=args.only_curves, ap_curves=args.ap_curves, grad_share=args.grad_share,
            ):  # fmt: skip
                print(path)
            return 0
        if args.command == "analyze":
            from hcral.experiments.analyze import analyze_run, cell_table, cells_and_seeds, compare_table, summary_line
            from hcral.utils import write_text_atomic

            if args.baseline and not args.compare:
                raise ConfigError("analyze --baseline needs --compare TABLE_MD, the file its table goes into")
            if args.baseline:  # a bad layout or cell fails before any inference
                cells = sorted({cell for cell, _ in cells_and_seeds(args.runs, pool_parts=args.pool_parts)})
                if args.baseline not in cells:
                    raise ConfigError(f"analyze --baseline {args.baseline!r} is not among the runs' cells: {cells}")
            results = []
            for run in args.runs:
                results.append(analyze_run(run, args.overrides, reuse=args.reuse))
                print(summary_line(results[-1]))
            if args.compare:
                Path(args.compare).parent.mkdir(parents=True, exist_ok=True)
                table = compare_table(results) + (f"\n{cell_table(results, args.baseline, pool_parts=args.pool_parts)}" if args.baseline else "")
                write_text_atomic(args.compare, table)
                print(f"table written to {args.compare}", file=sys.stderr)
            return 0
        if args.command == "train":
            from hcral.runner import TrainingInterrupted, train

            try:
                metrics = train(_config(args), resume=args.resume, progress=not args.no_progress)
            except TrainingInterrupted as e:  # not an error: the stop a scheduler or the user asked for
                print(f"hcral train: {e}", file=sys.stderr)
                return e.exit_code
        elif args.command == "eval":
            from hcral.checkpoint import eval_dir
            from hcral.runner import evaluate_checkpoint

            cfg, ckpt = _checkpoint_config(args)
            out = eval_dir(args.checkpoint, cfg, args.out or _set_out_dir(args.overrides))
            metrics = evaluate_checkpoint(cfg, args.checkpoint, out, ckpt=ckpt)
            print(f"results written to {out}", file=sys.stderr)
        elif args.command == "check-data":
            return _check_data(_config(args), full_decode=args.full_decode)
        else:
            from hcral.runner import DRAW_SCORE_THR, predict

            if not args.out:
                raise ConfigError("predict needs --out DIR for predictions.json and the drawn PNGs")
            score_thr = DRAW_SCORE_THR if args.score_thr is None else args.score_thr
            cfg, ckpt = _checkpoint_config(args)
            results = predict(cfg, args.checkpoint, args.images, args.out, score_thr=score_thr, ckpt=ckpt)
            drawn = sum(d["score"] >= score_thr for d in results)
            print(f"{len(results)} detections written to {args.out}/predictions.json; "
                  f"{drawn} with score >= {score_thr:g} drawn into the PNGs (--score-thr)")
            return 0
        if metrics:
            print(json.dumps(metrics, indent=2))
        return 0
    except ConfigError as e:
        return _report(args.command, e, EXIT_USAGE)
    # The project's errors name the file, key or value at fault (DatasetError is a ValueError,
    # CheckpointError and RunFolderError RuntimeErrors, a non-finite loss a FloatingPointError).
    except (ValueError, RuntimeError, OSError, FloatingPointError) as e:
        return _report(args.command, e, EXIT_FAILED)


def _report(command: str, e: BaseException, code: int) -> int:
    """The error on stderr, no traceback, with its notes (e.g. where the last good checkpoint is).

    The catch is broad (any ValueError or RuntimeError), so HCRAL_TRACEBACK=1 re-raises, for a
    traceback when the error is a bug rather than bad input."""
    if os.environ.get("HCRAL_TRACEBACK"):
        raise e
    text = "; ".join([str(e), *getattr(e, "__notes__", [])])
    print(f"hcral {command}: error: {text}", file=sys.stderr)
    return code


def _set_out_dir(overrides: list[str]) -> str | None:
    values = [text for key, _, text in (o.partition("=") for o in overrides) if key.strip() == "out_dir"]
    return values[-1] if values else None


def _checkpoint_config(args: argparse.Namespace):
    """eval / predict: ``(config, checkpoint)``, the checkpoint's config with the evaluation
    settings of CONFIG and --set; the checkpoint is loaded once, here."""
    from hcral.checkpoint import inference_config, load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    cfg, notes = inference_config(ckpt, args.checkpoint, args.config, args.overrides)
    for note in notes:
        print(f"hcral {args.command}: note: {note}", file=sys.stderr)
    return cfg, ckpt


if __name__ == "__main__":
    sys.exit(main())
