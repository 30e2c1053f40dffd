"""HCRA-C and HCRA-R against the formulation (§2-§4): closed forms, reductions, gradients, edge cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hcral import losses as L
from hcral.defaults import HCRA_THETA
from hcral.ops import boxes as B


def _sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def _cls_inputs(n=16, c=4, *, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=dtype) * 2
    targets = (torch.rand(n, c, generator=g) < 0.25).to(dtype)
    ious = torch.rand(n, c, generator=g, dtype=dtype)
    return logits, targets, ious


def _logits_away_from_ghm_edges(n, c, bins, *, seed):
    """Logits whose g = |σ(x) - p*| is >= 0.2/bins from every GHM edge (β locally constant)."""
    gen = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, c, generator=gen) < 0.3).double()
    k = torch.randint(0, bins, (n, c), generator=gen).double()
    g = (k + 0.2 + 0.6 * torch.rand(n, c, generator=gen, dtype=torch.float64)) / bins
    return torch.logit(torch.where(targets > 0, 1 - g, g)), targets


def _boxes(p=8, *, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(p, 2, generator=g, dtype=dtype) * 20
    wh = torch.rand(p, 2, generator=g, dtype=dtype) * 20 + 5
    target = torch.cat((xy, xy + wh), dim=1)
    pred = target + torch.randn(p, 4, generator=g, dtype=dtype) * 2.5
    pred = torch.cat((pred[:, :2], torch.maximum(pred[:, 2:], pred[:, :2] + 1)), dim=1)
    scores = torch.rand(p, generator=g, dtype=dtype)
    h = torch.rand(p, generator=g, dtype=dtype) + 0.1
    return pred, target, scores, h


# ---------------------------------------------------------------------------------------------
# §2 RCI
# ---------------------------------------------------------------------------------------------


def test_rci_sign_convention():
    scores = torch.tensor([0.9, 0.5, 0.2])
    ious = torch.tensor([0.5, 0.6, 0.3])
    # r = p - u - α with α = -0.1: 0.5, 0.0, 0.0 -> the boundary is score = IoU + α.
    torch.testing.assert_close(L.rci(scores, ious, alpha=-0.1), torch.tensor([0.5, 0.0, 0.0]), atol=1e-6, rtol=0)
    assert not L.rci(scores.requires_grad_(), ious).requires_grad
    assert L.rci(scores.half(), ious.half()).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# §3 HCRA-C: weights
# ---------------------------------------------------------------------------------------------


def _weights_at(p, p_star, u, **kw):
    logits = torch.logit(torch.tensor([[p]], dtype=torch.float64))
    return L.cls_weights(
        logits, torch.tensor([[p_star]], dtype=torch.float64), torch.tensor([[u]], dtype=torch.float64), **kw
    )


def test_omega_hand_values():
    # §3: ω = 1 + (2p* - 1)·u·(u - μ)². u = 0.8, μ = 0.5: u(u - μ)² = 0.8 · 0.09 = 0.072.
    assert _weights_at(0.3, 0.0, 0.8, mu=0.5)[1].item() == pytest.approx(0.928, abs=1e-12)
    assert _weights_at(0.3, 1.0, 0.8, mu=0.5)[1].item() == pytest.approx(1.072, abs=1e-12)
    # Null points u = 0 and u = μ.
    for p_star in (0.0, 1.0):
        assert _weights_at(0.3, p_star, 0.0)[1].item() == 1.0
        assert _weights_at(0.3, p_star, 0.35, mu=0.35)[1].item() == pytest.approx(1.0, abs=1e-15)
    # μ = 0, u = 1: the extremes 0 and 2.
    assert _weights_at(0.3, 0.0, 1.0, mu=0.0)[1].item() == pytest.approx(0.0, abs=1e-15)
    assert _weights_at(0.3, 1.0, 1.0, mu=0.0)[1].item() == pytest.approx(2.0, abs=1e-15)


def test_w_hand_values():
    # Negative, p = 0.6, u = 0.3, α = -0.1: r = 0.4, s = +1, w = 2σ(θ·0.4) with θ = 2.
    assert _weights_at(0.6, 0.0, 0.3, theta=2.0)[2].item() == pytest.approx(2 * _sigmoid(0.8), abs=1e-12)
    # The same point as a positive: s = -1.
    assert _weights_at(0.6, 1.0, 0.3, theta=2.0)[2].item() == pytest.approx(2 * _sigmoid(-0.8), abs=1e-12)
    # θ = 3, α = 0.05, positive at p = 0.2, u = 0.9: r = -0.75, w = 2σ(2.25).
    w = _weights_at(0.2, 1.0, 0.9, theta=3.0, alpha=0.05)[2].item()
    assert w == pytest.approx(2 * _sigmoid(2.25), abs=1e-12)


def test_w_is_one_for_theta_zero_and_on_the_boundary():
    logits, targets, ious = _cls_inputs()
    _, _, w = L.cls_weights(logits, targets, ious, theta=0.0)
    assert w.eq(1).all()
    # On the boundary p = u + α, w = 1 for both labels.
    for p_star in (0.0, 1.0):
        assert _weights_at(0.5, p_star, 0.6, alpha=-0.1)[2].item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    "p, p_star, u, amplified",
    [
        (0.7, 0.0, 0.2, True),  # negative in region 1 (p > u + α): confident false positive, pushed harder
        (0.1, 0.0, 0.6, False),  # negative in region 2: damped
        (0.3, 1.0, 0.9, True),  # positive in region 2 (score lags its IoU): pushed harder
        (0.95, 1.0, 0.3, False),  # positive in region 1: damped
    ],
)
def test_w_region_behaviour(p, p_star, u, amplified):
    w = _weights_at(p, p_star, u)[2].item()
    assert (w > 1) if amplified else (w < 1)
    assert 0 < w < 2


def test_weight_ranges_and_detachment():
    logits, targets, ious = _cls_inputs(n=64, c=5, seed=1)
    x = logits.clone().requires_grad_()
    u = ious.clone().requires_grad_()
    for mu in (0.0, 0.3, 0.5, 1.0):
        beta, omega, w = L.cls_weights(x, targets, u, mu=mu)
        assert (omega >= 0).all() and (omega <= 2).all()
        assert (w > 0).all() and (w < 2).all()
        assert (beta > 0).all()
        assert not (beta.requires_grad or omega.requires_grad or w.requires_grad)
    beta, omega, w = L.cls_weights(x, targets, u, use_rci=False, use_cf=False)
    assert omega.eq(1).all() and w.eq(1).all()
    with pytest.raises(ValueError, match=r"mu must be in \[0, 1\]"):
        L.cls_weights(x, targets, u, mu=1.5)


def test_cls_weights_invalid_priors_get_zero_beta():
    logits, targets, ious = _cls_inputs()
    valid = torch.arange(16) % 2 == 0
    beta, _, _ = L.cls_weights(logits, targets, ious, valid)
    assert beta[~valid].eq(0).all() and (beta[valid] > 0).all()


# ---------------------------------------------------------------------------------------------
# §3 HCRA-C: the loss
# ---------------------------------------------------------------------------------------------


def test_hcra_cls_equals_formula():
    logits, targets, ious = _cls_inputs(seed=2)
    valid = torch.arange(16) % 5 != 0
    beta, omega, w = L.cls_weights(logits, targets, ious, valid)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    expected = (beta * omega * w * bce)[valid].sum() / (valid.sum() * 4)
    torch.testing.assert_close(L.hcra_cls_loss(logits, targets, ious, valid), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("use_valid", [False, True])
def test_hcra_cls_without_modules_is_ghmc_exactly(use_valid):
    logits, targets, ious = _cls_inputs(seed=3)
    valid = torch.arange(16) % 3 != 0 if use_valid else None
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    hcra = L.hcra_cls_loss(x1, targets, ious, valid, use_rci=False, use_cf=False, bins=7)
    ghm = L.ghmc_loss(x2, targets, valid, bins=7)
    assert torch.equal(hcra, ghm)
    hcra.backward()
    ghm.backward()
    assert torch.equal(x1.grad, x2.grad)
    # θ = 0 with use_cf=False is the same reduction.
    assert torch.equal(L.hcra_cls_loss(logits, targets, ious, valid, theta=0.0, use_cf=False, bins=7), ghm.detach())


def test_hcra_cls_module_equals_ghmc_module_with_momentum():
    hcra = L.HCRAClassificationLoss(momentum=0.75, bins=10, use_rci=False, use_cf=False, loss_weight=1.5)
    ghm = L.GHMCLoss(momentum=0.75, bins=10, loss_weight=1.5)
    for call in range(3):
        logits, targets, ious = _cls_inputs(seed=10 + call, dtype=torch.float32)
        assert torch.equal(hcra(logits, targets, ious), ghm(logits, targets))
    assert torch.equal(hcra.acc_sum, ghm.acc_sum)


def test_hcra_cls_module_state_and_repr():
    module = L.HCRAClassificationLoss()
    assert module.momentum == 0.75 and module.acc_sum.shape == (10,)
    assert "acc_sum" in module.state_dict()
    logits, targets, ious = _cls_inputs(dtype=torch.float32)
    module(logits, targets, ious)
    restored = L.HCRAClassificationLoss()
    restored.load_state_dict(module.state_dict())
    assert torch.equal(restored.acc_sum, module.acc_sum) and module.acc_sum.sum() > 0
    # Without momentum the module is the function.
    plain = L.HCRAClassificationLoss(momentum=0.0, loss_weight=2.0)
    torch.testing.assert_close(plain(logits, targets, ious), 2.0 * L.hcra_cls_loss(logits, targets, ious))
    assert f"theta={HCRA_THETA}" in repr(module)


def test_hcra_cls_gradient_treats_weights_as_constants():
    # ∂L/∂x = β·ω·w·(σ(x) - p*) / T with the weights held fixed (they are detached, §1).
    logits, targets, ious = _cls_inputs(seed=4)
    valid = torch.arange(16) % 4 != 0
    x = logits.clone().requires_grad_()
    (grad,) = torch.autograd.grad(L.hcra_cls_loss(x, targets, ious, valid), x)
    beta, omega, w = L.cls_weights(logits, targets, ious, valid)
    expected = beta * omega * w * (logits.sigmoid() - targets) / (valid.sum() * 4)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)
    # No gradient reaches the IoUs.
    u = ious.clone().requires_grad_()
    (none,) = torch.autograd.grad(L.hcra_cls_loss(x, targets, u), u, allow_unused=True)
    assert none is None


@pytest.mark.parametrize(
    "config",
    [dict(use_rci=False, use_cf=False), dict(use_rci=False, use_cf=True), dict(theta=0.0, use_cf=True)],
    ids=["ghm", "cf", "theta0"],
)
def test_gradcheck_hcra_cls(config):
    # Finite differences see the detached weights move unless they are locally constant: β is,
    # away from the bin edges; ω depends on u only; w is constant for θ = 0 or use_rci=False. The
    # general case is the closed-form gradient test above.
    logits, targets = _logits_away_from_ghm_edges(6, 3, 10, seed=5)
    ious = torch.rand(6, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    valid = torch.tensor([True, True, False, True, True, True])
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: L.hcra_cls_loss(z, targets, ious, valid, **config), (x,))


def test_hcra_cls_edge_cases():
    # Empty input: a zero in the graph.
    x = torch.zeros(0, 3, requires_grad=True)
    out = L.hcra_cls_loss(x, torch.zeros(0, 3), torch.zeros(0, 3))
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    module_out = L.HCRAClassificationLoss()(x, torch.zeros(0, 3), torch.zeros(0, 3))
    assert module_out.item() == 0.0 and module_out.requires_grad
    # A mask that excludes everything: T clamps to 1, the loss is a finite zero.
    logits, targets, ious = _cls_inputs(dtype=torch.float32)
    x = logits.clone().requires_grad_()
    out = L.hcra_cls_loss(x, targets, ious, torch.zeros(16, dtype=torch.bool))
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(x.grad).all() and x.grad.eq(0).all()
    # All-negative targets.
    out = L.hcra_cls_loss(logits, torch.zeros_like(targets), ious)
    assert torch.isfinite(out) and out.item() > 0
    # Logits of ±100.
    x = torch.tensor([[100.0, -100.0], [-100.0, 100.0]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    u = torch.tensor([[0.9, 0.1], [0.2, 0.95]])
    out = L.hcra_cls_loss(x, t, u)
    out.backward()
    assert torch.isfinite(out) and out.item() > 1.0 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hcra_cls_half_precision(dtype):
    logits, targets, ious = _cls_inputs(dtype=torch.float32)
    x = logits.to(dtype).requires_grad_()
    out = L.hcra_cls_loss(x, targets.to(dtype), ious.to(dtype))
    assert out.dtype == torch.float32
    reference = L.hcra_cls_loss(x.detach().float(), targets, ious.to(dtype).float())
    torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-7)
    out.backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


def test_hcra_cls_input_errors():
    logits, targets, ious = _cls_inputs()
    with pytest.raises(ValueError, match=r"hcra_cls_loss: ious must have shape \(16, 4\)"):
        L.hcra_cls_loss(logits, targets, ious[:, :2])
    with pytest.raises(ValueError, match=r"hcra_cls_loss: valid must have shape \(16,\)"):
        L.hcra_cls_loss(logits, targets, ious, torch.ones(16, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"logits must be \(N, C\)"):
        L.hcra_cls_loss(logits.flatten(), targets.flatten(), ious.flatten())
    with pytest.raises(ValueError, match="bins must be a positive int"):
        L.HCRAClassificationLoss(bins=0)


# ---------------------------------------------------------------------------------------------
# §4 HCRA-R
# ---------------------------------------------------------------------------------------------


def test_rho_and_t_closed_form():
    # pred (0,0,2,2), target (1,1,3,3): q = 1/7, R = ρ²/c² = 2/18 = 1/9.
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0]], dtype=torch.float64)
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0]], dtype=torch.float64)
    s = torch.tensor([0.9], dtype=torch.float64)
    rho, t = L.reg_weights(pred, target, s, alpha=-0.1, ep=1.0, gamma=0.5)
    assert rho.item() == pytest.approx((0.9 + 0.1 + 1.0) / (1 / 7 + 1.0), abs=1e-12)  # = 1.75
    assert t.item() == pytest.approx((1 - 1 / 7 + 1 / 9) ** 0.5, abs=1e-12)
    rho, t = L.reg_weights(pred, target, s, alpha=0.2, ep=0.5, gamma=2.0)
    assert rho.item() == pytest.approx((0.9 - 0.2 + 0.5) / (1 / 7 + 0.5), abs=1e-12)
    assert t.item() == pytest.approx((1 - 1 / 7 + 1 / 9) ** 2, abs=1e-12)
    # γ = 0 -> t ≡ 1; switches give ones.
    assert L.reg_weights(pred, target, s, gamma=0.0)[1].item() == 1.0
    rho, t = L.reg_weights(pred, target, s, gamma=0.5, use_rci=False, use_cf=False)
    assert rho.item() == 1.0 and t.item() == 1.0


def test_rho_bounds_and_regions():
    alpha, ep = -0.1, 1.0
    s = torch.linspace(0, 1, 21, dtype=torch.float64)
    # Boxes with IoU q = k/20 against the unit-height target: pred (0,0,k/20·10,1), target (0,0,10,1).
    q = torch.linspace(0, 1, 21, dtype=torch.float64)
    target = torch.tensor([[0.0, 0.0, 10.0, 1.0]], dtype=torch.float64).expand(21, 4)
    pred = torch.stack((torch.zeros(21), torch.zeros(21), q * 10, torch.ones(21)), dim=1).double()
    torch.testing.assert_close(B.aligned_iou(pred, target), q, rtol=0, atol=1e-7)
    low, high = (-alpha + ep) / (1 + ep), (1 - alpha + ep) / ep
    for i in range(21):
        rho, _ = L.reg_weights(pred, target, s[i].expand(21), alpha=alpha, ep=ep)
        assert (rho >= low - 1e-7).all() and (rho <= high + 1e-7).all()
        r = L.rci(s[i].expand(21), B.aligned_iou(pred, target), alpha=alpha)
        # ρ > 1 exactly in region 1 (r > 0), ρ < 1 in region 2 (away from the boundary).
        assert (rho[r > 1e-9] > 1).all() and (rho[r < -1e-9] < 1).all()
    # The bounds are attained at (s, q) = (0, 1) and (1, 0).
    rho, _ = L.reg_weights(pred[[20, 0]], target[:2], torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(rho, torch.tensor([low, high], dtype=torch.float64), rtol=0, atol=1e-6)


def test_t_weighs_harder_boxes_more():
    target = torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float64).expand(4, 4)
    shift = torch.tensor([0.0, 1.0, 3.0, 6.0], dtype=torch.float64)[:, None]
    pred = target + torch.cat((shift, shift, shift, shift), dim=1)
    _, t = L.reg_weights(pred, target, torch.full((4,), 0.5, dtype=torch.float64), gamma=0.5)
    assert t[0].item() == pytest.approx(0.0, abs=1e-9)  # perfect box: 1 - 1 + 0
    assert (t.diff() > 0).all()


def test_hcra_reg_equals_formula_and_reductions():
    pred, target, scores, h = _boxes(seed=1)
    rho, t = L.reg_weights(pred, target, scores, gamma=0.5)
    giou = 1 - B.aligned_giou(pred, target)
    expected = (rho * t * h * giou).sum() / (rho * t * h).sum()
    torch.testing.assert_close(L.hcra_reg_loss(pred, target, scores, h, gamma=0.5), expected, rtol=1e-12, atol=0)
    # use_rci=False with γ = 0 (or use_cf=False): the h-weighted GIoU loss normalised by Σh.
    giou_h = L.giou_loss(pred, target, weight=h, reduction="sum") / h.sum()
    torch.testing.assert_close(L.hcra_reg_loss(pred, target, scores, h, use_rci=False, gamma=0.0), giou_h)
    torch.testing.assert_close(L.hcra_reg_loss(pred, target, scores, h, use_rci=False, use_cf=False, gamma=0.5), giou_h)
    # weight=None is h ≡ 1: the mean GIoU loss.
    torch.testing.assert_close(L.hcra_reg_loss(pred, target, scores, use_rci=False), L.giou_loss(pred, target))
    # The weights are not a no-op otherwise.
    assert not torch.allclose(L.hcra_reg_loss(pred, target, scores, h, gamma=0.5), giou_h)
    # avg_factor replaces Σ ρ·t·h.
    numerator = (rho * t * h * giou).sum()
    torch.testing.assert_close(L.hcra_reg_loss(pred, target, scores, h, gamma=0.5, avg_factor=3.0), numerator / 3)
    torch.testing.assert_close(
        L.hcra_reg_loss(pred, target, scores, h, gamma=0.5, avg_factor=torch.tensor(3.0)), numerator / 3
    )


def test_hcra_reg_weights_carry_no_gradient():
    pred, target, scores, h = _boxes(seed=2)
    rho, t = L.reg_weights(pred.requires_grad_(), target, scores.requires_grad_(), gamma=0.5)
    assert not rho.requires_grad and not t.requires_grad
    p = pred.detach().clone().requires_grad_()
    s = scores.detach().clone().requires_grad_()
    w = h.clone().requires_grad_()
    loss = L.hcra_reg_loss(p, target, s, w, gamma=0.5)
    grad_p, grad_s, grad_w = torch.autograd.grad(loss, (p, s, w), allow_unused=True)
    assert grad_s is None and grad_w is None and grad_p is not None
    # The gradient is that of Σ ρ·t·h·L_GIoU / Σ ρ·t·h with ρ, t held fixed.
    rho, t = L.reg_weights(pred.detach(), target, scores.detach(), gamma=0.5)
    q = pred.detach().clone().requires_grad_()
    reference = (rho * t * h * (1 - B.aligned_giou(q, target))).sum() / (rho * t * h).sum()
    (grad_ref,) = torch.autograd.grad(reference, q)
    torch.testing.assert_close(grad_p, grad_ref, rtol=1e-12, atol=1e-15)


def test_gradcheck_hcra_reg():
    # ρ and t depend on the predicted box through the detached q; with use_rci=False and γ = 0 they
    # are constant and finite differences agree (the general case is the test above).
    pred, target, scores, h = _boxes(p=4, seed=3)
    x = pred.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: L.hcra_reg_loss(z, target, scores, h, use_rci=False), (x,))
    assert torch.autograd.gradcheck(
        lambda z: L.hcra_reg_loss(z, target, scores, h, use_cf=False, use_rci=False, gamma=0.5), (x,)
    )


def test_hcra_reg_edge_cases():
    # No positives: a zero in the graph.
    pred = torch.zeros(0, 4, requires_grad=True)
    out = L.hcra_reg_loss(pred, torch.zeros(0, 4), torch.zeros(0))
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert pred.grad.shape == (0, 4)
    # Every h = 0: 0 / eps = 0, finite.
    p, t_boxes, s, _ = _boxes(p=3, dtype=torch.float32)
    x = p.clone().requires_grad_()
    out = L.hcra_reg_loss(x, t_boxes, s, torch.zeros(3))
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(x.grad).all()
    # Identical, zero-area and disjoint boxes, with γ > 0 (t = 0 for the identical pair).
    x = torch.tensor([[2.0, 3.0, 8.0, 9.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 1.0, 1.0]], requires_grad=True)
    g = torch.tensor([[2.0, 3.0, 8.0, 9.0], [5.0, 5.0, 5.0, 5.0], [10.0, 10.0, 12.0, 14.0]])
    for gamma in (0.0, 0.5, 2.0):
        out = L.hcra_reg_loss(x, g, torch.tensor([0.9, 0.5, 0.1]), gamma=gamma)
        (grad,) = torch.autograd.grad(out, x)
        assert torch.isfinite(out) and torch.isfinite(grad).all()
    # Only an identical pair with γ > 0: Σ ρ·t·h = 0, guarded by eps -> 0.
    out = L.hcra_reg_loss(x[:1], g[:1], torch.tensor([0.9]), gamma=0.5)
    assert out.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hcra_reg_half_precision(dtype):
    pred, target, scores, h = _boxes(dtype=torch.float32)
    p = (pred * 20).to(dtype).requires_grad_()
    out = L.hcra_reg_loss(p, (target * 20).to(dtype), scores.to(dtype), h.to(dtype), gamma=0.5)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    reference = L.hcra_reg_loss(
        p.detach().float(), (target * 20).to(dtype).float(), scores.to(dtype).float(), h.to(dtype).float(), gamma=0.5
    )
    torch.testing.assert_close(out, reference)
    out.backward()
    assert p.grad.dtype == dtype and torch.isfinite(p.grad.float()).all()


def test_hcra_reg_module_and_errors():
    pred, target, scores, h = _boxes()
    module = L.HCRARegressionLoss(gamma=0.5, loss_weight=2.0)
    torch.testing.assert_close(module(pred, target, scores, h), 2 * L.hcra_reg_loss(pred, target, scores, h, gamma=0.5))
    torch.testing.assert_close(
        module(pred, target, scores, h, avg_factor=2.0),
        2 * L.hcra_reg_loss(pred, target, scores, h, gamma=0.5, avg_factor=2.0),
    )
    assert "gamma=0.5" in repr(module)
    with pytest.raises(ValueError, match="ep must be > 0"):
        L.hcra_reg_loss(pred, target, scores, ep=0.0)
    with pytest.raises(ValueError, match="alpha must be < ep"):
        L.HCRARegressionLoss(alpha=1.5, ep=1.0)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        L.reg_weights(pred, target, scores, gamma=-1.0)
    with pytest.raises(ValueError, match=r"hcra_reg_loss: scores must have shape \(8,\)"):
        L.hcra_reg_loss(pred, target, scores[:3])
    with pytest.raises(ValueError, match=r"hcra_reg_loss: pred_boxes must be \(P, 4\)"):
        L.hcra_reg_loss(pred[:, :3], target[:, :3], scores)
    with pytest.raises(ValueError, match=r"hcra_reg_loss: weight must have shape \(8,\)"):
        L.hcra_reg_loss(pred, target, scores, h[:2])
    with pytest.raises(ValueError, match="eps must be > 0"):
        L.hcra_reg_loss(pred, target, scores, eps=0.0)


# ---- §3b (RCI and CF on a focal base) and §3c (scale-preserving weights) ---------------------


@pytest.mark.parametrize("use_valid", [False, True])
def test_focal_base_without_modules_is_focal_loss_exactly(use_valid):
    # §3b reduction: ω ≡ 1 and w ≡ 1 give focal loss, values and gradients, with the head's
    # per-prior valid mask and num_pos.
    logits, targets, ious = _cls_inputs(seed=21)
    valid = torch.arange(16) % 3 != 0 if use_valid else None
    num_pos = torch.tensor(5.0, dtype=torch.float64)
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = L.hcra_cls_loss(x1, targets, ious, valid, base="focal", use_rci=False, use_cf=False, avg_factor=num_pos)
    weight = None if valid is None else valid.double()
    focal = L.sigmoid_focal_loss(x2, targets, weight=weight, avg_factor=num_pos)
    assert torch.equal(ours, focal)
    ours.backward()
    focal.backward()
    assert torch.equal(x1.grad, x2.grad)
    # θ = 0 with use_cf=False is the same reduction, and so is §3c on top of it (ŵ of 1 is 1).
    for kw in (dict(theta=0.0, use_cf=False), dict(theta=0.0, use_cf=False, normalize=True)):
        again = L.hcra_cls_loss(logits, targets, ious, valid, base="focal", avg_factor=num_pos, **kw)
        torch.testing.assert_close(again, focal.detach(), rtol=1e-15, atol=0)


def test_focal_base_equals_formula_and_default_normaliser():
    logits, targets, ious = _cls_inputs(seed=22)
    valid = torch.arange(16) % 5 != 0
    _, omega, w = L.cls_weights(logits, targets, ious, valid)
    p = logits.sigmoid()
    p_t = torch.where(targets > 0, p, 1 - p)
    a = 0.3 * targets + 0.7 * (1 - targets)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    num_pos = (targets * valid[:, None]).sum()  # the default: valid positive elements
    expected = (a * (1 - p_t) ** 1.5 * omega * w * bce)[valid].sum() / num_pos
    got = L.hcra_cls_loss(logits, targets, ious, valid, base="focal", focal_alpha=0.3, focal_gamma=1.5)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    # The gradient treats ω·w as constants and keeps focal loss's own modulating-factor gradient.
    x = logits.clone().requires_grad_()
    (grad,) = torch.autograd.grad(L.hcra_cls_loss(x, targets, ious, valid, base="focal"), x)
    y = logits.clone().requires_grad_()
    fl = L.sigmoid_focal_loss(y, targets, weight=omega * w * valid[:, None], avg_factor=num_pos)
    (expected_grad,) = torch.autograd.grad(fl, y)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-15)


def test_focal_base_module_and_names():
    logits, targets, ious = _cls_inputs(seed=23, dtype=torch.float32)
    module = L.HCRAClassificationLoss(base="focal", loss_weight=2.0)
    torch.testing.assert_close(
        module(logits, targets, ious, avg_factor=4.0), 2.0 * L.hcra_cls_loss(logits, targets, ious, base="focal", avg_factor=4.0)
    )
    assert module.acc_sum.sum() == 0  # the GHM state is not touched by the focal base
    assert module.name == "RCI+CF on focal loss" and "base='focal'" in repr(module)
    assert L.HCRAClassificationLoss().name == "HCRA-C"
    assert L.HCRAClassificationLoss(normalize=True).name == "HCRA-C, scale-preserving"
    with pytest.raises(ValueError, match="avg_factor belongs to the focal base"):
        L.HCRAClassificationLoss()(logits, targets, ious, avg_factor=4.0)
    with pytest.raises(ValueError, match="base must be one of"):
        L.HCRAClassificationLoss(base="bce")
    with pytest.raises(ValueError, match="only HCRA-C on its GHM-C base"):
        L.FusedHCRAClassificationLoss(base="focal")


@pytest.mark.parametrize("base", ["ghm", "focal"])
def test_scale_preserving_weights(base):
    # §3c: ŵ = ω·w / mean over its group's valid elements, so each non-empty group's mean is 1.
    logits, targets, ious = _cls_inputs(n=40, seed=24)
    valid = torch.arange(40) % 7 != 0
    _, omega, w = L.cls_weights(logits, targets, ious, valid)
    m = omega * w
    v = valid[:, None].expand_as(m)
    pos, neg = (targets > 0) & v, (targets == 0) & v
    w_hat = torch.where(targets > 0, m / m[pos].mean(), m / m[neg].mean())
    torch.testing.assert_close(w_hat[pos].mean(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(w_hat[neg].mean(), torch.tensor(1.0, dtype=torch.float64))
    beta, _, _ = L.cls_weights(logits, targets, ious, valid, use_rci=False, use_cf=False)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if base == "ghm":
        expected = (beta * w_hat * bce)[valid].sum() / (valid.sum() * 4)
    else:
        p_t = torch.where(targets > 0, logits.sigmoid(), 1 - logits.sigmoid())
        a = torch.where(targets > 0, 0.25, 0.75)
        expected = (a * (1 - p_t) ** 2 * w_hat * bce)[valid].sum() / pos.sum()
    got = L.hcra_cls_loss(logits, targets, ious, valid, base=base, normalize=True)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_scale_preserving_constant_weights_and_empty_groups():
    # Constant ω·w (u = 0 makes ω = 1; θ = 0 makes w = 1, scaled here by hand) gives ŵ ≡ 1, so the
    # loss is the base loss; a group without elements (no positives) keeps its weights.
    logits, targets, _ = _cls_inputs(seed=25)
    zeros = torch.zeros_like(logits)
    base = L.hcra_cls_loss(logits, targets, zeros, use_rci=False, use_cf=False)
    torch.testing.assert_close(L.hcra_cls_loss(logits, targets, zeros, theta=0.0, normalize=True), base, rtol=1e-14, atol=0)
    no_pos = torch.zeros_like(targets)
    ious = torch.rand_like(logits)
    plain = L.hcra_cls_loss(logits, no_pos, ious, base="focal", avg_factor=1.0, use_cf=False)
    scaled = L.hcra_cls_loss(logits, no_pos, ious, base="focal", avg_factor=1.0, use_cf=False, normalize=True)
    _, _, w = L.cls_weights(logits, no_pos, ious, use_cf=False)
    torch.testing.assert_close(scaled, plain / w.mean(), rtol=1e-12, atol=0)
    # Empty input: a zero in the graph, for both bases with §3c.
    x = torch.zeros(0, 3, requires_grad=True)
    for b in ("ghm", "focal"):
        loss = L.hcra_cls_loss(x, torch.zeros(0, 3), torch.zeros(0, 3), base=b, normalize=True)
        assert loss.item() == 0.0 and loss.requires_grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_focal_base_half_precision(dtype):
    logits, targets, ious = _cls_inputs(seed=26, dtype=torch.float32)
    ref = L.hcra_cls_loss(logits, targets, ious, base="focal", normalize=True)
    low = L.hcra_cls_loss(logits.to(dtype), targets.to(dtype), ious.to(dtype), base="focal", normalize=True)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    torch.testing.assert_close(low, ref, rtol=2e-2, atol=1e-3)
    extreme = torch.full((4, 3), 80.0, dtype=dtype)
    assert torch.isfinite(L.hcra_cls_loss(extreme, torch.zeros(4, 3, dtype=dtype), torch.zeros(4, 3, dtype=dtype), base="focal"))
