"""Nothing silently wrong, nothing silently lost: one case per probe of docs/reliability.md.

Every case goes through the real command line (``hcral.cli.main``, or a subprocess where the exit
status and the absence of a traceback are the point) and checks that the error names the file or
the key at fault, or that the result is the correct one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from hcral.checkpoint import CHECKPOINT, CheckpointError
from hcral.cli import main
from hcral.config import Config, ConfigError, Range, apply_overrides, load_config, numeric_fields

RACCOON = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "raccoon"
# Checkpoint-size dumps are what item 6 replaces; a message is one short line.
MAX_MESSAGE = 1024

TINY = {
    "model": {"detector": "fcos_atss", "backbone": "small", "fpn_channels": 32, "head_channels": 32, "head_convs": 1},
    "loss": {"cls": "hcra_c", "reg": "hcra_r", "assigner": "eatss"},
    "data": {
        "synthetic_train": 8, "synthetic_val": 4, "synthetic_size": 96, "short_side": 96, "max_side": 96,
        "batch_size": 2, "num_workers": 0, "flip_prob": 0.0,
    },
    "train": {"epochs": 1, "max_iters": 2, "warmup_iters": 2, "log_interval": 1, "checkpoint_iters": 1},
    "eval": {"batch_size": 4, "score_thr": 0.0},
}  # fmt: skip


def write_config(path: Path, **sections: dict) -> Path:
    """TINY, with some sections' keys replaced, as a YAML file."""
    cfg = json.loads(json.dumps(TINY))
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    assert len(lines[0]) < MAX_MESSAGE, lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run (FCOS+ATSS, HCRA-C + HCRA-R + EATSS, 2 iterations): its folder and config."""
    root = tmp_path_factory.mktemp("trained")
    config = write_config(root / "tiny.yaml")
    assert main(["train", str(config), "--out", str(root / "run"), "--no-progress"]) == 0
    return root / "run", config


@pytest.fixture
def run_copy(trained, tmp_path):
    """A private copy of the trained run folder, for cases that change it."""
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    return run


def detections(folder: Path) -> list[dict]:
    return json.loads((folder / "detections.json").read_text())


# ---------------------------------------------------------------------------------------------
# Item 2: eval, predict and resume use what the checkpoint was trained with
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "values", "noted"),
    [
        ("model", {"detector": "atss"}, "model.detector"),  # an FCOS+ATSS checkpoint evaluated as ATSS
        ("data", {"short_side": 800, "max_side": 1333}, "data.short_side"),  # the config's default resolution
        ("loss", {"cls": "focal", "reg": "giou"}, None),  # another loss: its state does not matter
    ],
    ids=["other-detector", "default-resolution", "other-loss"],
)
def test_eval_takes_model_settings_from_the_checkpoint(trained, tmp_path, capsys, section, values, noted):
    run, _ = trained
    other = write_config(tmp_path / "other.yaml", **{section: values})
    code, err = run_cli(capsys, "eval", other, "--checkpoint", run / CHECKPOINT, "--out", tmp_path / "ev")
    assert code == 0, err
    # The same detections as the training's own final evaluation: the model ran as it was trained.
    assert detections(tmp_path / "ev") == detections(run)
    if noted:
        assert "note:" in err and noted in err and "using the checkpoint's values" in err


def test_eval_needs_only_the_checkpoint(trained, tmp_path, capsys):
    run, _ = trained
    code, _ = run_cli(capsys, "eval", "--checkpoint", run / CHECKPOINT, "--out", tmp_path / "ev")
    assert code == 0 and detections(tmp_path / "ev") == detections(run)


@pytest.mark.parametrize(
    "override", ["model.detector=atss", "data.short_side=128", "loss.cls=focal", "data.synthetic_classes=2"]
)
def test_eval_set_that_conflicts_with_the_checkpoint_is_an_error(trained, tmp_path, capsys, override):
    run, config = trained
    code, err = run_cli(capsys, "eval", config, "--checkpoint", run / CHECKPOINT, "--set", override)
    line = error_line(err)
    key = override.split("=")[0]
    assert code == 2 and f"--set {key}" in line and str(run / CHECKPOINT) in line
    assert "eval.*" in line  # says what may change


def test_eval_settings_may_change(trained, tmp_path, capsys):
    run, config = trained
    code, err = run_cli(
        capsys, "eval", config, "--checkpoint", run / CHECKPOINT, "--out", tmp_path / "ev",
        "--set", "eval.score_thr=0.9", "--set", "eval.batch_size=1", "--set", "data.num_workers=0",
    )  # fmt: skip
    assert code == 0, err
    assert all(d["score"] >= 0.9 for d in detections(tmp_path / "ev"))
    assert load_config(tmp_path / "ev" / "config.yaml").eval.score_thr == 0.9


def test_predict_takes_model_settings_from_the_checkpoint(trained, tmp_path, capsys):
    from hcral.runner import build_dataset

    run, _ = trained
    image = tmp_path / "img.png"
    torchvision.io.write_png(build_dataset(load_config(run / "config.yaml"), train=False).load_image(0), str(image))
    outs = {}
    for name, section in {"same": {}, "other": {"detector": "atss"}}.items():
        config = write_config(tmp_path / f"{name}.yaml", model=section)
        code, err = run_cli(capsys, "predict", config, "--checkpoint", run / CHECKPOINT, image, "--out", tmp_path / name)
        assert code == 0, err
        outs[name] = json.loads((tmp_path / name / "predictions.json").read_text())
    assert outs["other"] == outs["same"]


def test_resume_with_a_changed_config_is_refused(run_copy, tmp_path, capsys):
    before = (run_copy / "config.yaml").read_text()
    code, err = run_cli(
        capsys, "train", run_copy / "config.yaml", "--out", run_copy, "--resume", "--set", "train.lr=0.5", "--no-progress"
    )
    line = error_line(err)
    assert code == 2 and "train.lr" in line and "0.01" in line and "0.5" in line and str(run_copy / CHECKPOINT) in line
    assert (run_copy / "config.yaml").read_text() == before  # the refused config is not written


def test_resume_may_change_the_iteration_budget(run_copy, capsys):
    code, err = run_cli(
        capsys, "train", run_copy / "config.yaml", "--out", run_copy, "--resume", "--set", "train.max_iters=3", "--no-progress"
    )
    assert code == 0, err
    assert torch.load(run_copy / CHECKPOINT, weights_only=False)["global_iter"] == 3


def test_loading_weights_ignores_the_loss_state(trained, tmp_path):
    from hcral.models.build import build_model
    from hcral.runner import load_model_weights

    run, _ = trained
    cfg = apply_overrides(load_config(run / "config.yaml"), ["loss.cls=focal"])  # no acc_sum buffer
    model = build_model(cfg, 3)
    ckpt = load_model_weights(model, run / CHECKPOINT)
    assert torch.equal(model.head.cls_out.weight, ckpt["model"]["head.cls_out.weight"])


# ---------------------------------------------------------------------------------------------
# Item 3: earlier results are not overwritten
# ---------------------------------------------------------------------------------------------


def test_train_into_an_existing_run_without_resume_is_refused(run_copy, capsys):
    files = {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()}
    code, err = run_cli(capsys, "train", run_copy / "config.yaml", "--out", run_copy, "--no-progress")
    line = error_line(err)
    assert code == 2 and f"out_dir={run_copy}" in line and "--resume" in line
    assert {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()} == files  # nothing changed


def test_eval_without_out_writes_a_folder_of_its_own(run_copy, capsys):
    run_files = {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()}
    code, err = run_cli(capsys, "eval", run_copy / "config.yaml", "--checkpoint", run_copy / CHECKPOINT)
    assert code == 0 and str(run_copy / "eval") in err
    assert {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()} == run_files
    assert detections(run_copy / "eval") == detections(run_copy)
    # Another evaluation (other thresholds) gets the next folder; the first one is kept.
    code, err = run_cli(capsys, "eval", "--checkpoint", run_copy / CHECKPOINT, "--set", "eval.score_thr=0.5")
    assert code == 0 and str(run_copy / "eval2") in err
    assert load_config(run_copy / "eval" / "config.yaml").eval.score_thr == 0.0
    # An explicit --out that holds another run is refused.
    code, err = run_cli(capsys, "eval", "--checkpoint", run_copy / CHECKPOINT, "--out", run_copy / "eval2")
    assert code == 2 and f"--out {run_copy / 'eval2'}" in error_line(err)


def test_resume_logs_each_iteration_once(tmp_path, capsys):
    config = write_config(tmp_path / "tiny.yaml", train={"max_iters": 3, "checkpoint_iters": 2})
    run = tmp_path / "run"
    assert run_cli(capsys, "train", config, "--out", run, "--set", "train.max_iters=3", "--no-progress")[0] == 0
    # As if killed after iteration 3 was logged but before it was checkpointed: the checkpoint is
    # at iteration 2, the log at 3, with a torn last line.
    ckpt = torch.load(run / CHECKPOINT, weights_only=False)
    assert ckpt["global_iter"] == 3
    ckpt["global_iter"], ckpt["batches_done"] = 2, 2
    torch.save(ckpt, run / CHECKPOINT)
    with open(run / "log.jsonl", "a") as f:
        f.write('{"iter": 4, "loss": 1.')
    assert run_cli(capsys, "train", run / "config.yaml", "--resume", "--no-progress")[0] == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "loss" in r] == [1, 2, 3]  # iteration 3 replayed, logged once
    assert [r["iter"] for r in records if "val_AP" in r] == [3]


def test_resume_removes_temporary_files_of_a_killed_write(run_copy, capsys):
    stale = run_copy / ".checkpoint.pt.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    code, err = run_cli(capsys, "train", run_copy / "config.yaml", "--out", run_copy, "--resume", "--no-progress")
    assert code == 0 and not stale.exists() and str(stale) in err


def test_demo_into_an_existing_demo_is_refused(tmp_path, capsys):
    (tmp_path / "hcral").mkdir()
    (tmp_path / "hcral" / CHECKPOINT).write_bytes(b"x")
    code, err = run_cli(capsys, "demo", "--out", tmp_path)
    assert code == 2 and str(tmp_path / "hcral") in error_line(err)


# ---------------------------------------------------------------------------------------------
# Item 4: every numeric value is range-checked at load, naming the key, the value and the range
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.grad_clip=-1", "train.grad_clip=-1.0: must be > 0 or null"),
        ("train.epochs=0", "train.epochs=0: must be >= 1"),
        ("train.epochs=-3", "train.epochs=-3: must be >= 1"),
        ("train.max_iters=0", "train.max_iters=0: must be >= 1 or null"),
        ("data.batch_size=-2", "data.batch_size=-2: must be >= 1"),
        ("data.batch_size=0", "data.batch_size=0: must be >= 1"),
        ("data.flip_prob=7", "data.flip_prob=7.0: must be in [0, 1]"),
        ("eval.batch_size=0", "eval.batch_size=0: must be >= 1"),
        ("train.lr=.nan", "train.lr=nan: must be finite and > 0"),
        ("loss.hcra_alpha=1.5", "loss.hcra_alpha=1.5: must be in (-1, 1)"),
        ("loss.hcra_alpha=0.1 loss.hcra_ep=0.05", "hcra_alpha must be < hcra_ep"),  # each valid alone
        ("loss.neg_iou=0.6", "neg_iou must be <= pos_iou"),
        ("train.device=gpu", "train.device='gpu': not a device"),
    ],
)
def test_out_of_range_values_are_named_at_load(tmp_path, capsys, override, message):
    config = write_config(tmp_path / "tiny.yaml")
    sets = [arg for item in override.split() for arg in ("--set", item)]
    code, err = run_cli(capsys, "train", config, *sets, "--out", tmp_path / "run")
    assert code == 2 and message in error_line(err)
    assert not (tmp_path / "run").exists()  # rejected before anything is written


def test_a_bad_value_in_the_file_names_the_file(tmp_path, capsys):
    config = write_config(tmp_path / "tiny.yaml", train={"grad_clip": -1})
    code, err = run_cli(capsys, "train", config, "--out", tmp_path / "run")
    assert code == 2 and f"{config}: train.grad_clip=-1.0: must be > 0" in error_line(err)


def test_cuda_device_without_cuda_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = write_config(tmp_path / "tiny.yaml")
    code, err = run_cli(capsys, "train", config, "--set", "train.device=cuda", "--out", tmp_path / "run")
    assert code == 2 and "train.device=cuda: CUDA is not available" in error_line(err)


def test_every_numeric_field_declares_its_range():
    fields = numeric_fields()
    assert len(fields) > 40 and "loss.hcra_alpha" in fields and "train.lr_steps" in fields
    missing = [key for key, (f, _) in fields.items() if not isinstance(f.metadata.get("range"), Range)]
    assert not missing, f"numeric config fields without a declared range: {missing}"


def _outside(rng: Range, integer: bool) -> list[float]:
    """Values just outside ``rng``; NaN for floats."""
    step = 1 if integer else 1e-3
    values = [] if integer else [math.nan, math.inf]
    if rng.lo is not None:
        values.append(rng.lo if rng.lo_open else rng.lo - step)
    if rng.hi is not None:
        values.append(rng.hi if rng.hi_open else rng.hi + step)
    return [v for v in values if v not in rng.special]


@pytest.mark.parametrize("key", sorted(numeric_fields()))
def test_every_numeric_field_rejects_values_outside_its_range(key):
    f, annotation = numeric_fields()[key]
    integer = int in (annotation, *getattr(annotation, "__args__", ()))
    for value in _outside(f.metadata["range"], integer):
        text = f"[{value}]" if "list" in str(annotation) else repr(value).replace("nan", ".nan").replace("inf", ".inf")
        with pytest.raises(ConfigError, match=rf"^{key}(\[0\])?=") as e:
            apply_overrides(Config(), [f"{key}={text}"])
        assert e.value.key == key


def test_synthetic_ranges_match_the_dataset():
    import inspect

    from hcral.data import SHAPE_NAMES, SyntheticShapes

    fields = numeric_fields()
    assert fields["data.synthetic_classes"][0].metadata["range"].hi == len(SHAPE_NAMES)
    min_size = inspect.signature(SyntheticShapes).parameters["min_size"].default
    assert fields["data.synthetic_size"][0].metadata["range"].lo == min_size


# ---------------------------------------------------------------------------------------------
# Item 6: one clear line and exit status 1 instead of a traceback
# ---------------------------------------------------------------------------------------------


def test_non_finite_loss_says_where_the_last_good_checkpoint_is(tmp_path, capsys, monkeypatch):
    from hcral.models.heads.dense_head import DenseHead

    calls = []
    real_loss = DenseHead.loss

    def loss_that_diverges(self, feats, targets):
        calls.append(1)
        terms = real_loss(self, feats, targets)
        return {k: v * math.nan for k, v in terms.items()} if len(calls) == 2 else terms

    monkeypatch.setattr(DenseHead, "loss", loss_that_diverges)
    config = write_config(tmp_path / "tiny.yaml")
    code, err = run_cli(capsys, "train", config, "--out", tmp_path / "run", "--no-progress")
    line = error_line(err)
    assert code == 1 and "non-finite loss" in line
    assert f"last good checkpoint: {tmp_path / 'run' / CHECKPOINT} (iteration 1)" in line and "--resume" in line


@pytest.mark.parametrize("where", ["under-a-file", "is-a-file"])
def test_unwritable_out_is_named(tmp_path, capsys, where):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "run" if where == "under-a-file" else blocker
    config = write_config(tmp_path / "tiny.yaml")
    code, err = run_cli(capsys, "train", config, "--out", out, "--no-progress")
    assert code == 1 and f"out_dir={out}" in error_line(err)


def test_predict_into_an_unwritable_out_is_named(trained, tmp_path, capsys):
    from hcral.runner import build_dataset

    run, config = trained
    image = tmp_path / "img.png"
    torchvision.io.write_png(build_dataset(load_config(run / "config.yaml"), train=False).load_image(0), str(image))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, err = run_cli(capsys, "predict", config, "--checkpoint", run / CHECKPOINT, image, "--out", blocker / "p")
    assert code == 1 and str(blocker / "p") in error_line(err)


@pytest.mark.parametrize("kind", ["yaml-file", "tensor-file", "missing"])
def test_not_a_checkpoint_is_named(trained, tmp_path, capsys, kind):
    run, config = trained
    path = {"yaml-file": config, "tensor-file": tmp_path / "t.pt", "missing": tmp_path / "nope.pt"}[kind]
    if kind == "tensor-file":
        torch.save(torch.zeros(3), path)
    code, err = run_cli(capsys, "eval", config, "--checkpoint", path)
    line = error_line(err)
    assert code == 1 and str(path) in line


def test_not_a_checkpoint_exits_1_without_traceback(trained, tmp_path):
    _, config = trained
    proc = subprocess.run(
        [sys.executable, "-m", "hcral", "eval", str(config), "--checkpoint", str(config)],
        capture_output=True, text=True, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{config}: not an hcral checkpoint" in proc.stderr and len(proc.stderr) < MAX_MESSAGE


def test_hcral_traceback_reraises_the_caught_error(trained, monkeypatch):
    _, config = trained
    monkeypatch.setenv("HCRAL_TRACEBACK", "1")
    with pytest.raises(Exception, match="not an hcral checkpoint"):
        main(["eval", str(config), "--checkpoint", str(config)])


def test_config_with_other_classes_uses_the_checkpoints(trained, tmp_path, capsys):
    run, _ = trained
    other = write_config(tmp_path / "other.yaml", data={"synthetic_classes": 5})
    code, err = run_cli(capsys, "eval", other, "--checkpoint", run / CHECKPOINT, "--out", tmp_path / "ev")
    assert code == 0, err
    assert "data.synthetic_classes (checkpoint 3, config 5)" in err
    assert detections(tmp_path / "ev") == detections(run)


def test_data_with_other_classes_than_the_checkpoint_is_named(trained, tmp_path, capsys):
    # The evaluation data is labelled with the checkpoint's classes (issue 11, item 1): raccoons are
    # none of them. Before: a raw size-mismatch dump of the classifier's weights over 1 KB.
    run, _ = trained
    code, err = run_cli(
        capsys, "eval", "--checkpoint", run / CHECKPOINT, "--out", tmp_path / "ev",
        "--set", "data.dataset=voc", "--set", f"data.root={RACCOON}",
    )  # fmt: skip
    assert code == 1 and err.startswith("hcral eval: error: ")
    assert "raccoon-" in err and "unknown class 'raccoon'; valid classes: ['rectangle', 'ellipse', 'triangle']" in err


def test_weights_that_do_not_fit_the_model_are_one_line(trained):
    from hcral.models.build import build_model
    from hcral.runner import load_model_weights

    run, _ = trained
    model = build_model(load_config(run / "config.yaml"), 5)
    with pytest.raises(CheckpointError) as e:
        load_model_weights(model, run / CHECKPOINT)
    text = str(e.value)
    assert str(run / CHECKPOINT) in text and "head.cls_out.weight: (3, 32, 3, 3) in the checkpoint, (5, 32, 3, 3)" in text
    assert len(text) < MAX_MESSAGE and "\n" not in text


# ---------------------------------------------------------------------------------------------
# Item 8: HCRA-C validates its values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("ious_negative", r"ious must be in \[0, 1\].*got values in \[-0.5"),
        ("ious_above_one", r"ious must be in \[0, 1\].*1.5\]"),
        ("ious_nan", r"ious must be in \[0, 1\].*nan"),
        ("logits_inf", r"logits must be finite, got values in \[.*inf\]"),
        ("logits_nan", r"logits must be finite"),
    ],
)
@pytest.mark.parametrize("fn", ["hcra_cls_loss", "cls_weights"])
def test_hcra_cls_loss_rejects_values_outside_its_domain(fn, bad, message):
    from hcral import losses as L

    logits, targets, ious = torch.randn(6, 3), torch.zeros(6, 3), torch.rand(6, 3)
    targets[0, 1] = 1
    if bad.startswith("ious"):
        ious[2, 2] = {"ious_negative": -0.5, "ious_above_one": 1.5, "ious_nan": math.nan}[bad]
    else:
        logits[1, 0] = math.inf if bad == "logits_inf" else math.nan
    with pytest.raises(ValueError, match=rf"^{fn}: {message}"):
        getattr(L, fn)(logits, targets, ious)


# ---------------------------------------------------------------------------------------------
# Item 9: the newcomer's path
# ---------------------------------------------------------------------------------------------


def test_demo_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "folder for the runs" in out and "override a value of the demo's config" in out


# ---------------------------------------------------------------------------------------------
# Issue 24, item 1: numbers as people write them, in a YAML file and in --set alike
# ---------------------------------------------------------------------------------------------


def config_with(tmp_path: Path, source: str, key: str, text: str) -> tuple[Path, list[str]]:
    """TINY with ``key`` written as ``text``, unquoted, in the YAML file or as a --set."""
    if source == "set":
        return write_config(tmp_path / "tiny.yaml"), ["--set", f"{key}={text}"]
    section, name = key.split(".")
    path = write_config(tmp_path / "tiny.yaml", **{section: {name: "XVALUEX"}})
    path.write_text(path.read_text().replace("XVALUEX", text))
    return path, []


@pytest.mark.parametrize("source", ["file", "set"])
@pytest.mark.parametrize(
    ("key", "text", "value"),
    [
        ("train.lr", "1e-3", 1e-3),
        ("train.weight_decay", "5E-4", 5e-4),
        ("train.warmup_ratio", ".5", 0.5),
        ("train.grad_clip", "1_000.0", 1000.0),
        ("train.lr", "1e6", 1e6),
        ("train.lr", "2", 2.0),  # an integer where a float goes
        ("train.warmup_iters", "1_000", 1000),
    ],
)
def test_numbers_are_read_as_python_reads_them(tmp_path, source, key, text, value):
    path, sets = config_with(tmp_path, source, key, text)
    cfg = load_config(path, sets[1:])
    section, name = key.split(".")
    got = getattr(getattr(cfg, section), name)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("source", ["file", "set"])
@pytest.mark.parametrize(
    ("key", "text", "message"),
    [
        ("train.epochs", "2e3", "train.epochs: expected an integer, got {text}, a float (a decimal point or an exponent); write it as 2000"),
        ("train.warmup_iters", "500.0", "train.warmup_iters: expected an integer, got {text}, a float (a decimal point or an exponent); write it as 500"),
        ("train.epochs", "1.5", "train.epochs: expected an integer, got {text}"),
        ("train.lr", "1e-3x", "train.lr: expected a number, got '1e-3x'"),
        ("train.lr", "nan", "train.lr=nan: must be finite and > 0"),
        ("train.weight_decay", "inf", "train.weight_decay=inf: must be finite and >= 0"),
        ("train.lr", "-1e-3", "train.lr=-0.001: must be > 0"),
    ],
)
def test_numbers_that_do_not_fit_the_field_are_named(tmp_path, capsys, source, key, text, message):
    path, sets = config_with(tmp_path, source, key, text)
    code, err = run_cli(capsys, "train", path, *sets, "--out", tmp_path / "run")
    # YAML (of the file and of --set) reads 500.0 and 1.5 as floats, shown bare; 2e3 as text, quoted.
    shown = text if "." in text else repr(text)
    line = error_line(err)
    assert code == 2 and message.format(text=shown) in line, line
    assert (str(path) in line) == (source == "file")  # a value from the file names the file
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Issue 24, item 4: a diverging run says at which iteration, which term, and what survives
# ---------------------------------------------------------------------------------------------


def test_a_diverging_lr_names_the_iteration_the_terms_and_the_last_checkpoint(tmp_path, capsys):
    import re

    config = write_config(tmp_path / "tiny.yaml", train={"max_iters": 8})
    run = tmp_path / "run"
    code, err = run_cli(capsys, "train", config, "--out", run, "--set", "train.lr=1e6", "--no-progress")
    line = error_line(err)
    found = re.search(r"non-finite loss at iteration (\d+): (loss_\w+=(nan|inf))", line)
    assert code == 1 and found, line
    failed = int(found.group(1))
    assert 1 < failed <= 8
    assert f"last good checkpoint: {run / CHECKPOINT} (iteration {failed - 1})" in line
    assert f"continue with: hcral train {run / 'config.yaml'} --resume" in line
    assert "lower train.lr" in line
    assert torch.load(run / CHECKPOINT, weights_only=False)["global_iter"] == failed - 1


# ---------------------------------------------------------------------------------------------
# Issue 24, item 3: a full disk says so, names the file, and the last good checkpoint survives
# ---------------------------------------------------------------------------------------------


def test_a_full_disk_during_a_checkpoint_write_names_the_space_and_keeps_the_last_one(tmp_path, capsys, monkeypatch):
    import errno

    import hcral.utils

    real_write = hcral.utils._write_all
    big_writes = []

    def write_that_fills_the_disk(f, data):  # the checkpoint is the only large file
        if len(data) > 100_000:
            big_writes.append(len(data))
            if len(big_writes) == 2:
                f.write(bytes(data)[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
        real_write(f, data)

    monkeypatch.setattr(hcral.utils, "_write_all", write_that_fills_the_disk)
    run = tmp_path / "run"
    code, err = run_cli(capsys, "train", write_config(tmp_path / "tiny.yaml"), "--out", run, "--no-progress")
    line = error_line(err)
    assert code == 1
    assert f"cannot write {run / CHECKPOINT}: no space left on the device (" in line and f"free in {run}" in line
    assert "the file needs" in line and "the previous checkpoint.pt is intact" in line
    assert f"last good checkpoint: {run / CHECKPOINT} (iteration 1)" in line
    assert "inline_container" not in line
    assert torch.load(run / CHECKPOINT, weights_only=False)["global_iter"] == 1
    assert not list(run.glob(".*.tmp"))


def test_too_little_free_space_is_found_before_writing(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real_usage = shutil.disk_usage

    def usage(path):  # the disk fills up once the first checkpoint is written
        total, used, free = real_usage(path)
        return type(real_usage(path))(total, used, 10_000 if (run / CHECKPOINT).exists() else free)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    code, err = run_cli(capsys, "train", write_config(tmp_path / "tiny.yaml"), "--out", run, "--no-progress")
    line = error_line(err)
    size = (run / CHECKPOINT).stat().st_size
    assert code == 1 and f"cannot write {run / CHECKPOINT}: no space left on the device (10,000 bytes free in {run}" in line
    assert f"the file needs {size / 2**20:,.1f} MiB" in line or f"the file needs {size:,} bytes" in line
    assert torch.load(run / CHECKPOINT, weights_only=False)["global_iter"] == 1


def _no_space_for(monkeypatch, name: str) -> None:
    """Creating the temporary file of an atomic write of ``name`` fails as on a full disk."""
    import errno
    import tempfile

    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, prefix=None, **kwargs):
        if prefix is not None and prefix.startswith(f".{name}."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_mkstemp(*args, prefix=prefix, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize(("command", "name"), [("eval", "metrics.json"), ("eval", "detections.json"), ("predict", "predictions.json"), ("predict", "img.png")])
def test_a_full_disk_names_each_result_file(trained, tmp_path, capsys, monkeypatch, command, name):
    from hcral.runner import build_dataset

    run, config = trained
    out = tmp_path / "out"
    argv = [command, config, "--checkpoint", run / CHECKPOINT, "--out", out]
    if command == "predict":
        image = tmp_path / "img.png"
        torchvision.io.write_png(build_dataset(load_config(run / "config.yaml"), train=False).load_image(0), str(image))
        argv.insert(4, image)
    _no_space_for(monkeypatch, name)
    code, err = run_cli(capsys, *argv)
    assert code == 1 and f"cannot write {out / name}: no space left on the device (" in error_line(err)


def test_a_full_disk_names_the_log(tmp_path, capsys, monkeypatch):
    import builtins

    import hcral.utils

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):  # /dev/full: every write fails with ENOSPC
        return builtins.open("/dev/full" if Path(path).name == "log.jsonl" else path, mode, *args, **kwargs)

    monkeypatch.setattr(hcral.utils, "open", open_on_a_full_disk, raising=False)
    run = tmp_path / "run"
    code, err = run_cli(capsys, "train", write_config(tmp_path / "tiny.yaml"), "--out", run, "--no-progress")
    line = error_line(err)
    assert code == 1 and f"cannot write {run / 'log.jsonl'}: no space left on the device (" in line
    assert "stopped after iteration 1; no checkpoint was written yet" in line  # the log comes first


def test_a_write_that_fails_for_another_reason_names_the_file_and_the_reason(tmp_path):
    from hcral.utils import WriteError, write_text_atomic

    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(WriteError, match=rf"^cannot write {tmp_path / 'a_file' / 'metrics.json'}: ") as e:
        write_text_atomic(tmp_path / "a_file" / "metrics.json", "{}")
    assert "no space" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# Issue 24, item 2: SIGTERM and SIGINT end a run after the step under way, with a checkpoint
# ---------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
# 8 images, batch 2, 3 epochs: 12 iterations; no periodic checkpoint, so only the signal writes one.
PREEMPTIBLE = {"epochs": 3, "max_iters": None, "checkpoint_iters": 0, "checkpoint_interval": 0, "eval_interval": 0}


def hcral_process(*argv) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "hcral", *map(str, argv)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
    )


def signal_after_first_step(proc: subprocess.Popen, log: Path, signum: int, times: int = 1) -> None:
    deadline = time.monotonic() + 120
    while not (log.is_file() and log.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
        time.sleep(0.02)
    for _ in range(times):
        proc.send_signal(signum)


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["global_iter"] == b["global_iter"] and a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]


def test_sigterm_checkpoints_and_resume_equals_an_uninterrupted_run(tmp_path):
    config = write_config(tmp_path / "tiny.yaml", train=PREEMPTIBLE, data={"num_workers": 1})
    straight = hcral_process("train", config, "--out", tmp_path / "straight", "--no-progress")
    run = tmp_path / "run"
    proc = hcral_process("train", config, "--out", run, "--no-progress")
    # Two signals, as a scheduler that repeats itself: the second falls in the step or the write.
    signal_after_first_step(proc, run / "log.jsonl", signal.SIGTERM, times=2)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, err
    stopped = torch.load(run / CHECKPOINT, weights_only=False)["global_iter"]
    assert 1 <= stopped < 12, "the run ended before the signal; make it longer"
    assert err.strip().splitlines()[-1] == (
        f"hcral train: received SIGTERM; checkpoint written at iteration {stopped}: {run / CHECKPOINT}; "
        f"continue with: hcral train {run / 'config.yaml'} --resume"
    )
    assert "Traceback" not in err and not list(run.glob(".*.tmp"))
    resumed = hcral_process("train", run / "config.yaml", "--resume", "--no-progress")
    assert resumed.wait(timeout=300) == 0 and straight.wait(timeout=300) == 0
    a = torch.load(tmp_path / "straight" / CHECKPOINT, weights_only=False)
    b = torch.load(run / CHECKPOINT, weights_only=False)
    assert a["global_iter"] == 12
    assert_same_training_state(a, b)  # bit-identical, as after a kill -9 and resume
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "loss" in r] == list(range(1, 13))  # each step logged once


def test_sigint_in_a_step_checkpoints_that_step_despite_a_second_signal_in_the_write(tmp_path, capsys, monkeypatch):
    """Deterministic, in this process: SIGINT (Ctrl-C) arrives during iteration 3, another one
    while its checkpoint is written."""
    import hcral.runner
    from hcral.models.heads.dense_head import DenseHead

    calls = []
    real_loss, real_save = DenseHead.loss, hcral.runner.torch_save_atomic

    def loss_then_ctrl_c(self, feats, targets):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(self, feats, targets)

    def save_while_signalled(obj, path):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs here, in the middle of the write
        real_save(obj, path)

    monkeypatch.setattr(DenseHead, "loss", loss_then_ctrl_c)
    monkeypatch.setattr(hcral.runner, "torch_save_atomic", save_while_signalled)
    before = signal.getsignal(signal.SIGINT)
    run = tmp_path / "run"
    config = write_config(tmp_path / "tiny.yaml", train=PREEMPTIBLE)
    code, err = run_cli(capsys, "train", config, "--out", run, "--no-progress")
    assert code == 130, err
    assert f"received SIGINT; checkpoint written at iteration 3: {run / CHECKPOINT}" in err
    assert torch.load(run / CHECKPOINT, weights_only=False)["global_iter"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back


def test_signal_checkpoint_false_leaves_the_signal_its_default(tmp_path):
    config = write_config(tmp_path / "tiny.yaml", train={**PREEMPTIBLE, "signal_checkpoint": False})
    run = tmp_path / "run"
    proc = hcral_process("train", config, "--out", run, "--no-progress")
    signal_after_first_step(proc, run / "log.jsonl", signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM and not (run / CHECKPOINT).exists()
