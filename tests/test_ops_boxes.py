"""Box operations (hcral.ops.boxes): closed forms of hand-drawn pairs, conventions, degenerate boxes."""

from __future__ import annotations

import math

import pytest
import torch

from hcral.ops import boxes as B

# (box1, box2, IoU, GIoU, DIoU, EIoU) for hand-drawn pairs; CIoU is checked separately (needs atan).
#   A: two 2x2 squares offset by (1, 1): inter 1, union 7, enclosure 3x3 = 9, centres 2 apart (ρ² = 2),
#      c² = 18.  GIoU = 1/7 - 2/9, DIoU = 1/7 - 1/9; equal sizes so EIoU = DIoU.
#   B: 4x2 and 2x4 sharing the corner (0, 0): inter 4, union 12, enclosure 4x4 = 16, ρ² = 2, c² = 32;
#      Δw = Δh = 2 over C_w = C_h = 4 -> each side term 1/4.
#   C: disjoint unit squares 1 apart on x: union 2, enclosure 3x1, ρ² = 4, c² = 10.
#   D: identical boxes.
#   E: 2x2 centred inside 4x4: IoU 1/4, enclosure = outer box, same centre, side terms 1/4 + 1/4.
PAIRS = [
    ((0, 0, 2, 2), (1, 1, 3, 3), 1 / 7, 1 / 7 - 2 / 9, 1 / 7 - 1 / 9, 1 / 7 - 1 / 9),
    ((0, 0, 4, 2), (0, 0, 2, 4), 1 / 3, 1 / 3 - 4 / 16, 1 / 3 - 2 / 32, 1 / 3 - 2 / 32 - 1 / 2),
    ((0, 0, 1, 1), (2, 0, 3, 1), 0.0, -1 / 3, -4 / 10, -4 / 10),
    ((3, 4, 10, 12), (3, 4, 10, 12), 1.0, 1.0, 1.0, 1.0),
    ((0, 0, 4, 4), (1, 1, 3, 3), 1 / 4, 1 / 4, 1 / 4, 1 / 4 - 1 / 2),
]


def _pairs(dtype=torch.float64):
    a = torch.tensor([p[0] for p in PAIRS], dtype=dtype)
    b = torch.tensor([p[1] for p in PAIRS], dtype=dtype)
    cols = [torch.tensor([p[k] for p in PAIRS], dtype=torch.float64) for k in range(2, 6)]
    return a, b, *cols


def test_closed_form_iou_giou_diou_eiou():
    a, b, iou, giou, diou, eiou = _pairs()
    torch.testing.assert_close(B.aligned_iou(a, b), iou, rtol=0, atol=1e-12)
    torch.testing.assert_close(B.aligned_giou(a, b), giou, rtol=0, atol=1e-12)
    torch.testing.assert_close(B.aligned_diou(a, b), diou, rtol=0, atol=1e-12)
    torch.testing.assert_close(B.aligned_eiou(a, b), eiou, rtol=0, atol=1e-12)
    # Symmetry of every measure in its two arguments.
    for fn in (B.aligned_iou, B.aligned_giou, B.aligned_diou, B.aligned_eiou):
        torch.testing.assert_close(fn(a, b), fn(b, a), rtol=0, atol=1e-12)


def test_closed_form_ciou():
    a, b, iou, _, diou, _ = _pairs()
    ciou = B.aligned_ciou(a, b)
    # Pair B: 4x2 against 2x4, v = (4/π²)(atan(2/4) - atan(4/2))², a = v / (1 - IoU + v).
    v = 4 / math.pi**2 * (math.atan(0.5) - math.atan(2.0)) ** 2
    expected_b = (1 / 3 - 1 / 16) - v / (1 - 1 / 3 + v) * v
    # The aspect term guards h with +eps (1e-7), which moves the value by ~1e-9 here.
    assert ciou[1].item() == pytest.approx(expected_b, abs=1e-7)
    # Equal aspect ratios (A, C, D, E): v = 0 and CIoU = DIoU.
    for i in (0, 2, 3, 4):
        assert ciou[i].item() == pytest.approx(diou[i].item(), abs=1e-9)


def test_terms_closed_form():
    a = torch.tensor([[0.0, 0, 4, 2]], dtype=torch.float64)
    b = torch.tensor([[0.0, 0, 2, 4]], dtype=torch.float64)
    t = B.aligned_box_terms(a, b)
    assert t.union.item() == pytest.approx(12)
    assert t.enclose_area.item() == pytest.approx(16)
    assert (t.enclose_w.item(), t.enclose_h.item()) == (4, 4)
    assert t.center_dist2.item() == pytest.approx(2)
    assert t.diag2.item() == pytest.approx(32)
    assert (t.w1.item(), t.h1.item(), t.w2.item(), t.h2.item()) == (4, 2, 2, 4)
    assert B.diou_penalty_from_terms(t).item() == pytest.approx(1 / 16)
    assert B.eiou_penalty_from_terms(t).item() == pytest.approx(1 / 16 + 1 / 4 + 1 / 4)


def test_pairwise_iou_closed_form_and_agreement_with_aligned():
    a, b, iou, *_ = _pairs()
    assert B.box_iou(a, b).shape == (len(PAIRS), len(PAIRS))
    torch.testing.assert_close(B.box_iou(a, b).diagonal(), iou, rtol=0, atol=1e-12)
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(7, 2, generator=g, dtype=torch.float64) * 50
    boxes1 = torch.cat((xy, xy + torch.rand(7, 2, generator=g, dtype=torch.float64) * 40), dim=1)
    xy = torch.rand(5, 2, generator=g, dtype=torch.float64) * 50
    boxes2 = torch.cat((xy, xy + torch.rand(5, 2, generator=g, dtype=torch.float64) * 40), dim=1)
    pairwise = B.box_iou(boxes1, boxes2)  # (7, 5)
    for j in range(5):
        aligned = B.aligned_iou(boxes1, boxes2[j].expand(7, 4))
        torch.testing.assert_close(pairwise[:, j], aligned, rtol=1e-12, atol=1e-12)
    assert B.box_iou(boxes1[:0], boxes2).shape == (0, 5)


def test_conversions_round_trip_and_values():
    xyxy = torch.tensor([[1.0, 2.0, 5.0, 10.0], [0.0, 0.0, 0.0, 0.0]])
    cxcywh = B.box_xyxy_to_cxcywh(xyxy)
    torch.testing.assert_close(cxcywh[0], torch.tensor([3.0, 6.0, 4.0, 8.0]))
    torch.testing.assert_close(B.box_cxcywh_to_xyxy(cxcywh), xyxy)
    xywh = B.box_xyxy_to_xywh(xyxy)
    torch.testing.assert_close(xywh[0], torch.tensor([1.0, 2.0, 4.0, 8.0]))
    torch.testing.assert_close(B.box_xywh_to_xyxy(xywh), xyxy)
    torch.testing.assert_close(B.box_area(xyxy), torch.tensor([32.0, 0.0]))
    torch.testing.assert_close(B.box_centers(xyxy), torch.tensor([[3.0, 6.0], [0.0, 0.0]]))
    # Inverted boxes have zero area, not a negative one.
    assert B.box_area(torch.tensor([[5.0, 5.0, 1.0, 8.0]])).item() == 0.0


def test_clip_boxes():
    boxes = torch.tensor([[-5.0, -1.0, 30.0, 12.0], [2.0, 3.0, 4.0, 5.0]])
    clipped = B.clip_boxes(boxes, (10, 20))  # (height, width)
    torch.testing.assert_close(clipped, torch.tensor([[0.0, 0.0, 20.0, 10.0], [2.0, 3.0, 4.0, 5.0]]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_upcast(dtype):
    # 1024x1024 boxes (exact in bf16): areas (~1e6) overflow fp16's 65504, so the computation must be in float32.
    a = torch.tensor([[0.0, 0.0, 1024.0, 1024.0], [10.0, 10.0, 50.0, 30.0]])
    b = torch.tensor([[512.0, 0.0, 1536.0, 1024.0], [12.0, 8.0, 40.0, 36.0]])
    a_h, b_h = a.to(dtype), b.to(dtype)
    for fn in (B.aligned_iou, B.aligned_giou, B.aligned_diou, B.aligned_ciou, B.aligned_eiou):
        out = fn(a_h, b_h)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, fn(a_h.float(), b_h.float()), rtol=0, atol=0)
    assert B.aligned_iou(a_h, b_h)[0].item() == pytest.approx(1 / 3, abs=1e-6)
    assert B.box_iou(a_h, b_h).dtype == torch.float32
    assert B.box_area(a_h).dtype == torch.float32
    assert B.box_area(a_h)[0].item() == 1024.0**2


def test_float64_is_kept():
    a, b, *_ = _pairs(torch.float64)
    assert B.aligned_giou(a, b).dtype == torch.float64
    assert B.box_iou(a, b).dtype == torch.float64


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="equal shapes"):
        B.aligned_box_terms(torch.zeros(3, 4), torch.zeros(2, 4))


DEGENERATE = {
    "identical": ([[2.0, 3.0, 8.0, 9.0]], [[2.0, 3.0, 8.0, 9.0]]),
    "zero_area_both": ([[5.0, 5.0, 5.0, 5.0]], [[5.0, 5.0, 5.0, 5.0]]),
    "zero_area_one": ([[5.0, 5.0, 5.0, 9.0]], [[4.0, 4.0, 8.0, 8.0]]),
    "zero_width_pair": ([[1.0, 0.0, 1.0, 4.0]], [[1.0, 0.0, 1.0, 2.0]]),
    "disjoint": ([[0.0, 0.0, 1.0, 1.0]], [[10.0, 10.0, 12.0, 14.0]]),
    "inverted": ([[4.0, 4.0, 1.0, 1.0]], [[0.0, 0.0, 2.0, 2.0]]),
}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
@pytest.mark.parametrize(
    "fn", [B.aligned_iou, B.aligned_giou, B.aligned_diou, B.aligned_ciou, B.aligned_eiou], ids=lambda f: f.__name__
)
def test_degenerate_boxes_are_finite_with_finite_gradients(case, fn):
    a_list, b_list = DEGENERATE[case]
    a = torch.tensor(a_list, requires_grad=True)
    b = torch.tensor(b_list, requires_grad=True)
    out = fn(a, b)
    assert torch.isfinite(out).all()
    low = {B.aligned_iou: 0.0, B.aligned_giou: -1.0, B.aligned_diou: -1.0}.get(fn, -3.0)
    assert (out >= low - 1e-6).all() and (out <= 1.0 + 1e-6).all()
    out.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_degenerate_values():
    ident_a, ident_b = (torch.tensor(x) for x in DEGENERATE["identical"])
    for fn in (B.aligned_iou, B.aligned_giou, B.aligned_diou, B.aligned_ciou, B.aligned_eiou):
        assert fn(ident_a, ident_b).item() == pytest.approx(1.0, abs=1e-6)
    zero_a, zero_b = (torch.tensor(x) for x in DEGENERATE["zero_area_both"])
    assert B.aligned_iou(zero_a, zero_b).item() == 0.0
    assert B.box_iou(zero_a, zero_b).item() == 0.0
    far_a, far_b = (torch.tensor(x) for x in DEGENERATE["disjoint"])
    assert B.aligned_iou(far_a, far_b).item() == 0.0
    assert -1.0 < B.aligned_giou(far_a, far_b).item() < 0.0


def test_pairwise_iou_degenerate_is_finite():
    boxes = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 5.0], [0.0, 0.0, 2.0, 2.0]], requires_grad=True)
    out = B.box_iou(boxes, boxes)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(boxes.grad).all()


def test_gradcheck_aligned_measures():
    a = torch.tensor([[0.0, 0.0, 4.0, 3.0], [1.0, 2.0, 6.0, 9.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[1.3, 0.7, 5.1, 4.2], [2.2, 1.1, 5.3, 7.4]], dtype=torch.float64)
    for fn in (B.aligned_iou, B.aligned_giou, B.aligned_diou, B.aligned_eiou):
        assert torch.autograd.gradcheck(lambda x, fn=fn: fn(x, b), (a,))
    assert torch.autograd.gradcheck(lambda x: B.box_iou(x, b), (a,))
