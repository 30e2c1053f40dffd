"""The compared losses: Focal, QFL, VFL, GHM-C and the IoU family; reductions and edge cases."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hcral import losses as L
from hcral.ops import boxes as B

CLS_LOSSES = {
    "sigmoid_focal_loss": L.sigmoid_focal_loss,
    "quality_focal_loss": L.quality_focal_loss,
    "varifocal_loss": L.varifocal_loss,
    "ghmc_loss": L.ghmc_loss,
}
BOX_LOSSES = {
    "iou_loss": L.iou_loss,
    "giou_loss": L.giou_loss,
    "diou_loss": L.diou_loss,
    "ciou_loss": L.ciou_loss,
    "eiou_loss": L.eiou_loss,
    "focal_eiou_loss": L.focal_eiou_loss,
}


def _cls_inputs(n=12, c=3, *, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=dtype) * 2
    labels = torch.randint(0, c + 1, (n,), generator=g)  # c = background
    targets = F.one_hot(labels, c + 1)[:, :c].to(dtype)
    scores = torch.rand(n, generator=g, dtype=dtype)
    return logits, targets, targets * scores[:, None], labels, scores


def _boxes(p=6, *, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(p, 2, generator=g, dtype=dtype) * 20
    wh = torch.rand(p, 2, generator=g, dtype=dtype) * 20 + 5
    target = torch.cat((xy, xy + wh), dim=1)
    pred = target + torch.randn(p, 4, generator=g, dtype=dtype) * 2.5
    pred = torch.cat((pred[:, :2], torch.maximum(pred[:, 2:], pred[:, :2] + 1)), dim=1)
    return pred, target


def _cls_call(name, logits, targets, soft, **kw):
    return CLS_LOSSES[name](logits, soft if name in ("quality_focal_loss", "varifocal_loss") else targets, **kw)


# ---------------------------------------------------------------------------------------------
# Reduction conventions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CLS_LOSSES))
def test_cls_reductions(name):
    logits, targets, soft, *_ = _cls_inputs()
    none = _cls_call(name, logits, targets, soft, reduction="none")
    expected_shape = (12,) if name == "quality_focal_loss" else (12, 3)
    assert none.shape == expected_shape
    torch.testing.assert_close(_cls_call(name, logits, targets, soft, reduction="sum"), none.sum())
    torch.testing.assert_close(_cls_call(name, logits, targets, soft, reduction="mean", avg_factor=7.0), none.sum() / 7)
    torch.testing.assert_close(
        _cls_call(name, logits, targets, soft, reduction="mean", avg_factor=torch.tensor(7.0)), none.sum() / 7
    )
    with pytest.raises(ValueError, match=f"{name}: reduction must be one of"):
        _cls_call(name, logits, targets, soft, reduction="avg")
    with pytest.raises(ValueError, match="avg_factor cannot be used with reduction='sum'"):
        _cls_call(name, logits, targets, soft, reduction="sum", avg_factor=3.0)
    with pytest.raises(ValueError, match=name):
        _cls_call(name, logits, targets[:, :2], soft[:, :2])


@pytest.mark.parametrize("name", ["sigmoid_focal_loss", "quality_focal_loss", "varifocal_loss"])
def test_cls_mean_and_weights(name):
    logits, targets, soft, *_ = _cls_inputs()
    none = _cls_call(name, logits, targets, soft, reduction="none")
    torch.testing.assert_close(_cls_call(name, logits, targets, soft), none.mean())
    prior_weight = torch.linspace(0, 2, 12, dtype=torch.float64)
    weighted = _cls_call(name, logits, targets, soft, reduction="none", weight=prior_weight)
    expected = none * (prior_weight if none.dim() == 1 else prior_weight[:, None])
    torch.testing.assert_close(weighted, expected)
    with pytest.raises(ValueError, match="weight must have shape"):
        _cls_call(name, logits, targets, soft, weight=torch.ones(5, dtype=torch.float64))
    # An element weight (N, C), e.g. a valid mask expanded over classes, is accepted by every loss.
    element_weight = torch.rand(12, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    out = _cls_call(name, logits, targets, soft, weight=element_weight, reduction="sum")
    if name == "quality_focal_loss":  # applied to each class term before the class sum
        scale = (soft - logits.sigmoid()).abs().pow(2.0)
        bce = F.binary_cross_entropy_with_logits(logits, soft, reduction="none")
        torch.testing.assert_close(out, (bce * scale * element_weight).sum())
    else:
        torch.testing.assert_close(out, (none * element_weight).sum())


@pytest.mark.parametrize("name", sorted(BOX_LOSSES))
def test_box_reductions(name):
    pred, target = _boxes()
    fn = BOX_LOSSES[name]
    none = fn(pred, target, reduction="none")
    assert none.shape == (6,)
    torch.testing.assert_close(fn(pred, target), none.mean())
    torch.testing.assert_close(fn(pred, target, reduction="sum"), none.sum())
    torch.testing.assert_close(fn(pred, target, avg_factor=4), none.sum() / 4)
    w = torch.arange(6, dtype=torch.float64)
    torch.testing.assert_close(fn(pred, target, weight=w, reduction="sum"), (none * w).sum())
    with pytest.raises(ValueError, match=f"{name}: reduction must be one of"):
        fn(pred, target, reduction="max")
    with pytest.raises(ValueError, match="avg_factor cannot be used"):
        fn(pred, target, reduction="sum", avg_factor=2)
    with pytest.raises(ValueError, match=f"{name}: pred and target must be aligned"):
        fn(pred, target[:3])
    with pytest.raises(ValueError, match="weight must have shape"):
        fn(pred, target, weight=torch.ones(3))


def test_weight_reduce_loss_avg_factor_clamped():
    loss = torch.tensor([1.0, 2.0])
    # A zero avg_factor is clamped at float32's eps instead of dividing by zero.
    assert torch.isfinite(L.weight_reduce_loss(loss, avg_factor=0.0))
    assert L.weight_reduce_loss(loss, reduction="none", avg_factor=5.0).equal(loss)  # ignored, as MMDetection


# ---------------------------------------------------------------------------------------------
# Focal, QFL, VFL: closed forms
# ---------------------------------------------------------------------------------------------


def test_focal_without_alpha_and_gamma_is_bce_including_gradients():
    logits, targets, *_ = _cls_inputs()
    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    focal = L.sigmoid_focal_loss(x1, targets, alpha=-1, gamma=0)
    bce = F.binary_cross_entropy_with_logits(x2, targets)
    torch.testing.assert_close(focal, bce, rtol=0, atol=0)
    focal.backward()
    bce.backward()
    # Equal up to the rounding of the fused mean's backward (last ulp).
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-14, atol=1e-16)


def test_focal_closed_form():
    # x = 0 -> p = 0.5, BCE = ln 2, (1 - p_t)^2 = 1/4; α_t = 0.25 (positive) or 0.75 (negative).
    logits = torch.zeros(1, 2, dtype=torch.float64)
    targets = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    out = L.sigmoid_focal_loss(logits, targets, reduction="none")
    expected = torch.tensor([[0.25, 0.75]], dtype=torch.float64) * 0.25 * math.log(2)
    torch.testing.assert_close(out, expected)
    # x = 2, positive: p_t = σ(2), BCE = -ln σ(2).
    p = 1 / (1 + math.exp(-2))
    val = L.sigmoid_focal_loss(torch.tensor([[2.0]], dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64))
    assert val.item() == pytest.approx(0.25 * (1 - p) ** 2 * -math.log(p), rel=1e-12)


def _qfl_label_score_reference(logits, labels, scores, beta=2.0):
    """QFL in its (label, score) form: every class is a negative with target 0, then the positive's
    class is overwritten with its score; summed over classes."""
    p = logits.sigmoid()
    loss = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none") * p.pow(beta)
    for i in range(logits.shape[0]):
        k = int(labels[i])
        if k < logits.shape[1]:
            bce = F.binary_cross_entropy_with_logits(logits[i, k], scores[i], reduction="none")
            loss[i, k] = bce * (scores[i] - p[i, k]).abs().pow(beta)
    return loss.sum(dim=1)


def test_qfl_dense_equals_label_score_form_and_closed_form():
    logits, _, soft, labels, scores = _cls_inputs(n=20, c=4, seed=3)
    torch.testing.assert_close(
        L.quality_focal_loss(logits, soft, reduction="none"), _qfl_label_score_reference(logits, labels, scores)
    )
    # x = 0, y = 0.6: |0.6 - 0.5|² · BCE(0, 0.6) with BCE(0, y) = ln 2 for every y.
    out = L.quality_focal_loss(torch.zeros(1, 1, dtype=torch.float64), torch.full((1, 1), 0.6, dtype=torch.float64))
    assert out.item() == pytest.approx(0.01 * math.log(2), rel=1e-12)


def test_vfl_closed_form():
    x = torch.tensor([[0.3, -0.4]], dtype=torch.float64)
    q = torch.tensor([[0.7, 0.0]], dtype=torch.float64)
    out = L.varifocal_loss(x, q, reduction="none")
    p0, p1 = 1 / (1 + math.exp(-0.3)), 1 / (1 + math.exp(0.4))
    bce_pos = -(0.7 * math.log(p0) + 0.3 * math.log(1 - p0))
    bce_neg = -math.log(1 - p1)
    assert out[0, 0].item() == pytest.approx(0.7 * bce_pos, rel=1e-12)
    assert out[0, 1].item() == pytest.approx(0.75 * p1**2 * bce_neg, rel=1e-12)
    plain = L.varifocal_loss(x, q, reduction="none", iou_weighted=False)
    assert plain[0, 0].item() == pytest.approx(bce_pos, rel=1e-12)
    assert plain[0, 1].item() == pytest.approx(out[0, 1].item(), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# GHM-C: β against a slow loop over bins, momentum, the valid mask
# ---------------------------------------------------------------------------------------------


def _ghm_beta_loop(logits, targets, valid_rows, bins, momentum=0.0, acc=None):
    """Reference β, one bin at a time (MMDetection's GHMC semantics, written out plainly)."""
    edges = [b / bins for b in range(bins + 1)]
    edges[-1] += 1e-6
    g = (logits.sigmoid() - targets).abs()
    valid = torch.ones_like(g, dtype=torch.bool) if valid_rows is None else valid_rows[:, None].expand_as(g)
    total = max(float(valid.sum()), 1.0)
    beta = torch.zeros_like(g)
    nonempty = 0
    for b in range(bins):
        in_bin = (g >= edges[b]) & (g < edges[b + 1]) & valid
        count = int(in_bin.sum())
        if count == 0:
            continue
        nonempty += 1
        if momentum > 0:
            acc[b] = momentum * acc[b] + (1 - momentum) * count
            beta[in_bin] = total / acc[b]
        else:
            beta[in_bin] = total / count
    return beta / max(nonempty, 1), total


@pytest.mark.parametrize("bins", [1, 3, 10, 30])
@pytest.mark.parametrize("masked", [False, True])
def test_ghm_beta_matches_loop_reference(bins, masked):
    logits, targets, *_ = _cls_inputs(n=40, c=5, seed=bins)
    valid = torch.arange(40) % 3 != 0 if masked else None
    g = (logits.sigmoid() - targets).abs()
    beta, normaliser = L.ghm_beta(g, valid, bins=bins)
    ref, total = _ghm_beta_loop(logits, targets, valid, bins)
    torch.testing.assert_close(beta, ref, rtol=1e-12, atol=0)
    assert normaliser.item() == total
    # The loss is Σ β·BCE / T.
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    loss = L.ghmc_loss(logits, targets, valid, bins=bins)
    torch.testing.assert_close(loss, (ref * bce).sum() / total, rtol=1e-12, atol=0)


def test_ghm_beta_with_momentum_over_several_calls():
    bins, momentum = 10, 0.75
    acc_impl = torch.zeros(bins, dtype=torch.float64)
    acc_ref = [0.0] * bins
    for call in range(4):
        logits, targets, *_ = _cls_inputs(n=30, c=4, seed=100 + call)
        valid = torch.arange(30) % (call + 2) != 0
        g = (logits.sigmoid() - targets).abs()
        beta, _ = L.ghm_beta(g, valid, bins=bins, momentum=momentum, acc_sum=acc_impl)
        ref, _ = _ghm_beta_loop(logits, targets, valid, bins, momentum, acc_ref)
        torch.testing.assert_close(beta, ref, rtol=1e-12, atol=0)
        torch.testing.assert_close(acc_impl, torch.tensor(acc_ref, dtype=torch.float64), rtol=1e-12, atol=0)


def test_ghm_bins_at_the_edges():
    # g exactly 0 (x = +100, p* = 1 in float64), exactly 0.5 (x = 0) and exactly 1 (x = -100, p* = 1).
    logits = torch.tensor([[100.0], [0.0], [0.0], [-100.0]], dtype=torch.float64)
    targets = torch.tensor([[1.0], [0.0], [1.0], [1.0]], dtype=torch.float64)
    g = (logits.sigmoid() - targets).abs()
    assert g.flatten().tolist() == [0.0, 0.5, 0.5, 1.0]
    beta, _ = L.ghm_beta(g, bins=10)
    # Three non-empty bins (0, 5, 9), T = 4: β = 4 / (n_b · 3).
    torch.testing.assert_close(beta.flatten(), torch.tensor([4 / 3, 2 / 3, 2 / 3, 4 / 3], dtype=torch.float64))
    ref, _ = _ghm_beta_loop(logits, targets, None, 10)
    torch.testing.assert_close(beta, ref, rtol=0, atol=0)


def test_ghm_divides_by_number_of_nonempty_bins():
    # All elements in one bin: β = T / T / 1 = 1, so GHM-C is the mean BCE.
    logits = torch.full((5, 2), 3.0, dtype=torch.float64)
    targets = torch.ones(5, 2, dtype=torch.float64)
    beta, _ = L.ghm_beta((logits.sigmoid() - targets).abs(), bins=10)
    assert beta.eq(1).all()
    torch.testing.assert_close(L.ghmc_loss(logits, targets), F.binary_cross_entropy_with_logits(logits, targets))
    # Two bins with 1 and 3 elements: β = 4 / (1·2) and 4 / (3·2).
    logits = torch.tensor([[3.0], [-3.0], [-3.0], [-3.0]], dtype=torch.float64)
    beta, _ = L.ghm_beta((logits.sigmoid() - torch.zeros_like(logits)).abs(), bins=10)
    torch.testing.assert_close(beta.flatten(), torch.tensor([2.0, 2 / 3, 2 / 3, 2 / 3], dtype=torch.float64))


def test_ghm_float32_matches_float64_reference():
    logits, targets, *_ = _cls_inputs(n=50, c=4, seed=9, dtype=torch.float32)
    g = (logits.sigmoid() - targets).abs()
    beta, _ = L.ghm_beta(g, bins=10)
    ref, _ = _ghm_beta_loop(logits, targets, None, 10)
    torch.testing.assert_close(beta, ref, rtol=1e-6, atol=0)


def test_ghm_argument_errors():
    g = torch.rand(4, 2)
    with pytest.raises(ValueError, match="needs the moving-average state acc_sum"):
        L.ghm_beta(g, momentum=0.5)
    with pytest.raises(ValueError, match=r"acc_sum must be a \(10,\) float tensor"):
        L.ghm_beta(g, momentum=0.5, acc_sum=torch.zeros(3))
    with pytest.raises(ValueError, match="bins must be a positive int"):
        L.ghm_beta(g, bins=0)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        L.GHMCLoss(momentum=1.0)
    with pytest.raises(ValueError, match="valid must have shape"):
        L.ghmc_loss(torch.zeros(4, 2), torch.zeros(4, 2), torch.ones(3, dtype=torch.bool))


def test_ghmc_module_state():
    module = L.GHMCLoss(bins=10, momentum=0.75, loss_weight=2.0)
    assert "acc_sum" in module.state_dict()
    assert "acc_sum" in L.GHMCLoss().state_dict()  # same keys without momentum
    logits, targets, *_ = _cls_inputs(n=20, c=3, seed=4, dtype=torch.float32)
    acc = torch.zeros(10)
    functional = L.ghmc_loss(logits, targets, momentum=0.75, acc_sum=acc)
    torch.testing.assert_close(module(logits, targets), 2.0 * functional)
    torch.testing.assert_close(module.acc_sum, acc)
    # MMDetection semantics: the state advances on every call, eval mode included.
    module.eval()
    before = module.acc_sum.clone()
    module(logits, targets)
    assert not torch.equal(before, module.acc_sum)
    module.to(torch.float64)
    assert module.acc_sum.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# DDP: counts are summed over processes
# ---------------------------------------------------------------------------------------------


def _ddp_reg_inputs():
    pred, target = _boxes(8, seed=7, dtype=torch.float32)
    g = torch.Generator().manual_seed(8)
    return pred, target, torch.rand(8, generator=g), torch.rand(8, generator=g)


def _ddp_worker(rank, world, init_file, out_dir, logits, targets, ious):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rows = slice(rank * logits.shape[0] // world, (rank + 1) * logits.shape[0] // world)
        x, t, u = logits[rows], targets[rows], ious[rows]
        beta, normaliser = L.ghm_beta((x.sigmoid() - t).abs(), bins=10, sync_counts=True)
        ghm = L.GHMCLoss(bins=10, momentum=0.75)
        hcra = L.HCRAClassificationLoss(bins=10, momentum=0.75)
        ghm_losses = [ghm(x, t) for _ in range(2)]
        hcra_losses = [hcra(x, t, u) for _ in range(2)]
        pred, target, score, h = _ddp_reg_inputs()
        half = slice(rank * pred.shape[0] // world, (rank + 1) * pred.shape[0] // world)
        reg = L.hcra_reg_loss(pred[half], target[half], score[half], h[half], gamma=0.5, sync_denominator=True)
        torch.save(
            dict(beta=beta, normaliser=normaliser, ghm=torch.stack(ghm_losses), hcra=torch.stack(hcra_losses),
                 ghm_acc=ghm.acc_sum, hcra_acc=hcra.acc_sum, reg=reg),
            Path(out_dir) / f"rank{rank}.pt",
        )  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_sync_counts_under_two_process_gloo(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    logits, targets, soft, *_ = _cls_inputs(n=24, c=3, seed=5, dtype=torch.float32)
    ious = soft + 0.3 * (1 - targets) * torch.rand(24, 3, generator=torch.Generator().manual_seed(1))
    world = 2
    mp.spawn(
        _ddp_worker, args=(world, str(tmp_path / "init"), str(tmp_path), logits, targets, ious), nprocs=world, join=True
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    # Single process on the whole batch (no process group: sync is a no-op).
    beta_full, total = L.ghm_beta((logits.sigmoid() - targets).abs(), bins=10)
    torch.testing.assert_close(torch.cat([r["beta"] for r in ranks]), beta_full)
    for r in ranks:
        torch.testing.assert_close(r["normaliser"], total / world)
    ghm = L.GHMCLoss(bins=10, momentum=0.75)
    hcra = L.HCRAClassificationLoss(bins=10, momentum=0.75)
    ghm_full = torch.stack([ghm(logits, targets) for _ in range(2)])
    hcra_full = torch.stack([hcra(logits, targets, ious) for _ in range(2)])
    # The mean of the per-rank losses (what DDP's gradient averaging optimises) is the full-batch loss.
    torch.testing.assert_close(sum(r["ghm"] for r in ranks) / world, ghm_full)
    torch.testing.assert_close(sum(r["hcra"] for r in ranks) / world, hcra_full)
    for r in ranks:
        torch.testing.assert_close(r["ghm_acc"], ghm.acc_sum)
        torch.testing.assert_close(r["hcra_acc"], hcra.acc_sum)
    # HCRA-R with the denominator Σ ρ·t·h averaged over ranks (§4): the mean is the full-batch loss.
    pred, target, score, h = _ddp_reg_inputs()
    reg_full = L.hcra_reg_loss(pred, target, score, h, gamma=0.5, sync_denominator=True)
    torch.testing.assert_close(sum(r["reg"] for r in ranks) / world, reg_full)


# ---------------------------------------------------------------------------------------------
# IoU family
# ---------------------------------------------------------------------------------------------

# (pred, target, IoU, GIoU, DIoU, EIoU): the hand-drawn pairs of test_ops_boxes.
PAIRS = [
    ((0, 0, 2, 2), (1, 1, 3, 3), 1 / 7, 1 / 7 - 2 / 9, 1 / 7 - 1 / 9, 1 / 7 - 1 / 9),
    ((0, 0, 4, 2), (0, 0, 2, 4), 1 / 3, 1 / 3 - 4 / 16, 1 / 3 - 2 / 32, 1 / 3 - 2 / 32 - 1 / 2),
    ((0, 0, 4, 4), (1, 1, 3, 3), 1 / 4, 1 / 4, 1 / 4, 1 / 4 - 1 / 2),
]


def test_box_losses_closed_form():
    pred = torch.tensor([p[0] for p in PAIRS], dtype=torch.float64)
    target = torch.tensor([p[1] for p in PAIRS], dtype=torch.float64)
    iou, giou, diou, eiou = (torch.tensor([p[k] for p in PAIRS], dtype=torch.float64) for k in range(2, 6))
    close = dict(rtol=0, atol=1e-9)
    torch.testing.assert_close(L.iou_loss(pred, target, reduction="none"), 1 - iou, **close)
    torch.testing.assert_close(L.iou_loss(pred, target, mode="square", reduction="none"), 1 - iou**2, **close)
    torch.testing.assert_close(L.iou_loss(pred, target, mode="log", reduction="none"), -iou.log(), **close)
    torch.testing.assert_close(L.giou_loss(pred, target, reduction="none"), 1 - giou, **close)
    torch.testing.assert_close(L.diou_loss(pred, target, reduction="none"), 1 - diou, **close)
    torch.testing.assert_close(L.eiou_loss(pred, target, reduction="none"), 1 - eiou, **close)
    torch.testing.assert_close(L.focal_eiou_loss(pred, target, reduction="none"), iou.sqrt() * (1 - eiou), **close)
    torch.testing.assert_close(L.focal_eiou_loss(pred, target, gamma=0.0), L.eiou_loss(pred, target), **close)
    v = 4 / math.pi**2 * (math.atan(0.5) - math.atan(2.0)) ** 2
    ciou = L.ciou_loss(pred, target, reduction="none")
    assert ciou[1].item() == pytest.approx(1 - (1 / 3 - 1 / 16) + v * v / (1 - 1 / 3 + v), abs=1e-7)
    torch.testing.assert_close(ciou[[0, 2]], (1 - diou)[[0, 2]], rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="mode must be one of"):
        L.iou_loss(pred, target, mode="cubic")


def test_iou_log_mode_is_finite_for_disjoint_boxes():
    pred = torch.tensor([[0.0, 0.0, 1.0, 1.0]], requires_grad=True)
    target = torch.tensor([[5.0, 5.0, 6.0, 6.0]])
    out = L.iou_loss(pred, target, mode="log")
    assert out.item() == pytest.approx(-math.log(1e-6), rel=1e-6)
    out.backward()
    assert torch.isfinite(pred.grad).all()


def _frozen_grad(loss_fn, pred):
    pred = pred.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss_fn(pred), pred)
    return grad


def test_ciou_gradient_holds_the_trade_off_constant():
    pred, target = _boxes(seed=2)
    t0 = B.aligned_box_terms(pred, target)
    v0 = B.ciou_aspect_from_terms(t0)
    a0 = v0 / (1 - t0.iou + v0)  # computed once, a constant below

    def reference(p):
        t = B.aligned_box_terms(p, target)
        return (1 - t.iou + B.diou_penalty_from_terms(t) + a0 * B.ciou_aspect_from_terms(t)).mean()

    torch.testing.assert_close(_frozen_grad(lambda p: L.ciou_loss(p, target), pred), _frozen_grad(reference, pred))


def test_focal_eiou_gradient_holds_the_iou_weight_constant():
    pred, target = _boxes(seed=3)
    weight = B.aligned_iou(pred, target).pow(0.5)
    torch.testing.assert_close(
        _frozen_grad(lambda p: L.focal_eiou_loss(p, target), pred),
        _frozen_grad(lambda p: L.eiou_loss(p, target, weight=weight), pred),
    )


# ---------------------------------------------------------------------------------------------
# gradcheck (float64)
# ---------------------------------------------------------------------------------------------


def _logits_away_from_ghm_edges(n, c, bins, *, seed):
    """Logits whose g = |σ(x) - p*| sits inside a bin (>= 0.2/bins from every edge), so the piecewise
    constant β does not jump under gradcheck's finite differences."""
    g_gen = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, c, generator=g_gen) < 0.3).double()
    k = torch.randint(0, bins, (n, c), generator=g_gen).double()
    g = (k + 0.2 + 0.6 * torch.rand(n, c, generator=g_gen, dtype=torch.float64)) / bins
    p = torch.where(targets > 0, 1 - g, g)
    return torch.logit(p), targets


@pytest.mark.parametrize("name", sorted(CLS_LOSSES))
def test_gradcheck_cls_losses(name):
    logits, targets = _logits_away_from_ghm_edges(6, 3, 10, seed=7)
    soft = targets * torch.rand(6, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: _cls_call(name, z, targets, soft, reduction="sum"), (x,))
    assert torch.autograd.gradcheck(lambda z: _cls_call(name, z, targets, soft, reduction="none"), (x,))


@pytest.mark.parametrize("name", ["iou_loss", "giou_loss", "diou_loss", "eiou_loss"])
def test_gradcheck_box_losses(name):
    pred, target = _boxes(p=4, seed=11)
    x = pred.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: BOX_LOSSES[name](z, target, reduction="none"), (x,))
    if name == "iou_loss":
        for mode in ("square", "log"):
            assert torch.autograd.gradcheck(lambda z, m=mode: L.iou_loss(z, target, mode=m), (x,))


def test_gradcheck_ciou_and_focal_eiou_where_their_constants_are_locally_constant():
    # CIoU's trade-off a is 0 to second order at equal aspect ratios; Focal-EIoU's IoU^γ is 1 at γ = 0.
    # Elsewhere their stop-gradients make finite differences disagree by design (tests above).
    target = torch.tensor([[2.0, 3.0, 10.0, 7.0], [0.0, 0.0, 6.0, 6.0]], dtype=torch.float64)
    pred = torch.tensor([[3.0, 2.5, 11.0, 6.5], [1.0, -1.0, 7.0, 5.0]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: L.ciou_loss(z, target, reduction="none"), (pred,))
    assert torch.autograd.gradcheck(lambda z: L.focal_eiou_loss(z, target, gamma=0.0), (pred,))


# ---------------------------------------------------------------------------------------------
# Edge cases: empty, extreme logits, degenerate boxes, half precision
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CLS_LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empty_cls_input_gives_a_zero_in_the_graph(name, reduction):
    logits = torch.zeros(0, 4, requires_grad=True)
    targets = torch.zeros(0, 4)
    out = _cls_call(name, logits, targets, targets, reduction=reduction)
    assert out.shape == () and out.item() == 0.0 and out.requires_grad
    out.backward()
    assert logits.grad is not None and logits.grad.shape == (0, 4)


@pytest.mark.parametrize("name", sorted(BOX_LOSSES))
def test_empty_box_input_gives_a_zero_in_the_graph(name):
    pred = torch.zeros(0, 4, requires_grad=True)
    out = BOX_LOSSES[name](pred, torch.zeros(0, 4))
    assert out.shape == () and out.item() == 0.0 and out.requires_grad
    out.backward()
    assert BOX_LOSSES[name](pred, torch.zeros(0, 4), reduction="none").shape == (0,)


@pytest.mark.parametrize("name", sorted(CLS_LOSSES))
def test_extreme_logits_are_finite(name):
    logits = torch.tensor([[100.0, -100.0], [-100.0, 100.0], [100.0, 100.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    soft = targets * 0.8
    out = _cls_call(name, logits, targets, soft)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(logits.grad).all()
    # Confidently wrong elements (x = -100 for a positive, +100 for a negative) cost ~100 nats, not inf.
    assert out.item() > 1.0


def test_all_negative_targets():
    logits = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    zeros = torch.zeros(8, 3)
    for name in CLS_LOSSES:
        out = _cls_call(name, logits, zeros, zeros)
        (grad,) = torch.autograd.grad(out, logits)
        assert torch.isfinite(out) and out.item() > 0 and torch.isfinite(grad).all()
        assert (grad > 0).all()  # every logit is pushed down


@pytest.mark.parametrize("name", sorted(BOX_LOSSES))
def test_box_losses_on_degenerate_boxes(name):
    pred = torch.tensor(
        [[2.0, 3.0, 8.0, 9.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 1.0, 4.0]], requires_grad=True
    )
    target = torch.tensor([[2.0, 3.0, 8.0, 9.0], [5.0, 5.0, 5.0, 5.0], [10.0, 10.0, 12.0, 14.0], [0.0, 0.0, 2.0, 2.0]])
    out = BOX_LOSSES[name](pred, target, reduction="none")
    assert torch.isfinite(out).all() and (out >= -1e-6).all()
    assert out[0].item() == pytest.approx(0.0, abs=1e-6)  # identical boxes cost nothing
    out.sum().backward()
    assert torch.isfinite(pred.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CLS_LOSSES))
def test_half_precision_cls(dtype, name):
    logits, targets, soft, *_ = _cls_inputs(dtype=torch.float32)
    x = logits.to(dtype).requires_grad_()
    out = _cls_call(name, x, targets.to(dtype), soft.to(dtype))
    assert out.dtype == torch.float32 and torch.isfinite(out)
    reference = _cls_call(name, x.detach().float(), targets.to(dtype).float(), soft.to(dtype).float())
    torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-7)
    out.backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(BOX_LOSSES))
def test_half_precision_boxes(dtype, name):
    pred, target = _boxes(dtype=torch.float32)
    p = (pred * 20).to(dtype).requires_grad_()  # up to ~900 px: areas overflow fp16
    t = (target * 20).to(dtype)
    out = BOX_LOSSES[name](p, t)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    torch.testing.assert_close(out, BOX_LOSSES[name](p.detach().float(), t.float()))
    out.backward()
    assert p.grad.dtype == dtype and torch.isfinite(p.grad.float()).all()


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


def test_modules_match_functions():
    logits, targets, soft, *_ = _cls_inputs()
    pred, target = _boxes()
    w = torch.rand(6, dtype=torch.float64)
    pairs = [
        (L.SigmoidFocalLoss(loss_weight=2.0), L.sigmoid_focal_loss(logits, targets), (logits, targets)),
        (L.QualityFocalLoss(loss_weight=2.0), L.quality_focal_loss(logits, soft), (logits, soft)),
        (L.VarifocalLoss(loss_weight=2.0), L.varifocal_loss(logits, soft), (logits, soft)),
        (L.GHMCLoss(loss_weight=2.0), L.ghmc_loss(logits, targets), (logits, targets)),
        (L.IoULoss(mode="log", loss_weight=2.0), L.iou_loss(pred, target, mode="log"), (pred, target)),
        (L.GIoULoss(loss_weight=2.0), L.giou_loss(pred, target), (pred, target)),
        (L.DIoULoss(loss_weight=2.0), L.diou_loss(pred, target), (pred, target)),
        (L.CIoULoss(loss_weight=2.0), L.ciou_loss(pred, target), (pred, target)),
        (L.EIoULoss(loss_weight=2.0), L.eiou_loss(pred, target), (pred, target)),
        (L.FocalEIoULoss(loss_weight=2.0), L.focal_eiou_loss(pred, target), (pred, target)),
    ]
    for module, expected, args in pairs:
        torch.testing.assert_close(module(*args), 2.0 * expected, msg=type(module).__name__)
    torch.testing.assert_close(
        L.GIoULoss(reduction="sum")(pred, target, w, avg_factor=None),
        L.giou_loss(pred, target, weight=w, reduction="sum"),
    )
    torch.testing.assert_close(L.GIoULoss()(pred, target, avg_factor=3.0), L.giou_loss(pred, target, avg_factor=3.0))
    with pytest.raises(ValueError, match="SigmoidFocalLoss: reduction"):
        L.SigmoidFocalLoss(reduction="avg")
    with pytest.raises(ValueError, match="GIoULoss: reduction"):
        L.GIoULoss(reduction="avg")
