"""Greedy NMS (torchvision behind hcral.ops.nms) against slow references, and the inference post-processing."""

from __future__ import annotations

import itertools

import pytest
import torch

from hcral.models.postprocess import select_detections
from hcral.ops.boxes import EPS
from hcral.ops.nms import batched_nms

# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------


def _iou_py(a, b):
    """IoU in Python floats (float64), same arithmetic as box_iou: inter / max(union, eps)."""
    area_a = max(a[2] - a[0], 0.0) * max(a[3] - a[1], 0.0)
    area_b = max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    return inter / max(area_a + area_b - inter, EPS)


def slow_nms(boxes, scores, classes, thr):
    """Textbook greedy NMS in pure Python: by score descending, ties by lower index."""
    b, s, c = boxes.tolist(), scores.tolist(), classes.tolist()
    order = sorted(range(len(b)), key=lambda i: (-s[i], i))
    kept: list[int] = []
    for i in order:
        if all(c[k] != c[i] or _iou_py(b[k], b[i]) <= thr for k in kept):
            kept.append(i)
    return kept


def matrix_nms_reference(boxes, scores, classes, thr):
    """Greedy NMS from the full IoU matrix, one row at a time."""
    from hcral.ops.boxes import box_iou

    order = sorted(range(len(scores)), key=lambda i: (-scores[i].item(), i))
    order = torch.tensor(order, dtype=torch.long)
    over = (box_iou(boxes[order], boxes[order]) > thr) & (classes[order][:, None] == classes[order][None, :])
    removed = torch.zeros(len(order), dtype=torch.bool)
    kept = []
    for i in range(len(order)):
        if not removed[i]:
            kept.append(order[i].item())
            removed |= over[i]
    return kept


def _random_case(seed, n, *, num_classes=3, grid=True):
    g = torch.Generator().manual_seed(seed)
    if grid:  # integer coordinates on a small canvas: duplicates and exact IoU ties (1/2, 1/3 ...)
        xy = torch.randint(0, 12, (n, 2), generator=g).double()
        wh = torch.randint(0, 6, (n, 2), generator=g).double()  # zero-area boxes included
        scores = torch.randint(0, 5, (n,), generator=g).double() / 4  # many equal scores
    else:
        xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 100
        wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 40 + 1
        scores = torch.rand(n, generator=g, dtype=torch.float64)
    classes = torch.randint(0, num_classes, (n,), generator=g)
    return torch.cat((xy, xy + wh), dim=1), scores, classes


# ---------------------------------------------------------------------------------------------
# NMS (torchvision's, through hcral.ops.nms.batched_nms)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [True, False])
def test_batched_nms_matches_python_reference(grid):
    cases = 0
    for seed in range(60):
        n = [0, 1, 2, 5, 17, 40, 90][seed % 7]
        boxes, scores, classes = _random_case(seed, n, grid=grid)
        for thr in (0.0, 0.3, 0.5, 0.6, 0.7):
            keep = batched_nms(boxes, scores, classes, thr)
            assert keep.dtype == torch.long
            assert keep.tolist() == slow_nms(boxes, scores, classes, thr), (seed, thr)
            cases += 1
    assert cases == 300


def test_nms_large_matches_matrix_reference():
    # 3000 boxes in clusters: torchvision switches to per-class NMS above 1000 boxes on CPU and
    # merges the classes with an unstable sort; many equal scores check the tie order survives.
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(60, 2, generator=g, dtype=torch.float64) * 800
    pick = torch.randint(0, 60, (3000,), generator=g)
    c = centres[pick] + torch.randn(3000, 2, generator=g, dtype=torch.float64) * 6
    wh = 40 + torch.randn(3000, 2, generator=g, dtype=torch.float64) * 4
    boxes = torch.cat((c - wh / 2, c + wh / 2), dim=1)
    classes = torch.randint(0, 4, (3000,), generator=g)
    for scores in (torch.rand(3000, generator=g, dtype=torch.float64), torch.randint(0, 8, (3000,), generator=g) / 8):
        want = matrix_nms_reference(boxes, scores, classes, 0.5)
        assert batched_nms(boxes, scores, classes, 0.5).tolist() == want
        # float32 boxes, same answer for these continuous coordinates
        assert batched_nms(boxes.float(), scores.float(), classes, 0.5).tolist() == want


def test_nms_exact_cases():
    def nms(b, s, thr):
        return batched_nms(b, s, torch.zeros(len(b), dtype=torch.long), thr)

    # identical boxes, equal scores: the lower index survives
    boxes = torch.tensor([[0.0, 0, 10, 10]] * 3)
    assert nms(boxes, torch.tensor([0.5, 0.5, 0.5]), 0.5).tolist() == [0]
    assert nms(boxes, torch.tensor([0.1, 0.5, 0.5]), 0.5).tolist() == [1]
    # IoU exactly equal to the threshold does not suppress
    pair = torch.tensor([[0.0, 0, 2, 1], [0.0, 0, 1, 1]])  # IoU = 1/2
    assert nms(pair, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0, 1]
    assert nms(pair, torch.tensor([0.9, 0.8]), 0.49).tolist() == [0]
    # chain: A suppresses B; C overlaps only B, so C survives
    chain = torch.tensor([[0.0, 0, 10, 10], [3.0, 0, 13, 10], [6.0, 0, 16, 10]])
    assert nms(chain, torch.tensor([0.9, 0.8, 0.7]), 0.4).tolist() == [0, 2]
    # classes never suppress each other
    assert batched_nms(boxes, torch.tensor([0.3, 0.2, 0.1]), torch.tensor([0, 1, 0]), 0.5).tolist() == [0, 1]
    # result is by decreasing score
    keep = nms(torch.tensor([[0.0, 0, 1, 1], [5.0, 5, 6, 6], [9.0, 9, 10, 10]]), torch.tensor([0.2, 0.9, 0.5]), 0.5)
    assert keep.tolist() == [1, 2, 0]
    # 200 boxes sliding by 3 px: each overlaps the next with IoU 7/13 > 0.5 but the one after
    # with IoU 4/16 < 0.5, so greedy keeps every other box.
    x = torch.arange(200, dtype=torch.float64) * 3
    slide = torch.stack((x, torch.zeros_like(x), x + 10, torch.full_like(x, 10.0)), 1)
    assert nms(slide, torch.linspace(1, 0, 200, dtype=torch.float64), 0.5).tolist() == list(range(0, 200, 2))


def test_nms_class_offset_keeps_float32_ious():
    # Two 6 px float32 boxes of class 79 with IoU 0.50004 > 0.5 (the second is suppressed), and a
    # class-0 box reaching 1333 px. torchvision's batched_nms shifts class 79 by 79 * 1334 px;
    # in float32 that rounds the coordinates to 1/128 px and the IoU falls under 0.5 (both kept).
    boxes = torch.tensor(
        [
            [496.256591796875, 768.2218017578125, 502.0261535644531, 774.8624267578125],
            [498.1795959472656, 768.2218017578125, 503.94915771484375, 774.8624267578125],
            [1300.0, 1300.0, 1333.0, 1333.0],
        ]
    )
    scores, classes = torch.tensor([0.9, 0.8, 0.1]), torch.tensor([79, 79, 0])
    assert _iou_py(boxes[0].tolist(), boxes[1].tolist()) > 0.5
    assert batched_nms(boxes, scores, classes, 0.5).tolist() == slow_nms(boxes, scores, classes, 0.5) == [0, 2]


def test_nms_empty_dtypes_and_errors():
    empty = batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5)
    assert empty.shape == (0,) and empty.dtype == torch.long
    # fp16/bf16 (torchvision's CPU kernel has neither): same answer as the float32 copy
    boxes, scores, classes = _random_case(3, 50, grid=False)
    for dtype in (torch.float16, torch.bfloat16):
        low = batched_nms(boxes.to(dtype), scores.to(dtype), classes, 0.5)
        assert low.tolist() == batched_nms(boxes.to(dtype).float(), scores.to(dtype).float(), classes, 0.5).tolist()
        assert 0 < len(low) < 50
    with pytest.raises(ValueError, match=r"boxes must have shape \(N, 4\)"):
        batched_nms(torch.zeros(3, 5), torch.zeros(3), torch.zeros(3, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match="scores"):
        batched_nms(torch.zeros(3, 4), torch.zeros(2), torch.zeros(3, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match="idxs"):
        batched_nms(torch.zeros(3, 4), torch.zeros(3), torch.zeros(4, dtype=torch.long), 0.5)


# ---------------------------------------------------------------------------------------------
# Post-processing
# ---------------------------------------------------------------------------------------------

P0, P1, P2 = [0.0, 0, 10, 10], [1.0, 1, 11, 11], [50.0, 50, 60, 60]  # IoU(P0, P1) = 81/119 = 0.68


def _two_levels():
    scores = [torch.tensor([[0.9, 0.01], [0.8, 0.7], [0.04, 0.3]]), torch.tensor([[0.2, 0.06]])]
    boxes = [torch.tensor([P0, P1, P2]), torch.tensor([P0])]
    return scores, boxes


def _as_lists(result):
    b, s, l = result
    return b.tolist(), [round(v, 6) for v in s.tolist()], l.tolist()


def test_select_detections_closed_form():
    scores, boxes = _two_levels()
    # class 0: 0.9 (P0) kept; 0.8 (P1) and 0.2 (level 1, P0) suppressed by it.
    # class 1: 0.7 (P1) kept, 0.3 (P2) kept, 0.06 (level 1, P0: IoU 0.68 with P1) suppressed.
    assert _as_lists(select_detections(scores, boxes)) == ([P0, P1, P2], [0.9, 0.7, 0.3], [0, 1, 1])
    # nms_pre = 2 per level keeps (P0, c0) and (P1, c0) on level 0, both pairs on level 1
    assert _as_lists(select_detections(scores, boxes, nms_pre=2)) == ([P0, P0], [0.9, 0.06], [0, 1])
    # at 0.7 the 0.68 overlaps survive; only the identical level-1 class-0 box is suppressed
    got = _as_lists(select_detections(scores, boxes, iou_threshold=0.7))
    assert got == ([P0, P1, P1, P2, P0], [0.9, 0.8, 0.7, 0.3, 0.06], [0, 0, 1, 1, 1])


def test_select_detections_score_factors_after_topk():
    scores, boxes = _two_levels()
    factors = [torch.tensor([1.0, 0.5, 0.1]), torch.tensor([1.0])]
    # products: (P0,c0) .9, (P1,c0) .4, (P1,c1) .35, (P2,c1) .03, (L1,c0) .2, (L1,c1) .06.
    # The threshold saw the raw 0.3 of (P2, c1), so its product 0.03 < score_thr stays (MMDetection).
    got = _as_lists(select_detections(scores, boxes, score_factors=factors))
    assert got == ([P0, P1, P2], [0.9, 0.35, 0.03], [0, 1, 1])
    # top-k ranks raw scores: with nms_pre=1 level 0 keeps (P0, c0) even if its factor is tiny
    factors = [torch.tensor([0.01, 1.0, 1.0]), torch.tensor([1.0])]
    got = _as_lists(select_detections(scores, boxes, nms_pre=1, score_factors=factors))
    # level 0 keeps (P0, c0) at 0.9 * 0.01 (not (P1, c0), whose product 0.8 would rank first);
    # level 1 keeps (P0, c0) at 0.2, which then suppresses the identical 0.009 box.
    assert got == ([P0], [0.2], [0])


def test_select_detections_threshold_is_strict_and_cap():
    s = torch.tensor([[0.05], [0.0501]])
    b = torch.tensor([P0, P2])
    assert _as_lists(select_detections([s], [b])) == ([P2], [0.0501], [0])
    # 300 disjoint boxes, distinct scores: the 100 best come back in order
    n = 300
    x = torch.arange(n, dtype=torch.float32) * 20
    boxes = torch.stack((x, torch.zeros(n), x + 10, torch.full((n,), 10.0)), 1)
    scores = torch.linspace(0.1, 0.99, n)[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    got_b, got_s, got_l = select_detections([scores[:, None]], [boxes], nms_pre=None)
    assert len(got_s) == 100 and got_l.tolist() == [0] * 100
    torch.testing.assert_close(got_s, torch.sort(scores, descending=True).values[:100])
    torch.testing.assert_close(got_b, boxes[torch.sort(scores, descending=True).indices[:100]])
    assert len(select_detections([scores[:, None]], [boxes], max_per_img=7)[0]) == 7
    assert len(select_detections([scores[:, None]], [boxes], nms_pre=50)[0]) == 50


def test_select_detections_empty():
    for scores, boxes in [
        ([torch.zeros(0, 3), torch.zeros(0, 3)], [torch.zeros(0, 4), torch.zeros(0, 4)]),  # zero priors
        ([torch.full((5, 3), 0.01)], [torch.rand(5, 4)]),  # nothing above the threshold
    ]:
        b, s, l = select_detections(scores, boxes, score_factors=[torch.ones(len(x)) for x in scores])
        assert b.shape == (0, 4) and s.shape == (0,) and l.shape == (0,) and l.dtype == torch.long
    with pytest.raises(ValueError, match="levels"):
        select_detections([torch.zeros(2, 3)], [])
    with pytest.raises(ValueError, match="level 0"):
        select_detections([torch.zeros(2, 3)], [torch.zeros(3, 4)])
    with pytest.raises(ValueError, match="score_factors"):
        select_detections([torch.ones(2, 3)], [torch.zeros(2, 4)], score_factors=[torch.ones(3)])


def test_select_detections_matches_per_level_reference():
    # Random multi-level case against a direct restatement of the four steps.
    g = torch.Generator().manual_seed(0)
    sizes, num_classes = [300, 80, 20], 4
    scores = [torch.rand(n, num_classes, generator=g, dtype=torch.float64) ** 3 for n in sizes]
    xy = [torch.rand(n, 2, generator=g, dtype=torch.float64) * 200 for n in sizes]
    boxes = [torch.cat((p, p + 30), 1) for p in xy]
    factors = [torch.rand(n, generator=g, dtype=torch.float64) for n in sizes]
    got = select_detections(scores, boxes, nms_pre=50, score_thr=0.05, iou_threshold=0.5, max_per_img=40,
                            score_factors=factors)
    cand_b, cand_s, cand_l = [], [], []
    for s, b, f in zip(scores, boxes, factors):
        grid = itertools.product(range(len(s)), range(num_classes))
        pairs = [(s[i, k].item(), i, k) for i, k in grid if s[i, k] > 0.05]
        pairs.sort(key=lambda t: (-t[0], t[1], t[2]))
        for val, i, k in pairs[:50]:
            cand_b.append(b[i])
            cand_s.append(val * f[i].item())
            cand_l.append(k)
    cand_b = torch.stack(cand_b)
    cand_s = torch.tensor(cand_s, dtype=torch.float64)
    cand_l = torch.tensor(cand_l)
    keep = slow_nms(cand_b, cand_s, cand_l, 0.5)[:40]
    torch.testing.assert_close(got[0], cand_b[keep])
    torch.testing.assert_close(got[1], cand_s[keep])
    assert got[2].tolist() == cand_l[keep].tolist()


def test_select_detections_nms_pre_cut_inside_a_tie():
    # 40 disjoint boxes x 3 classes, scores in 5 tied values: nms_pre cuts inside a tie group, where
    # the narrowing topk must keep every tied pair so that ties still go to the lower (prior, class).
    n, c, nms_pre = 40, 3, 23
    x = torch.arange(n, dtype=torch.float32) * 20
    boxes = torch.stack((x, torch.zeros(n), x + 10, torch.full((n,), 10.0)), 1)
    gen = torch.Generator().manual_seed(1)
    scores = torch.randint(1, 6, (n, c), generator=gen).float() / 10
    flat = scores.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    assert flat[order[nms_pre - 1]] == flat[order[nms_pre]]  # the cut is inside a tie
    chosen = order[:nms_pre]
    got = _as_lists(select_detections([scores], [boxes], nms_pre=nms_pre, max_per_img=n * c))
    assert got == _as_lists((boxes[chosen // c], flat[chosen], chosen % c))
