"""The classification-gradient share (train.log_grad_share): masses against closed-form gradients,
the region split's sign, the head's hook for every classification loss, and the off switch."""

from __future__ import annotations

import pytest
import torch

from hcral import losses as L
from hcral.config import LossConfig
from hcral.models.heads.fcos_atss import FCOSATSSHead
from hcral.models.heads.grad_share import GROUPS, GradShareMeter, grad_share_groups

ALPHA = -0.1
B, N, C = 2, 6, 3


def _case():
    """Logits, one-hot targets, a per-prior valid mask with one ignored prior, and u in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, N, C, generator=g, dtype=torch.float64) * 2
    targets = torch.zeros(B, N, C, dtype=torch.float64)
    for b, n, k in ((0, 0, 1), (0, 3, 2), (1, 1, 0), (1, 4, 0), (1, 5, 2)):
        targets[b, n, k] = 1.0
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[0, 5] = False  # an ignored prior: in no group
    ious = torch.rand(B, N, C, generator=g, dtype=torch.float64)
    return logits, targets, valid, ious


def _masses_by_hand(grad, targets, valid, scores, ious):
    """Σ|grad| over each group, the masks written out from their definition."""
    r = scores - ious - ALPHA
    v = valid[..., None].expand_as(targets)
    masks = {
        "pos_r1": v & (targets == 1) & (r > 0),
        "pos_r2": v & (targets == 1) & (r <= 0),
        "neg_r1": v & (targets == 0) & (r > 0),
        "neg_r2": v & (targets == 0) & (r <= 0),
    }
    return {k: float(grad.abs()[m].sum()) for k, m in masks.items()}, {k: int(m.sum()) for k, m in masks.items()}


def _focal_grad(p, t, weight, avg_factor, *, alpha=0.25, gamma=2.0):
    # d/dx of -α(1-p)^γ log p (p* = 1) and of -(1-α) p^γ log(1-p) (p* = 0), p = σ(x).
    pos = alpha * (1 - p) ** gamma * (gamma * p * torch.log(p) + p - 1)
    neg = (1 - alpha) * p**gamma * (p - gamma * (1 - p) * torch.log1p(-p))
    return torch.where(t == 1, pos, neg) * weight / avg_factor


def _focal(x, t, valid):
    num_pos = float(t.sum())
    loss = L.sigmoid_focal_loss(
        x.reshape(-1, C), t.reshape(-1, C), weight=valid.reshape(-1).double(), reduction="mean", avg_factor=num_pos
    )
    closed = _focal_grad(x.detach().sigmoid(), t, valid[..., None].double(), num_pos)
    return loss, closed


def _ghmc(x, t, valid):
    loss = L.ghmc_loss(x.reshape(-1, C), t.reshape(-1, C), valid.reshape(-1), bins=4)
    p = x.detach().sigmoid()
    beta, total = L.ghm_beta((p - t).abs().reshape(-1, C), valid.reshape(-1), bins=4)
    return loss, beta.reshape(p.shape) * (p - t) / total  # GHM-C's gradient: β (p - p*) / T


@pytest.mark.parametrize("loss_and_gradient", [_focal, _ghmc], ids=["focal", "ghmc"])
def test_masses_are_the_closed_form_gradient_split_by_group(loss_and_gradient):
    logits, targets, valid, ious = _case()
    leaf = logits.clone().requires_grad_()
    x = leaf * 1.0  # a non-leaf, as the head's logits
    scores = x.detach().sigmoid()
    meter = GradShareMeter(alpha=ALPHA)
    meter.watch(x, targets, valid, scores, ious)
    loss, closed = loss_and_gradient(x, targets, valid)
    (grad,) = torch.autograd.grad(loss, leaf)
    torch.testing.assert_close(grad, closed)
    masses, counts = _masses_by_hand(closed, targets, valid, scores, ious)
    record = meter.pop()
    for group in GROUPS:
        assert record[f"grad_{group}"] == pytest.approx(masses[group], rel=1e-12, abs=1e-15), group
        assert record[f"grad_n_{group}"] == counts[group]
    assert record["grad_pos"] == pytest.approx(masses["pos_r1"] + masses["pos_r2"], rel=1e-12)
    assert record["grad_neg"] == pytest.approx(masses["neg_r1"] + masses["neg_r2"], rel=1e-12)
    assert record["grad_n_pos"] == 5 and record["grad_n_neg"] == (B * N - 1) * C - 5  # the ignored prior is out
    assert record["grad_pos"] > 0 and record["grad_neg"] > 0 and record["grad_iters"] == 1
    assert meter.pop() == {} and meter.stats is None  # read and reset


def test_masses_accumulate_over_iterations():
    logits, targets, valid, ious = _case()
    meter = GradShareMeter(alpha=ALPHA)
    records = []
    for steps in (1, 3):
        for _ in range(steps):
            x = logits.clone().requires_grad_()
            meter.watch(x, targets, valid, x.detach().sigmoid(), ious)
            _focal(x, targets, valid)[0].backward()
        records.append(meter.pop())
    assert records[1]["grad_iters"] == 3
    for key in ("grad_pos", "grad_neg_r1", "grad_n_pos", "grad_n_neg_r2"):
        assert records[1][key] == pytest.approx(3 * records[0][key], rel=1e-12)


def test_region_1_is_score_above_iou_plus_alpha():
    # r = p - u - α with exactly representable values: the boundary r = 0 is region 2.
    scores = torch.tensor([[[0.5, 0.25, 0.75, 0.5]]])
    ious = torch.tensor([[[0.5, 0.5, 0.5, 0.5]]])
    targets = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    valid = torch.ones(1, 1, dtype=torch.bool)
    # α = -0.25: r = 0.25 (pos, region 1), 0 (pos, region 2), 0.5 (neg, region 1), 0.25 (neg, region 1).
    groups = grad_share_groups(targets, valid, scores, ious, alpha=-0.25)
    assert [GROUPS[g] for g in groups.flatten().tolist()] == ["pos_r1", "pos_r2", "neg_r1", "neg_r1"]
    # α = +0.25 (the opposite sign) moves the line up: r = -0.25, -0.5, 0, -0.25.
    groups = grad_share_groups(targets, valid, scores, ious, alpha=0.25)
    assert [GROUPS[g] for g in groups.flatten().tolist()] == ["pos_r2", "pos_r2", "neg_r2", "neg_r2"]
    assert grad_share_groups(targets, ~valid, scores, ious, alpha=0.25).tolist() == [[[len(GROUPS)] * 4]]


# ---- in the head ------------------------------------------------------------------------------

FEAT_SIZES = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]  # a 64-pixel input, strides 8..128
TARGETS = [
    {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])},
    {"boxes": torch.tensor([[20.0, 4.0, 60.0, 30.0], [0.0, 30.0, 30.0, 60.0]]), "labels": torch.tensor([0, 2])},
]


def _head_step(loss: LossConfig, *, log_grad_share: bool):
    """One loss of a tiny FCOS+ATSS head; returns the head, its terms and its classification logits."""
    torch.manual_seed(0)
    head = FCOSATSSHead(C, 8, feat_channels=8, num_convs=1, loss=loss, log_grad_share=log_grad_share)
    feats = [torch.randn(2, 8, h, w) for h, w in FEAT_SIZES]
    seen = []
    forward = head.forward

    def spy(feats):
        out = forward(feats)
        seen.append(out[0])
        return out

    head.forward = spy
    terms = head.loss(feats, TARGETS)
    return head, terms, seen[0]


CLS_LOSSES = {
    "focal": LossConfig(cls="focal"),
    "ghmc": LossConfig(cls="ghmc"),
    "hcra_c": LossConfig(cls="hcra_c"),
    "hcra_c_focal_base": LossConfig(cls="hcra_c", hcra_cls_base="focal"),
    "hcra_c_focal_base_normalized": LossConfig(cls="hcra_c", hcra_cls_base="focal", hcra_cls_normalize=True),
    "hcra_c_normalized": LossConfig(cls="hcra_c", hcra_cls_normalize=True, cls_weight=3.0),
}


@pytest.mark.parametrize("name", CLS_LOSSES)
def test_head_logs_the_gradient_of_its_weighted_classification_loss(name):
    head, terms, logits = _head_step(CLS_LOSSES[name], log_grad_share=True)
    (grad,) = torch.autograd.grad(sum(terms.values()), logits, retain_graph=True)
    record = head.grad_share.pop()
    (grad_cls,) = torch.autograd.grad(terms["loss_cls"], logits)
    torch.testing.assert_close(grad, grad_cls)  # only the weighted classification term reaches the logits
    # Each of these losses pushes a positive's logit up and a negative's down: the gradient's sign
    # tells the groups apart without re-running the assigner.
    assert record["grad_pos"] == pytest.approx(float(-grad.clamp(max=0).sum()), rel=1e-5)
    assert record["grad_neg"] == pytest.approx(float(grad.clamp(min=0).sum()), rel=1e-5)
    assert record["grad_pos_r1"] + record["grad_pos_r2"] == pytest.approx(record["grad_pos"])
    assert record["grad_n_pos"] > 0 and record["grad_n_pos"] + record["grad_n_neg"] == logits.numel()  # none ignored
    assert record["grad_iters"] == 1


def test_off_switch_registers_no_hook(monkeypatch):
    calls = []
    register = torch.Tensor.register_hook
    monkeypatch.setattr(torch.Tensor, "register_hook", lambda self, fn: calls.append(fn) or register(self, fn))
    head, terms, _ = _head_step(LossConfig(cls="focal"), log_grad_share=False)
    sum(terms.values()).backward()
    assert head.grad_share is None and calls == []
    head, terms, _ = _head_step(LossConfig(cls="focal"), log_grad_share=True)
    sum(terms.values()).backward()
    assert len(calls) == 1 and head.grad_share.stats is not None
    # No hook without a graph (e.g. a loss computed under torch.no_grad).
    with torch.no_grad():
        head.loss([torch.randn(2, 8, h, w) for h, w in FEAT_SIZES], TARGETS)
    assert len(calls) == 1 and head.grad_share.pop()["grad_iters"] == 1


def test_switch_may_change_on_resume():
    from hcral.checkpoint import check_resume_config
    from hcral.config import Config, ConfigError, config_to_dict, load_config

    ckpt = {"config": config_to_dict(Config())}
    check_resume_config(ckpt, load_config(overrides=["train.log_grad_share=true"]), "run/checkpoint.pt")
    with pytest.raises(ConfigError, match="loss.cls"):  # while a setting that changes training may not
        check_resume_config(ckpt, load_config(overrides=["loss.cls=ghmc"]), "run/checkpoint.pt")
