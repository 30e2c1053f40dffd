"""ResNet (torchvision's, pretrained loading, freezing) and the small CPU backbone."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from hcral.models.backbones import FrozenBatchNorm2d, ResNet, SmallBackbone, load_pretrained
from hcral.models.backbones.resnet import DeformConv2dPack

# ---------------------------------------------------------------------------------------------
# torchvision's state-dict layout, from torchvision's own classifier model
# ---------------------------------------------------------------------------------------------


def torchvision_resnet_shapes(depth: int) -> dict[str, tuple[int, ...]]:
    """Every key of ``torchvision.models.resnet{depth}().state_dict()`` with its shape, in order."""
    with torch.device("meta"):
        net = torchvision.models.get_model(f"resnet{depth}")
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def random_state_dict(depth: int, *, seed: int = 0, with_counters: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in torchvision_resnet_shapes(depth).items():
        if key.endswith("num_batches_tracked"):
            if with_counters:
                state[key] = torch.tensor(12345, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.05
    return state


def test_torchvision_layout_counts():
    # Independent facts about torchvision: resnet18 / resnet50 state dicts have 122 / 320 entries.
    assert len(torchvision_resnet_shapes(18)) == 122
    assert len(torchvision_resnet_shapes(50)) == 320


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
@pytest.mark.parametrize("norm", ["frozen_bn", "bn"])
def test_parameter_names_and_shapes_match_torchvision(depth, norm):
    model = ResNet(depth, norm=norm)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {k: s for k, s in torchvision_resnet_shapes(depth).items() if not k.startswith("fc.")}
    if norm == "frozen_bn":  # FrozenBatchNorm2d keeps no counter
        expected = {k: s for k, s in expected.items() if not k.endswith("num_batches_tracked")}
    assert ours == expected


def test_bottleneck_stride_on_3x3_conv():
    model = ResNet(50)
    block = model.layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert block.downsample[0].stride == (2, 2)


@pytest.mark.parametrize("depth,norm", [(18, "frozen_bn"), (18, "bn"), (50, "frozen_bn")])
def test_load_torchvision_state_dict_strict(tmp_path, depth, norm):
    state = random_state_dict(depth)
    path = tmp_path / f"resnet{depth}.pth"
    torch.save(state, path)
    model = ResNet(depth, norm=norm, weights=path)
    ours = model.state_dict()
    for key in ("conv1.weight", "layer3.1.bn2.running_var", "layer4.0.downsample.1.bias"):
        if key in state:
            assert torch.equal(ours[key], state[key]), key
    assert torch.equal(ours["layer1.0.bn1.weight"], state["layer1.0.bn1.weight"])


def test_load_timm_style_without_counters_and_nested(tmp_path):
    state = random_state_dict(18, with_counters=False)
    path = tmp_path / "timm.pth"
    torch.save({"state_dict": state}, path)
    model = ResNet(18, norm="bn")
    load_pretrained(model, path)
    assert torch.equal(model.state_dict()["layer2.1.conv2.weight"], state["layer2.1.conv2.weight"])


def test_load_errors_name_file_and_keys(tmp_path):
    state = random_state_dict(18)
    state["layer2.0.conv1.weightt"] = state.pop("layer2.0.conv1.weight")
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    model = ResNet(18)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_pretrained(model, path)
    msg = str(err.value)
    assert str(path) in msg
    assert "missing keys (1): layer2.0.conv1.weight" in msg
    assert "unexpected keys (1): layer2.0.conv1.weightt" in msg
    # Nothing was loaded.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    state = random_state_dict(18)
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"shape mismatches \(1\): layer1.0.conv1.weight: file \(64, 64, 1, 1\)"):
        load_pretrained(model, path)

    with pytest.raises(ValueError, match="do not match"):  # a ResNet-50 file into a ResNet-18
        torch.save(random_state_dict(50), path)
        load_pretrained(model, path)

    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ResNet(18, weights=tmp_path / "nope.pth")

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_pretrained(model, garbage)

    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="expected a state dict"):
        load_pretrained(model, path)


def test_frozen_bn_equals_batchnorm_in_eval():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(8)
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.normal_()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.2, 3)
    bn.eval()
    fbn = FrozenBatchNorm2d(8)
    fbn.load_state_dict(bn.state_dict())  # carries num_batches_tracked: dropped
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(fbn.double()(x), bn.double()(x))
    # The output keeps the activation's dtype: fp16 input, and bf16 under autocast (fp32 buffers).
    assert FrozenBatchNorm2d(8)(torch.randn(1, 8, 2, 2).half()).dtype == torch.float16
    conv = nn.Conv2d(3, 8, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert FrozenBatchNorm2d(8)(conv(torch.randn(1, 3, 4, 4))).dtype == torch.bfloat16


def test_frozen_bn_and_bn_in_eval_give_the_same_resnet():
    torch.manual_seed(0)
    a = ResNet(18, norm="bn")
    for m in a.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    b = ResNet(18, norm="frozen_bn")
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 64)
    for ya, yb in zip(a.eval()(x), b.eval()(x)):
        torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("depth,channels", [(18, [128, 256, 512]), (50, [512, 1024, 2048])])
def test_resnet_output_shapes(depth, channels):
    model = ResNet(depth)
    assert model.out_channels == channels and model.strides == [8, 16, 32]
    outs = model(torch.randn(2, 3, 160, 160))
    assert [tuple(o.shape) for o in outs] == [(2, c, 160 // s, 160 // s) for c, s in zip(channels, [8, 16, 32])]
    all4 = ResNet(18, out_indices=(0, 1, 2, 3))
    assert [o.shape[-1] for o in all4(torch.randn(1, 3, 160, 160))] == [40, 20, 10, 5]


def _trainable(module: nn.Module) -> bool:
    return all(p.requires_grad for p in module.parameters())


def _frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def test_frozen_stages():
    m = ResNet(18, norm="bn", frozen_stages=1)
    assert _frozen(m.conv1) and _frozen(m.bn1) and _frozen(m.layer1)
    assert _trainable(m.layer2) and _trainable(m.layer3) and _trainable(m.layer4)
    m = ResNet(18, norm="bn", frozen_stages=0)
    assert _frozen(m.conv1) and _frozen(m.bn1) and _trainable(m.layer1)
    m = ResNet(18, norm="bn", frozen_stages=-1)
    assert _trainable(m)
    m = ResNet(18, norm="bn", frozen_stages=4)
    assert _frozen(m)
    # frozen BN has no parameters at all, only buffers
    m = ResNet(18, norm="frozen_bn", frozen_stages=-1)
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    assert all("bn" not in name and "downsample.1" not in name for name, _ in m.named_parameters())
    # stages after the last output are not built
    m = ResNet(18, out_indices=(1, 2), frozen_stages=-1)
    assert "layer4" not in m and _trainable(m.layer3) and len(m(torch.randn(1, 3, 64, 64))) == 2


def test_gradients_reach_only_trainable_stages():
    m = ResNet(18, frozen_stages=1)
    sum(o.sum() for o in m(torch.randn(1, 3, 64, 64))).backward()
    assert m.layer1[0].conv1.weight.grad is None and m.conv1.weight.grad is None
    assert m.layer2[0].conv1.weight.grad is not None and m.layer4[1].conv2.weight.grad is not None


def test_norm_eval():
    m = ResNet(18, norm="bn", norm_eval=True, frozen_stages=-1).train()
    assert m.training
    assert all(not mod.training for mod in m.modules() if isinstance(mod, nn.BatchNorm2d))
    before = m.layer3[0].bn1.running_mean.clone()
    m(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, m.layer3[0].bn1.running_mean)

    m = ResNet(18, norm="bn", norm_eval=False, frozen_stages=1).train()
    assert m.layer2[0].bn1.training and not m.layer1[0].bn1.training and not m.bn1.training
    before = m.layer3[0].bn1.running_mean.clone()
    m(torch.randn(2, 3, 64, 64))
    assert not torch.equal(before, m.layer3[0].bn1.running_mean)
    m.eval()
    assert not m.layer2[0].bn1.training


def test_dcn_stages_start_as_the_plain_resnet_and_load_imagenet_weights(tmp_path):
    dcn = (False, True, True, True)  # MMDetection's dconv_c3-c5
    state = random_state_dict(50)
    path = tmp_path / "r50.pth"
    torch.save(state, path)
    m = ResNet(50, stage_with_dcn=dcn, weights=path, frozen_stages=-1)
    assert not isinstance(m.layer1[0].conv2, DeformConv2dPack)
    assert all(isinstance(b.conv2, DeformConv2dPack) for layer in (m.layer2, m.layer3, m.layer4) for b in layer)
    extra = {k for k in m.state_dict() if ".conv_offset." in k}
    assert len(extra) == 2 * (4 + 6 + 3) and all(not m.state_dict()[k].any() for k in extra)  # zero init
    assert torch.equal(m.state_dict()["layer3.2.conv2.weight"], state["layer3.2.conv2.weight"])
    # Zero offsets sample the regular grid: the same maps as the plain ResNet with the same weights.
    plain = ResNet(50, weights=path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(m.eval()(x), plain.eval()(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # The offset convs train.
    sum(o.sum() for o in m.train()(x)).backward()
    assert m.layer4[0].conv2.conv_offset.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="Bottleneck blocks"):
        ResNet(18, stage_with_dcn=dcn)
    with pytest.raises(ValueError, match="one flag per stage"):
        ResNet(50, stage_with_dcn=(True,))


def test_resnet_bad_arguments():
    with pytest.raises(ValueError, match="depth"):
        ResNet(42)
    with pytest.raises(ValueError, match="out_indices"):
        ResNet(18, out_indices=(3, 1))
    with pytest.raises(ValueError, match="frozen_stages"):
        ResNet(18, frozen_stages=5)
    with pytest.raises(ValueError, match="norm"):
        ResNet(18, norm="gn")


# ---------------------------------------------------------------------------------------------
# Small backbone
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["gn", "bn"])
def test_small_backbone_shapes(norm):
    m = SmallBackbone(norm=norm)
    assert m.out_channels == [64, 128, 256] and m.strides == [8, 16, 32]
    outs = m(torch.randn(2, 3, 160, 160))
    assert [tuple(o.shape) for o in outs] == [(2, 64, 20, 20), (2, 128, 10, 10), (2, 256, 5, 5)]
    assert sum(p.numel() for p in m.parameters()) < 3_000_000
    sum(o.mean() for o in outs).backward()
    assert all(p.grad is not None for p in m.parameters())


def test_small_backbone_options():
    m = SmallBackbone((8, 8, 16, 16, 32), blocks_per_stage=2, out_indices=(0, 1, 2))
    assert m.out_channels == [8, 16, 16] and m.strides == [4, 8, 16]
    assert [o.shape[-1] for o in m(torch.randn(1, 3, 128, 128))] == [32, 16, 8]
    # GroupNorm: a batch of one trains, and train/eval give the same output
    m = SmallBackbone()
    x = torch.randn(1, 3, 96, 96)
    torch.testing.assert_close(m.train()(x)[-1], m.eval()(x)[-1])
    with pytest.raises(ValueError, match="num_groups=8 must divide"):
        SmallBackbone((12, 32, 64, 128, 256))
    with pytest.raises(ValueError, match="widths"):
        SmallBackbone((16, 32, 64))
    with pytest.raises(ValueError, match="norm"):
        SmallBackbone(norm="ln")
