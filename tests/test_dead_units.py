"""``hcral.experiments.dead_units``: the dead share of a tower's last ReLU against constructed heads,
and the command on a tiny trained run."""

from __future__ import annotations

import pytest
import torch
from test_detectors import tiny_config

from hcral.data import collate
from hcral.experiments import dead_units as D
from hcral.models.build import build_model
from hcral.runner import build_dataset, train


def _model_and_images(tmp_path, *extra):
    cfg = tiny_config(tmp_path, "model.detector=retinanet", "loss.assigner=max_iou", *extra)
    dataset = build_dataset(cfg, train=False)
    torch.manual_seed(0)
    model = build_model(cfg, dataset.num_classes)
    images, _ = collate([dataset[0], dataset[1]], size_divisor=32)
    return model, images


@pytest.mark.parametrize(("bias", "expected"), [(-1.0, 1.0), (1.0, 0.0)])
def test_a_tower_whose_last_conv_is_a_constant_bias_is_all_dead_or_all_alive(tmp_path, bias, expected):
    model, images = _model_and_images(tmp_path)
    last_conv = [m for m in model.head.cls_tower if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last_conv.weight.zero_()
        last_conv.bias.fill_(bias)
    found = D.dead_fractions(model.train(), images)
    assert found["cls_dead"] == expected
    assert 0.0 < found["reg_dead"] < 1.0  # the untouched tower: a random init kills about half
    assert model.training  # the mode is restored
    with torch.no_grad():
        feats = model.neck(model.backbone(images))
    assert found["fpn_abs_mean"] == pytest.approx([float(f.abs().mean()) for f in feats])


def test_the_share_counts_every_level_image_channel_and_position(tmp_path):
    model, images = _model_and_images(tmp_path)
    outputs = []
    model.head.cls_tower.register_forward_hook(lambda m, i, o: outputs.append(o.clone()))
    found = D.dead_fractions(model, images)
    zeros = sum(int((o == 0).sum()) for o in outputs)
    assert found["cls_dead"] == zeros / sum(o.numel() for o in outputs)


def test_command_reports_each_run_and_each_cell(tmp_path, capsys):
    runs = []
    for cell in ("focal", "ghmc"):
        for seed in (0, 1):
            out = tmp_path / cell / f"seed{seed}"
            cfg = tiny_config(out, "model.detector=retinanet", "loss.assigner=max_iou", f"loss.cls={cell}",
                              "train.max_iters=1", "train.eval_interval=0", "data.synthetic_val=4")
            train(cfg, progress=False)
            runs.append(str(out))
    D.main([*runs, "--images", "3"])
    printed = capsys.readouterr().out
    assert all(f"| `{run}` |" in printed for run in runs)
    assert "| `focal` (n=2) |" in printed and "| `ghmc` (n=2) |" in printed


def test_command_refuses_zero_images(tmp_path, capsys):
    with pytest.raises(SystemExit):
        D.main([str(tmp_path), "--images", "0"])
    assert "--images 0" in capsys.readouterr().err
