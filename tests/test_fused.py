"""The optional fused HCRA-C path (hcral.losses.fused) against the eager loss (formulation §3).

The fused stages are plain tensor functions that ``torch.compile`` compiles; most tests run them
uncompiled (``compiled=False``), which checks their formulas, the precomputed gradient, the GHM state
and the fallback in well under a second. The compiled run itself is opt-in: inductor needs
15-20 s of compilation on this project's 2-core CPU before the first result, so it runs only with
``HCRAL_TEST_COMPILE=1`` (and where :func:`compile_unavailable_reason` finds a compiler).
No test here measures time.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from hcral import losses as L
from hcral.losses import fused

HPARAMS = [
    {},
    {"use_rci": False},
    {"use_cf": False, "bins": 30},
    {"use_rci": False, "use_cf": False, "bins": 7},
    {"alpha": -0.2, "theta": 1.3, "mu": 0.3},
]


def _inputs(n=64, c=5, *, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=dtype) * 3
    targets = (torch.rand(n, c, generator=g) < 0.2).to(dtype)
    ious = torch.rand(n, c, generator=g, dtype=dtype) * (torch.rand(n, c, generator=g) < 0.6)
    valid = torch.rand(n, generator=g) > 0.25
    return logits, targets, ious, valid


def _loss_and_grad(fn, logits, *args, **kwargs):
    x = logits.clone().requires_grad_()
    loss = fn(x, *args, **kwargs)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("hparams", HPARAMS)
@pytest.mark.parametrize("mask", ["none", "per_prior"])
def test_fused_stages_equal_eager_loss_and_gradient(hparams, mask):
    logits, targets, ious, valid = _inputs(seed=len(hparams))
    valid = valid if mask == "per_prior" else None
    got, got_grad = _loss_and_grad(fused.hcra_cls_loss_fused, logits, targets, ious, valid, compiled=False, **hparams)
    ref, ref_grad = _loss_and_grad(L.hcra_cls_loss, logits, targets, ious, valid, **hparams)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-12, atol=1e-15)


def test_fused_gradient_is_the_formula():
    # ∂L/∂x = β·ω·w·(σ(x) - p*) / T with the weights held constant (§3, weights detached).
    logits, targets, ious, valid = _inputs(seed=3)
    _, grad = _loss_and_grad(fused.hcra_cls_loss_fused, logits, targets, ious, valid, compiled=False)
    beta, omega, w = L.cls_weights(logits, targets, ious, valid)
    expected = beta * omega * w * (logits.sigmoid() - targets) / (valid.sum() * logits.shape[1])
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)
    # No gradient reaches the IoUs.
    x, u = logits.clone().requires_grad_(), ious.clone().requires_grad_()
    (none,) = torch.autograd.grad(fused.hcra_cls_loss_fused(x, targets, u, compiled=False), u, allow_unused=True)
    assert none is None


@pytest.mark.parametrize("hparams", [{"use_rci": False}, {"theta": 0.0}], ids=["cf", "theta0"])
def test_fused_gradcheck_float64(hparams):
    # Finite differences see the detached weights move unless they are locally constant: β is, away
    # from the bin edges; ω depends on u only; w is constant for θ = 0 or use_rci=False (the general
    # case is the closed-form gradient test above).
    gen = torch.Generator().manual_seed(5)
    targets = (torch.rand(6, 3, generator=gen) < 0.3).double()
    k = torch.randint(0, 10, (6, 3), generator=gen).double()
    g = (k + 0.2 + 0.6 * torch.rand(6, 3, generator=gen, dtype=torch.float64)) / 10
    logits = torch.logit(torch.where(targets > 0, 1 - g, g)).requires_grad_()
    ious = torch.rand(6, 3, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: fused.hcra_cls_loss_fused(x, targets, ious, compiled=False, **hparams), (logits,)
    )


def test_fused_momentum_state_matches_the_module():
    eager = L.HCRAClassificationLoss(momentum=0.75, bins=30, sync_counts=False, loss_weight=1.5)
    fast = fused.FusedHCRAClassificationLoss(momentum=0.75, bins=30, sync_counts=False, loss_weight=1.5, compiled=False)
    for call in range(3):
        logits, targets, ious, valid = _inputs(n=40 + 10 * call, seed=20 + call, dtype=torch.float32)
        torch.testing.assert_close(fast(logits, targets, ious, valid), eager(logits, targets, ious, valid))
    assert torch.equal(fast.acc_sum, eager.acc_sum) and eager.acc_sum.sum() > 0
    assert set(fast.state_dict()) == set(eager.state_dict())  # checkpoints are interchangeable
    assert "compiled=False" in repr(fast)


def test_fused_half_precision_and_empty_input():
    logits, targets, ious, valid = _inputs(seed=7, dtype=torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        got = fused.hcra_cls_loss_fused(logits.to(dtype), targets, ious, valid, compiled=False)
        assert got.dtype == torch.float32  # computed in float32 at least
        torch.testing.assert_close(got, L.hcra_cls_loss(logits.to(dtype), targets, ious, valid))
    x = torch.zeros(0, 5, requires_grad=True)
    empty = fused.hcra_cls_loss_fused(x, torch.zeros(0, 5), torch.zeros(0, 5))
    assert empty.item() == 0.0 and empty.requires_grad
    empty.backward()
    assert x.grad.shape == (0, 5)


def test_fused_rejects_bad_input_with_its_name():
    logits, targets, ious, _ = _inputs()
    with pytest.raises(ValueError, match="hcra_cls_loss_fused: ious must have shape"):
        fused.hcra_cls_loss_fused(logits, targets, ious[:, :2])
    with pytest.raises(ValueError, match="hcra_cls_loss_fused: mu must be in"):
        fused.hcra_cls_loss_fused(logits, targets, ious, mu=2.0)
    with pytest.raises(ValueError, match="needs the moving-average state acc_sum"):
        fused.hcra_cls_loss_fused(logits, targets, ious, momentum=0.5)


def test_failed_compilation_warns_once_and_falls_back_to_eager(monkeypatch):
    def broken(fn):
        def run(*args, **kwargs):
            raise RuntimeError("no compiler in this test")

        return run

    monkeypatch.setattr(fused, "_compiled", broken)
    monkeypatch.setattr(fused, "compile_unavailable_reason", lambda device="cpu": None)
    monkeypatch.setattr(fused, "_fallback_warned", False)
    logits, targets, ious, valid = _inputs(seed=9, dtype=torch.float32)
    acc = torch.zeros(10)
    with pytest.warns(RuntimeWarning, match="torch.compile failed: RuntimeError: no compiler in this test"):
        got = fused.hcra_cls_loss_fused(logits, targets, ious, valid, momentum=0.75, acc_sum=acc)
    ref_acc = torch.zeros(10)
    ref = L.HCRAClassificationLoss(momentum=0.75, sync_counts=False)
    ref.acc_sum.copy_(ref_acc)
    torch.testing.assert_close(got, ref(logits, targets, ious, valid))
    torch.testing.assert_close(acc, ref.acc_sum)  # the failed attempt did not advance the state twice
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the second call is silent
        fused.hcra_cls_loss_fused(logits, targets, ious, valid)


def test_compile_unavailable_reason_names_the_missing_piece(monkeypatch):
    reason = fused.compile_unavailable_reason("cpu")
    assert reason is None or isinstance(reason, str)
    monkeypatch.setattr(fused.shutil, "which", lambda name: None)
    assert "C++ compiler" in fused.compile_unavailable_reason("cpu")


_COMPILE_REASON = fused.compile_unavailable_reason("cpu")


@pytest.mark.skipif(
    os.environ.get("HCRAL_TEST_COMPILE") != "1",
    reason="torch.compile needs 15-20 s of compilation on a 2-core CPU; set HCRAL_TEST_COMPILE=1 to run it",
)
@pytest.mark.skipif(_COMPILE_REASON is not None, reason=f"torch.compile unavailable: {_COMPILE_REASON}")
def test_compiled_path_equals_eager():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would make this test vacuous
        acc_fused, acc_eager = torch.zeros(10), torch.zeros(10)
        for n, seed in ((300, 1), (517, 2)):  # two sizes: dynamic shapes, one compilation
            logits, targets, ious, valid = _inputs(n=n, c=7, seed=seed, dtype=torch.float32)
            kwargs = dict(momentum=0.75)
            got, got_grad = _loss_and_grad(
                fused.hcra_cls_loss_fused, logits, targets, ious, valid, acc_sum=acc_fused, **kwargs
            )
            ref, ref_grad = _loss_and_grad(
                fused._hcra_cls_loss, logits, targets, ious, valid, alpha=-0.1, theta=2.0, mu=0.5, bins=10,
                use_rci=True, use_cf=True, acc_sum=acc_eager, sync_counts=False, where="test", **kwargs,
            )  # fmt: skip
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(got_grad, ref_grad, rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(acc_fused, acc_eager)
