"""HCRA-C / HCRA-R inside torchvision's FCOS and RetinaNet (hcral.integrations.torchvision).

Reductions against torchvision's own losses and GHM-C, the u helper against a hand computation,
and one forward/backward of each detector with a tiny backbone.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from unittest import mock

import pytest
import torch
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead

from hcral.data.collate import collate
from hcral.data.transforms import build_transforms, empty_target
from hcral.integrations.torchvision import (
    GIoURegressionLoss,
    HCRALFCOSHead,
    TorchvisionDetectorAdapter,
    build_cls_loss,
    build_reg_loss,
    fcos_with_hcral,
    retinanet_with_hcral,
)
from hcral.losses import ghmc_loss, hcra_ious

NUM_CLASSES = 3
IMAGE = 64
MODEL_KWARGS = dict(min_size=IMAGE, max_size=IMAGE)
# hcral's pipeline has normalised: torchvision's transform must not (TorchvisionDetectorAdapter).
NO_NORMALISATION = dict(image_mean=[0.0] * 3, image_std=[1.0] * 3)


class TinyBackbone(nn.Module):
    """Five maps at strides 8..128 with 32 channels (the FCOS towers' GroupNorm(32) needs 32k)."""

    out_channels = 32

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, self.out_channels, 8, stride=8)
        self.down = nn.ModuleList(nn.Conv2d(self.out_channels, self.out_channels, 3, 2, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = torch.relu(self.stem(x))
        feats = OrderedDict([("0", x)])
        for i, conv in enumerate(self.down):
            x = torch.relu(conv(x))
            feats[str(i + 1)] = x
        return feats


def _images_and_targets(empty: tuple[int, ...] = (1,)) -> tuple[list[torch.Tensor], list[dict]]:
    """Two 64x64 images; those listed in ``empty`` have no ground truth."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, IMAGE, IMAGE, generator=g) for _ in range(2)]
    boxes = torch.tensor([[4.0, 6.0, 40.0, 44.0], [20.0, 10.0, 60.0, 30.0], [30.0, 30.0, 62.0, 62.0]])
    labels = torch.tensor([0, 2, 2])
    targets = [
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
        if i in empty else {"boxes": boxes.clone(), "labels": labels.clone()}
        for i in range(2)
    ]  # fmt: skip
    return images, targets


def _loss_inputs(model: nn.Module, images: list[torch.Tensor], targets: list[dict]):
    """(targets, head_outputs, anchors, matched_idxs) as torchvision's forward and matcher make them."""
    image_list, targets = model.transform(images, targets)
    feats = list(model.backbone(image_list.tensors).values())
    head_outputs = model.head(feats)
    anchors = model.anchor_generator(image_list, feats)
    captured = {}

    def capture(targets, head_outputs, anchors, matched_idxs):
        captured["matched_idxs"] = matched_idxs

    with mock.patch.object(model.head, "compute_loss", capture):
        if model.__class__.__name__ == "FCOS":
            model.compute_loss(targets, head_outputs, anchors, [f.shape[2] * f.shape[3] for f in feats])
        else:
            model.compute_loss(targets, head_outputs, anchors)
    return targets, head_outputs, anchors, captured["matched_idxs"]


def _onehot(targets: list[dict], matched_idxs: list[torch.Tensor], num_priors: int) -> torch.Tensor:
    """p* by a loop over priors: 1 at (prior, class of its matched ground truth)."""
    rows = []
    for t, m in zip(targets, matched_idxs):
        onehot = torch.zeros(num_priors, NUM_CLASSES)
        for i, j in enumerate(m.tolist()):
            if j >= 0:
                onehot[i, t["labels"][j]] = 1.0
        rows.append(onehot)
    return torch.cat(rows)


# ---------------------------------------------------------------------------------------------
# u (formulation §1)
# ---------------------------------------------------------------------------------------------


def test_hcra_ious_against_hand_computation():
    pred = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],  # background
        [0.0, 0.0, 10.0, 10.0],  # positive, matched to g0 (class 1)
        [5.0, 0.0, 15.0, 10.0],  # ignored (between thresholds)
        [100.0, 100.0, 110.0, 110.0],  # background, overlaps nothing
    ])  # fmt: skip
    gt = torch.tensor([[0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 10.0, 8.0], [5.0, 0.0, 15.0, 10.0]])
    labels = torch.tensor([1, 1, 0])  # class 2 has no ground truth
    matched = torch.tensor([-1, 0, -2, -1])
    u = hcra_ious(pred, gt, labels, matched, 3)
    # IoU(p0, g0) = 100/200, IoU(p0, g1) = 80/100, IoU(p0, g2) = 50/150;
    # IoU(p2, g0) = 50/250, IoU(p2, g1) = 40/140, IoU(p2, g2) = 1.
    expected = torch.tensor([
        [1 / 3, 0.8, 0.0],
        [1 / 3, 0.5, 0.0],  # its own GT's IoU at its class, not the class-wise maximum 0.8
        [1.0, 2 / 7, 0.0],  # ignored: class-wise maxima
        [0.0, 0.0, 0.0],
    ])  # fmt: skip
    torch.testing.assert_close(u, expected)
    assert u.dtype == torch.float32 and not u.requires_grad


def test_hcra_ious_without_ground_truth_and_bad_shapes():
    pred = torch.tensor([[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 3.0, 3.0]], requires_grad=True)
    u = hcra_ious(pred, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.full((2,), -1), 4)
    assert u.shape == (2, 4) and not u.any()
    with pytest.raises(ValueError, match="hcra_ious: matched_gt must have shape"):
        hcra_ious(pred, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.full((3,), -1), 4)
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        hcra_ious(pred, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.full((2,), -1), 0)


# ---------------------------------------------------------------------------------------------
# Reductions: torchvision's own losses, GHM-C
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ["focal", "focal_rci_cf"])
def test_fcos_focal_and_giou_equal_torchvision(cls):
    """cls=focal (and RCI+CF on focal with both modules off, §3b) with reg=giou is torchvision's
    FCOS loss, term by term, on the same head outputs and matches; HCRA-R with RCI and CF off is
    its GIoU term."""
    torch.manual_seed(0)
    model = fcos_with_hcral(
        TinyBackbone(), NUM_CLASSES, cls=cls, reg="giou", cls_rci=False, cls_cf=False, **MODEL_KWARGS
    ).train()
    images, targets = _images_and_targets(empty=(1,))
    inputs = _loss_inputs(model, images, targets)
    assert (inputs[3][0] >= 0).any()  # positives: the box terms are not trivially 0
    ours = model.head.compute_loss(*inputs)
    theirs = FCOSHead.compute_loss(model.head, *inputs)  # torchvision's own loss on our head's outputs
    assert set(ours) == set(theirs) == {"classification", "bbox_regression", "bbox_ctrness"}
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key])
    model.head.reg_loss = build_reg_loss("hcra_r", use_rci=False, use_cf=False)
    torch.testing.assert_close(model.head.compute_loss(*inputs)["bbox_regression"], theirs["bbox_regression"])
    if cls == "focal_rci_cf":  # with the modules on, the loss is no longer torchvision's
        model.head.cls_loss.use_rci = model.head.cls_loss.use_cf = True
        assert not torch.allclose(model.head.compute_loss(*inputs)["classification"], theirs["classification"])


def test_heads_pass_u_of_each_image():
    """The classification loss receives hcra_ious of every image's decoded boxes, in batch order,
    the valid mask, and the number of positives."""
    seen = {}

    def capture(logits, cls_targets, ious, valid, *, avg_factor):  # a plain function works as cls_loss
        seen.update(ious=ious, valid=valid, avg_factor=avg_factor)
        return logits.sum() * 0

    torch.manual_seed(0)
    backbone = TinyBackbone()
    head = HCRALFCOSHead(backbone.out_channels, 1, NUM_CLASSES, cls_loss=capture, reg_loss=GIoURegressionLoss())
    model = FCOS(backbone, NUM_CLASSES, head=head, **MODEL_KWARGS).train()
    images, targets = _images_and_targets(empty=(0,))  # the first image has no ground truth
    targets_t, head_outputs, anchors, matched = _loss_inputs(model, images, targets)
    model.head.compute_loss(targets_t, head_outputs, anchors, matched)
    boxes = model.head.box_coder.decode(head_outputs["bbox_regression"], torch.stack(anchors))
    expected = torch.cat([
        hcra_ious(b, t["boxes"], t["labels"], m, NUM_CLASSES) for b, t, m in zip(boxes, targets_t, matched)
    ])  # fmt: skip
    assert expected[: len(matched[0])].eq(0).all() and expected.gt(0).any()
    torch.testing.assert_close(seen["ious"], expected)
    assert seen["valid"].all() and seen["avg_factor"] == float((matched[1] >= 0).sum())


def test_retinanet_focal_equals_torchvision_on_one_image():
    """With one image the batch-wide normaliser is torchvision's per-image one; ignored anchors
    (matcher value -2) are left out as torchvision does."""
    torch.manual_seed(0)
    model = retinanet_with_hcral(TinyBackbone(), NUM_CLASSES, cls="focal", reg="l1", **MODEL_KWARGS).train()
    images, targets = _images_and_targets(empty=())
    inputs = _loss_inputs(model, images[:1], targets[:1])
    assert (inputs[3][0] == -2).any()  # the case under test is present
    ours = model.head.compute_loss(*inputs)
    theirs = RetinaNetHead.compute_loss(model.head, *inputs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key])


def test_hcra_c_without_modules_is_ghmc():
    """HCRA-C with RCI and CF off is GHM-C on the flattened batch (same momentum state),
    gradients included; ignored anchors are invalid."""
    torch.manual_seed(0)
    model = retinanet_with_hcral(
        TinyBackbone(), NUM_CLASSES, cls="hcra_c", reg="giou", cls_rci=False, cls_cf=False, **MODEL_KWARGS
    ).train()
    images, targets = _images_and_targets(empty=(1,))
    targets_t, head_outputs, anchors, matched = _loss_inputs(model, images, targets)
    assert (matched[0] >= 0).any() and (matched[0] == -2).any()
    logits = head_outputs["cls_logits"]
    ours = model.head.compute_loss(targets_t, head_outputs, anchors, matched)["classification"]
    flat = logits.reshape(-1, NUM_CLASSES)
    loss_cls = model.head.cls_loss
    reference = ghmc_loss(
        flat, _onehot(targets_t, matched, logits.shape[1]), torch.cat(matched) != -2, bins=loss_cls.bins,
        momentum=loss_cls.momentum, acc_sum=torch.zeros(loss_cls.bins),
    )  # fmt: skip
    torch.testing.assert_close(ours, reference)
    (g_ours,) = torch.autograd.grad(ours, logits, retain_graph=True)
    (g_ref,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(g_ours, g_ref)


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("detector", ["fcos", "retinanet"])
@pytest.mark.parametrize("cls", ["hcra_c", "focal_rci_cf"])
@pytest.mark.parametrize("empty", [(1,), (0, 1)], ids=["one_empty", "all_empty"])
def test_forward_backward(detector, cls, empty):
    torch.manual_seed(0)
    factory = fcos_with_hcral if detector == "fcos" else retinanet_with_hcral
    model = factory(TinyBackbone(), NUM_CLASSES, cls=cls, reg="hcra_r", **MODEL_KWARGS).train()
    images, targets = _images_and_targets(empty=empty)
    losses = model(images, targets)
    expected = {"classification", "bbox_regression"} | ({"bbox_ctrness"} if detector == "fcos" else set())
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    # Each hcral loss alone reaches the head's output convolutions.
    head = model.head
    cls_weight = head.classification_head.cls_logits.weight
    cls_grad = torch.autograd.grad(losses["classification"], cls_weight, retain_graph=True)[0]
    assert cls_grad.abs().sum() > 0
    reg_grad = torch.autograd.grad(
        losses["bbox_regression"], head.regression_head.bbox_reg.weight, retain_graph=True, allow_unused=True
    )[0]
    if len(empty) == 2:  # no positives: a zero that stays in the graph
        assert losses["bbox_regression"] == 0 and (reg_grad is None or not reg_grad.any())
    else:
        assert reg_grad.abs().sum() > 0
    sum(losses.values()).backward()
    if cls == "hcra_c":
        assert head.cls_loss.acc_sum.sum() > 0  # the GHM moving average was updated: HCRA-C ran
        assert "head.cls_loss.acc_sum" in model.state_dict()


def test_detections_come_from_torchvision_postprocessing():
    torch.manual_seed(0)
    model = fcos_with_hcral(TinyBackbone(), NUM_CLASSES, score_thresh=0.0, **MODEL_KWARGS).eval()
    images, _ = _images_and_targets()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"} and len(out[0]["boxes"]) > 0


def test_unknown_loss_names():
    with pytest.raises(ValueError, match="cls must be one of .* got 'ghmc'"):
        build_cls_loss("ghmc")
    with pytest.raises(ValueError, match="reg must be one of .* got 'l1'"):
        fcos_with_hcral(TinyBackbone(), NUM_CLASSES, reg="l1")


# ---------------------------------------------------------------------------------------------
# hcral's data pipeline and engine
# ---------------------------------------------------------------------------------------------

SHORT, LONG = 256, 341


@pytest.mark.parametrize("hw", [(480, 640), (640, 480), (100, 100), (50, 2000), (1000, 745), (333, 444)])
def test_transform_is_identity_on_hcral_resized_images(hw):
    """With min_size/max_size = short_side/max_side and mean 0, std 1, torchvision's transform leaves
    an image resized and normalised by hcral's pipeline unchanged (TorchvisionDetectorAdapter)."""
    image = torch.randint(0, 256, (3, *hw), dtype=torch.uint8)
    tensor, info = build_transforms(train=False, short_side=SHORT, max_side=LONG)(image, empty_target(*hw))
    model = fcos_with_hcral(TinyBackbone(), NUM_CLASSES, min_size=SHORT, max_size=LONG, **NO_NORMALISATION)
    for train in (True, False):
        model.train(train)
        image_list, _ = model.transform([tensor])
        h, w = info["size"]
        assert image_list.image_sizes == [(h, w)]
        assert torch.equal(image_list.tensors[0, :, :h, :w], tensor)


def test_adapter_trains_and_detects_on_a_collated_batch():
    torch.manual_seed(0)
    model = TorchvisionDetectorAdapter(
        fcos_with_hcral(TinyBackbone(), NUM_CLASSES, score_thresh=0.0, **MODEL_KWARGS, **NO_NORMALISATION)
    )
    images, targets = _images_and_targets(empty=(1,))
    batch = [(images[0], {**targets[0], "size": (64, 64)}), (images[1][:, :40, :56], {**targets[1], "size": (40, 56)})]
    padded, infos = collate(batch, size_divisor=32)
    losses = model.train()(padded, infos)
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    assert all(math.isfinite(float(v.detach())) for v in losses.values())
    with torch.no_grad():
        dets = model.eval()(padded, image_sizes=[info["size"] for info in infos])
    boxes = dets[1]["boxes"]
    assert len(boxes) > 0 and boxes[:, 2].max() <= 56 and boxes[:, 3].max() <= 40  # clipped to the unpadded image
