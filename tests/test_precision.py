"""bf16 autocast on the CPU (``train.amp``, hcral/precision.py): where the bf16 region ends, that
everything after it sees float32, that ``train.amp=false`` is float32 throughout and unchanged,
and the whole train / eval / predict path under autocast."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import freeze_batch_norm_2d
from timm.layers.norm_act import FrozenBatchNormAct2d as TimmFrozenBatchNormAct2d
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d as TorchvisionFrozenBatchNorm2d

import hcral.precision as P
from hcral.cli import main
from hcral.config import load_config
from hcral.data import collate
from hcral.models.backbones.resnet import FrozenBatchNorm2d
from hcral.models.backbones.timm_backbone import FrozenBatchNormAct2d, _keep_activation_dtype
from hcral.models.build import build_model
from hcral.runner import CHECKPOINT, build_dataset

CPU = torch.device("cpu")
needs_bf16 = pytest.mark.skipif(not P.bf16_supported(CPU), reason="this CPU has no oneDNN bf16 kernels")

TINY = [
    "model.fpn_channels=32", "model.head_channels=32", "model.head_convs=1", "data.synthetic_train=8",
    "data.synthetic_val=4", "data.synthetic_size=96", "data.short_side=96", "data.max_side=96",
    "data.batch_size=2", "data.num_workers=0", "data.flip_prob=0.0", "train.epochs=1", "train.warmup_iters=2",
    "train.log_interval=1", "eval.batch_size=4", "eval.score_thr=0.0",
]  # fmt: skip


def cli_sets(*extra: str) -> list[str]:
    return [a for o in [*TINY, *extra] for a in ("--set", o)]


def empty_config(folder: Path) -> str:
    """A config file with no keys: ``hcral train`` needs one; the --set overrides say the rest."""
    path = folder / "tiny.yaml"
    path.write_text("{}\n")
    return str(path)


def tiny_model_and_batch(*extra: str, detector: str = "fcos_atss", loss: tuple[str, str, str] = ("hcra_c", "hcra_r", "eatss")):
    cls, reg, assigner = loss
    cfg = load_config(overrides=[*TINY, f"model.detector={detector}", f"loss.cls={cls}", f"loss.reg={reg}", f"loss.assigner={assigner}", *extra])
    dataset = build_dataset(cfg, train=True)
    torch.manual_seed(0)
    model = build_model(cfg, dataset.num_classes).train()
    images, targets = collate([dataset[i] for i in range(2)], size_divisor=32)
    return model, images, targets


def record_dtypes(model: nn.Module) -> tuple[dict[str, torch.dtype], list]:
    """Output dtype of every Conv2d of ``model``, by name, as the forward runs."""
    seen: dict[str, torch.dtype] = {}

    def hook(name: str):
        def record(module, args, out) -> None:  # returns None: the output is left as it is
            seen[name] = out.dtype

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return seen, handles


# ---------------------------------------------------------------------------------------------
# Where the bf16 region ends
# ---------------------------------------------------------------------------------------------


def conv_dtypes_under_autocast(model: nn.Module, *inputs) -> dict[str, torch.dtype]:
    seen, handles = record_dtypes(model)
    with P.autocast(CPU, True):
        model(*inputs)
    for h in handles:
        h.remove()
    return seen


@needs_bf16
@pytest.mark.parametrize("detector", ["retinanet", "atss", "fcos_atss"])
def test_towers_run_in_bf16_and_the_prediction_layers_in_float32(detector):
    loss = ("focal", "giou", "max_iou" if detector == "retinanet" else "atss")
    model, images, targets = tiny_model_and_batch(detector=detector, loss=loss)  # amp_float32_stages=1
    seen = conv_dtypes_under_autocast(model, images, targets)
    float32 = {n for n in seen if n.split(".")[-1] in ("cls_out", "reg_out", "ctr_out")}
    float32 |= {n for n in seen if n.startswith(("backbone.stem.", "backbone.stages.0.", "neck.extra_convs."))}
    assert {n for n in seen if seen[n] == torch.float32} == float32, seen
    assert len(set(seen) - float32) > len(float32) > 0  # the rest of the backbone, FPN, towers: bf16


@needs_bf16
@pytest.mark.parametrize("k", [-1, 0, 1, 2])
def test_the_stem_and_first_stages_run_in_float32_under_autocast(k):
    """train.amp_float32_stages counts as model.frozen_stages: -1 none, 0 the stem, k the stem and k stages."""
    cfg = load_config(overrides=[f"train.amp_float32_stages={k}"])
    backbone = build_model(cfg, 3).backbone.eval()
    seen = conv_dtypes_under_autocast(backbone, torch.randn(1, 3, 64, 64))
    stages = (["stem."] if k >= 0 else []) + [f"stages.{i}." for i in range(max(k, 0))]
    assert {n for n in seen if seen[n] == torch.float32} == {n for n in seen if n.startswith(tuple(stages))}


@needs_bf16
def test_float32_stages_of_timm_and_resnet_backbones():
    # timm: the largest modules whose parameters lie in groups 0..1 (Lite0: conv_stem, blocks.0);
    # the parameterless frozen norm after conv_stem receives float32 and keeps it.
    timm_cfg = load_config(overrides=["model.backbone=timm:tf_efficientnet_lite0", "model.frozen_stages=-1"])
    seen = conv_dtypes_under_autocast(build_model(timm_cfg, 3).backbone.eval(), torch.randn(1, 3, 64, 64))
    assert {n for n in seen if seen[n] == torch.float32} == {n for n in seen if n.startswith(("body.conv_stem", "body.blocks.0."))}
    resnet_cfg = load_config(overrides=["model.backbone=resnet18", "train.amp_float32_stages=2"])
    seen = conv_dtypes_under_autocast(build_model(resnet_cfg, 3).backbone.eval(), torch.randn(1, 3, 64, 64))
    assert {n for n in seen if seen[n] == torch.float32} == {n for n in seen if n.startswith(("conv1", "layer1.", "layer2."))}


def test_run_in_float32_keeps_the_module_as_it_was():
    torch.manual_seed(0)
    conv, x = nn.Conv2d(3, 4, 3), torch.randn(2, 3, 8, 8)
    plain = conv(x)
    names, text = list(conv.state_dict()), repr(conv)
    P.run_in_float32(conv)
    assert torch.equal(conv(x), plain)  # no autocast: the module's own forward
    assert isinstance(conv, nn.Conv2d) and list(conv.state_dict()) == names and repr(conv) == text
    copied = copy.deepcopy(conv)
    assert type(copied) is type(conv) and torch.equal(copied(x), plain)
    if P.bf16_supported(CPU):
        with P.autocast(CPU, True):
            out = conv(x.bfloat16())
        assert out.dtype == torch.float32 and torch.equal(out, conv(x.bfloat16().float()))


@pytest.mark.skipif(not P.bf16_supported(torch.device("cpu")), reason="needs a CPU with bf16 kernels")
def test_fpn_extra_levels_run_in_float32_and_stay_finite_on_1x1_inputs():
    """P6/P7 in float32 under autocast: on this Xeon's AMX, the bf16 backward of P7's stride-2 conv
    on a 1x1 P6 gave non-finite weight gradients in about 1 of 10 calls (up to 9 of 10 channels_last)."""
    from hcral.models.fpn import FPN

    torch.manual_seed(0)
    fpn = FPN([16, 16, 16], 16, extra_source="output", relu_before_extra=True).to(memory_format=torch.channels_last)
    for _ in range(30):
        feats = [torch.randn(2, 16, s, s).contiguous(memory_format=torch.channels_last) for s in (8, 4, 2)]  # P6, P7: 1x1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = fpn(feats)
        assert [o.dtype for o in outs] == [torch.bfloat16] * 3 + [torch.float32] * 2
        fpn.zero_grad()
        sum(o.float().sum() for o in outs).backward()
        assert all(torch.isfinite(p.grad).all() for p in fpn.parameters())


@pytest.mark.parametrize("backbone", ["small", "resnet18", "timm:tf_efficientnet_lite0"])
def test_a_float32_stages_value_out_of_range_is_named(backbone):
    cfg = load_config(overrides=[f"model.backbone={backbone}", "train.amp_float32_stages=9"])
    with pytest.raises(ValueError, match="float32_stages must be in -1..[0-9]+.*got 9"):
        build_model(cfg, 3)


@needs_bf16
@pytest.mark.parametrize("loss", [("hcra_c", "hcra_r", "eatss"), ("focal", "giou", "atss"), ("ghmc", "giou", "atss")])
def test_assignment_and_losses_see_float32_with_autocast_off(monkeypatch, loss):
    model, images, targets = tiny_model_and_batch(loss=loss)
    seen = []
    head = type(model.head)  # the detector's subclass: assign is its own
    for name in ("assign", "_cls_loss", "_reg_loss"):
        real = getattr(head, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            tensors = [a for a in args if torch.is_tensor(a)]
            seen.append((_name, torch.is_autocast_enabled("cpu"), {t.dtype for t in tensors if t.is_floating_point()}))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(head, name, spy)
    with P.autocast(CPU, True):
        terms = model(images, targets)
    assert {name for name, _, _ in seen} == {"assign", "_cls_loss", "_reg_loss"}
    for name, autocast_on, dtypes in seen:
        assert not autocast_on and dtypes <= {torch.float32}, (name, autocast_on, dtypes)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@needs_bf16
def test_predictions_are_float32_under_autocast():
    model, images, _ = tiny_model_and_batch()
    model.eval()
    with torch.no_grad(), P.autocast(CPU, True):
        dets = model(images)
    assert all(d["boxes"].dtype == d["scores"].dtype == torch.float32 for d in dets)


# ---------------------------------------------------------------------------------------------
# train.amp=false: float32 throughout, the same arithmetic as before
# ---------------------------------------------------------------------------------------------


def test_amp_false_is_float32_throughout():
    model, images, targets = tiny_model_and_batch()
    seen, _ = record_dtypes(model)
    with P.autocast(CPU, P.resolve_amp(False, CPU)):
        terms = model(images, targets)
    assert set(seen.values()) == {torch.float32}
    # The same numbers as with no autocast context at all (what CPU training was before).
    again, _, _ = tiny_model_and_batch()
    for k, v in again(images, targets).items():
        assert torch.equal(v, terms[k]), k
    assert not P.use_channels_last(True, CPU, amp=False)  # NCHW stays NCHW in float32 on a CPU


def _timm_original(module: nn.Module) -> nn.Module:
    back = {FrozenBatchNormAct2d: TimmFrozenBatchNormAct2d, FrozenBatchNorm2d: TorchvisionFrozenBatchNorm2d}
    for m in module.modules():
        if type(m) in back:
            m.__class__ = back[type(m)]
    return module


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18"])
def test_dtype_keeping_frozen_norms_equal_timms_bit_for_bit_in_float32(name):
    torch.manual_seed(0)
    body = freeze_batch_norm_2d(timm.create_model(name, features_only=True, out_indices=(2, 3, 4)))
    for m in body.modules():  # statistics other than the identity
        if isinstance(m, (TimmFrozenBatchNormAct2d, TorchvisionFrozenBatchNorm2d)):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 64, 96)
    _keep_activation_dtype(body)
    ours = body
    swapped = {type(m) for m in ours.modules()} & {FrozenBatchNormAct2d, FrozenBatchNorm2d}
    assert swapped  # Lite0 has BatchNormAct2d, ResNet-18 plain BatchNorm2d
    with torch.no_grad():
        got = ours(x)
        want = _timm_original(ours)(x)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@needs_bf16
def test_dtype_keeping_frozen_norms_keep_bf16():
    body = freeze_batch_norm_2d(timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(2, 3, 4)))
    _keep_activation_dtype(body)
    seen = []
    for m in body.modules():
        if isinstance(m, FrozenBatchNormAct2d):
            m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype) and None)
    with torch.no_grad(), P.autocast(CPU, True):
        body(torch.randn(1, 3, 64, 64))
    assert seen and set(seen) == {torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# Settings, and the CPU without bf16
# ---------------------------------------------------------------------------------------------


def test_a_cpu_without_bf16_runs_float32_and_says_so_once(monkeypatch, capsys):
    monkeypatch.setattr(P, "bf16_supported", lambda device: False)
    P._note_no_bf16.cache_clear()
    assert P.resolve_amp(True, CPU, cpu=True) is False and P.resolve_amp(True, CPU, cpu=True) is False
    assert P.resolve_amp(False, CPU) is False
    err = capsys.readouterr().err
    assert err.count("train.amp: this cpu has no bf16 kernels; running in float32") == 1
    P._note_no_bf16.cache_clear()


@needs_bf16
def test_amp_settings_as_they_take_effect():
    assert P.resolve_amp(True, CPU, cpu=True) and not P.resolve_amp(False, CPU, cpu=True)
    assert not P.resolve_amp(True, CPU)  # train.cpu_amp is off by default: float32 on a CPU
    assert P.use_channels_last(True, CPU, amp=True) and not P.use_channels_last(False, CPU, amp=True)


# ---------------------------------------------------------------------------------------------
# End to end under autocast
# ---------------------------------------------------------------------------------------------


@needs_bf16
def test_train_eval_and_predict_under_cpu_autocast(tmp_path, capsys):
    from torchvision.io import write_png

    run = tmp_path / "run"
    sets = cli_sets("train.amp=true", "train.cpu_amp=true", "train.max_iters=3", "loss.cls=hcra_c", "loss.reg=hcra_r", "loss.assigner=eatss")
    assert main(["train", empty_config(tmp_path), *sets, "--out", str(run), "--no-progress"]) == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["iter"] for r in steps] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in steps)  # finite
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics.keys() >= {"AP", "AP50"}
    # eval and predict on the checkpoint, in bf16 (train.amp may change at inference).
    assert main(["eval", "--checkpoint", str(run / CHECKPOINT), "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text()) == metrics  # the same precision as training's
    dataset = build_dataset(load_config(run / "config.yaml"), train=False)
    write_png(dataset.load_image(0), str(tmp_path / "img.png"))
    assert main(["predict", str(run / "config.yaml"), "--checkpoint", str(run / CHECKPOINT), str(tmp_path / "img.png"), "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "img.png").is_file()
    capsys.readouterr()


@needs_bf16
def test_resume_under_autocast_equals_a_run_that_never_stopped(tmp_path, capsys):
    config, sets = empty_config(tmp_path), cli_sets("train.amp=true", "train.cpu_amp=true", "train.epochs=2", "train.eval_interval=0")
    assert main(["train", config, *sets, "--out", str(tmp_path / "straight"), "--no-progress"]) == 0
    assert main(["train", config, *sets, "--set", "train.max_iters=5", "--out", str(tmp_path / "resumed"), "--no-progress"]) == 0
    assert main(["train", config, *sets, "--out", str(tmp_path / "resumed"), "--resume", "--no-progress"]) == 0
    a = torch.load(tmp_path / "straight" / CHECKPOINT, weights_only=False)
    b = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=False)
    assert a["global_iter"] == b["global_iter"] == 8
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    capsys.readouterr()


@needs_bf16
def test_a_diverging_lr_is_named_under_autocast_too(tmp_path, capsys):
    sets = cli_sets("train.amp=true", "train.cpu_amp=true", "train.max_iters=8", "train.checkpoint_iters=1", "train.lr=1e6")
    assert main(["train", empty_config(tmp_path), *sets, "--out", str(tmp_path / "run"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss at iteration " in err and "last good checkpoint: " in err and Path(tmp_path / "run" / CHECKPOINT).is_file()


@needs_bf16
def test_a_resume_in_another_precision_says_so(tmp_path, capsys):
    config, run = empty_config(tmp_path), str(tmp_path / "run")
    assert main(["train", config, *cli_sets("train.amp=false", "train.max_iters=2", "train.eval_interval=0"), "--out", run, "--no-progress"]) == 0
    assert torch.load(Path(run) / CHECKPOINT, weights_only=False)["precision"] == "fp32"
    capsys.readouterr()
    sets = cli_sets("train.amp=true", "train.cpu_amp=true", "train.max_iters=3", "train.eval_interval=0")
    assert main(["train", config, *sets, "--out", run, "--resume", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"note: {Path(run) / CHECKPOINT} was trained in fp32 up to iteration 2; it continues in bf16" in err
    assert torch.load(Path(run) / CHECKPOINT, weights_only=False)["precision"] == "bf16"
