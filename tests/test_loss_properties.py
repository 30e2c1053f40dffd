"""Property tests (hypothesis): every loss is finite, non-negative and invariant to permuting samples."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hcral import losses as L

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None)
CLOSE = dict(rtol=1e-10, atol=1e-12)


@st.composite
def cls_batches(draw):
    """(logits (N, C), targets (N, C) in {0, 1}, ious (N, C) in [0, 1], valid (N,)) in float64."""
    n = draw(st.integers(1, 12))
    c = draw(st.integers(1, 4))
    logit = st.one_of(st.floats(-30, 30), st.sampled_from([-100.0, 0.0, 100.0]))
    logits = torch.tensor(draw(st.lists(logit, min_size=n * c, max_size=n * c)), dtype=torch.float64).view(n, c)
    targets = torch.tensor(draw(st.lists(st.booleans(), min_size=n * c, max_size=n * c))).view(n, c).double()
    unit = st.floats(0, 1)
    ious = torch.tensor(draw(st.lists(unit, min_size=n * c, max_size=n * c)), dtype=torch.float64).view(n, c)
    valid = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    perm = torch.tensor(draw(st.permutations(range(n))))
    return logits, targets, ious, valid, perm


@st.composite
def box_batches(draw):
    """(pred (P, 4), target (P, 4), scores (P,), h (P,), perm); boxes may have zero area or be disjoint."""
    p = draw(st.integers(1, 10))

    def boxes():
        xy = torch.tensor(draw(st.lists(st.floats(0, 100), min_size=2 * p, max_size=2 * p)), dtype=torch.float64)
        wh = torch.tensor(draw(st.lists(st.floats(0, 60), min_size=2 * p, max_size=2 * p)), dtype=torch.float64)
        xy, wh = xy.view(p, 2), wh.view(p, 2)
        return torch.cat((xy, xy + wh), dim=1)

    pred, target = boxes(), boxes()
    scores = torch.tensor(draw(st.lists(st.floats(0, 1), min_size=p, max_size=p)), dtype=torch.float64)
    h = torch.tensor(draw(st.lists(st.floats(0, 1), min_size=p, max_size=p)), dtype=torch.float64)
    perm = torch.tensor(draw(st.permutations(range(p))))
    return pred, target, scores, h, perm


def _check(loss_fn, args, perm_args):
    loss = loss_fn(*args)
    assert torch.isfinite(loss).all()
    assert (loss >= -1e-12).all()
    torch.testing.assert_close(loss_fn(*perm_args), loss, **CLOSE)


CLS_FUNCTIONS = {
    "hcra_cls_loss": lambda x, t, u, v: L.hcra_cls_loss(x, t, u, v),
    "hcra_cls_loss_no_modules": lambda x, t, u, v: L.hcra_cls_loss(x, t, u, v, use_rci=False, use_cf=False),
    "ghmc_loss": lambda x, t, u, v: L.ghmc_loss(x, t, v, bins=30),
    "sigmoid_focal_loss": lambda x, t, u, v: L.sigmoid_focal_loss(x, t),
    "quality_focal_loss": lambda x, t, u, v: L.quality_focal_loss(x, t * u),
    "varifocal_loss": lambda x, t, u, v: L.varifocal_loss(x, t * u),
}


@pytest.mark.parametrize("name", sorted(CLS_FUNCTIONS))
@SETTINGS
@given(batch=cls_batches())
def test_cls_losses_properties(name, batch):
    logits, targets, ious, valid, perm = batch
    fn = CLS_FUNCTIONS[name]
    _check(fn, (logits, targets, ious, valid), (logits[perm], targets[perm], ious[perm], valid[perm]))


@SETTINGS
@given(batch=cls_batches())
def test_hcra_cls_weights_properties(batch):
    logits, targets, ious, valid, perm = batch
    beta, omega, w = L.cls_weights(logits, targets, ious, valid)
    assert (omega >= 0).all() and (omega <= 2).all()
    assert (w >= 0).all() and (w <= 2).all()
    assert (beta >= 0).all() and beta[~valid].eq(0).all()
    # The histogram is over the whole batch: permuting rows permutes β.
    beta_p, omega_p, w_p = L.cls_weights(logits[perm], targets[perm], ious[perm], valid[perm])
    torch.testing.assert_close(beta_p, beta[perm], **CLOSE)
    torch.testing.assert_close(omega_p, omega[perm], **CLOSE)
    torch.testing.assert_close(w_p, w[perm], **CLOSE)
    # Σ β over valid elements = T (every non-empty bin carries T / K, K bins): the GHM normalisation.
    if valid.any():
        total = valid.sum() * logits.shape[1]
        torch.testing.assert_close(beta.sum(), total.double(), rtol=1e-10, atol=0)


BOX_FUNCTIONS = {
    "hcra_reg_loss": lambda p, g, s, h: L.hcra_reg_loss(p, g, s, h, gamma=0.5),
    "hcra_reg_loss_atss": lambda p, g, s, h: L.hcra_reg_loss(p, g, s, h),
    "iou_loss": lambda p, g, s, h: L.iou_loss(p, g, weight=h),
    "iou_loss_log": lambda p, g, s, h: L.iou_loss(p, g, mode="log"),
    "giou_loss": lambda p, g, s, h: L.giou_loss(p, g, weight=h),
    "diou_loss": lambda p, g, s, h: L.diou_loss(p, g),
    "ciou_loss": lambda p, g, s, h: L.ciou_loss(p, g),
    "eiou_loss": lambda p, g, s, h: L.eiou_loss(p, g),
    "focal_eiou_loss": lambda p, g, s, h: L.focal_eiou_loss(p, g),
}


@pytest.mark.parametrize("name", sorted(BOX_FUNCTIONS))
@SETTINGS
@given(batch=box_batches())
def test_box_losses_properties(name, batch):
    pred, target, scores, h, perm = batch
    fn = BOX_FUNCTIONS[name]
    _check(fn, (pred, target, scores, h), (pred[perm], target[perm], scores[perm], h[perm]))


@SETTINGS
@given(batch=box_batches())
def test_hcra_reg_is_a_weighted_mean_of_giou_losses(batch):
    # The weights redistribute emphasis, they do not change the scale: the loss lies between the
    # smallest and the largest per-box GIoU loss among boxes of positive weight.
    pred, target, scores, h, _ = batch
    loss = L.hcra_reg_loss(pred, target, scores, h, gamma=0.5)
    rho, t = L.reg_weights(pred, target, scores, gamma=0.5)
    weight = rho * t * h
    per_box = L.giou_loss(pred, target, reduction="none")
    if weight.sum() > 1e-3:
        kept = per_box[weight > 0]
        assert kept.min() - 1e-9 <= loss <= kept.max() + 1e-9
    low, high = (0.1 + 1.0) / 2.0, (1.1 + 1.0) / 1.0  # §4 bounds of ρ for α = -0.1, ep = 1
    assert (rho >= low - 1e-9).all() and (rho <= high + 1e-9).all()
