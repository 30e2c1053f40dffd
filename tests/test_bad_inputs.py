"""Nothing silently wrong, nothing silently lost: one case per probe of docs/reliability.md.

Every case goes through the real command line (``hcral.cli.main``, or a subprocess where the exit
status and the absence of a traceback are the point) and checks that the error names the file or
the key at fault, or that the result is the correct one.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
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
