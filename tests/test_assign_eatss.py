"""EATSS (formulation §5, expansion): reductions to ATSS, a hand-built case, a slow loop-based
reference of the expansion, the properties of every extra, batching and chunking."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch

import hcral.assign.eatss as eatss_mod
from hcral.assign import atss_assign, eatss_assign, eatss_assign_batched
from hcral.ops.boxes import box_iou

# The ATSS reference and scene builders live in the sibling test file; load it by path so this
# works whatever pytest's import mode.
_spec = importlib.util.spec_from_file_location("_atss_tests", Path(__file__).with_name("test_assign_atss.py"))
_atss_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_atss_tests)
reference_atss, grid_layout, random_gts, make_scene, padded = (
    _atss_tests.reference_atss, _atss_tests.grid_layout, _atss_tests.random_gts, _atss_tests._scene, _atss_tests._padded
)


def _sq_dist(priors, gts):
    """(N, M) squared centre distances, the same numbers the implementation compares."""
    pcx, pcy = (priors[:, 0] + priors[:, 2]) / 2, (priors[:, 1] + priors[:, 3]) / 2
    gcx, gcy = (gts[:, 0] + gts[:, 2]) / 2, (gts[:, 1] + gts[:, 3]) / 2
    dx, dy = pcx[:, None] - gcx[None, :], pcy[:, None] - gcy[None, :]
    return dx * dx + dy * dy


def _inside(priors, box, margin=0.01):
    cx, cy = (priors[:, 0] + priors[:, 2]) / 2, (priors[:, 1] + priors[:, 3]) / 2
    return ((cx - box[0]) > margin) & ((cy - box[1]) > margin) & ((box[2] - cx) > margin) & ((box[3] - cy) > margin)


def eligibility(priors, sizes, gts, labels, pred_boxes, pred_scores, *, topk=9):
    """Per GT j, the priors passing expansion steps 1-3 and their ranking keys, from the ATSS reference."""
    atss_idx, thrs = reference_atss(priors, sizes, gts, topk=topk)
    atss_idx = torch.tensor(atss_idx, dtype=torch.long)
    d2 = _sq_dist(priors, gts)
    q = box_iou(pred_boxes, gts)  # q_ij = IoU(b_i, g_j)
    out = {}
    for j in range(gts.shape[0]):
        mine = atss_idx == j
        if not mine.any():
            continue
        dis_f = d2[mine, j].max()  # step 1
        e = (atss_idx == -1) & (d2[:, j] <= dis_f) & _inside(priors, gts[j])  # step 2
        e &= q[:, j].double() >= thrs[j]  # step 3
        cands = e.nonzero().squeeze(1).tolist()
        big_q = (pred_scores[:, labels[j]].float() * q[:, j]).tolist()  # Q_ij, in the same float32
        d = d2[:, j].tolist()
        out[j] = sorted(cands, key=lambda i: (-big_q[i], d[i], i))  # step 4's order
    return atss_idx, thrs, q, d2, out


def reference_eatss(priors, sizes, gts, labels, pred_boxes, pred_scores, *, topk=9, max_extra=4):
    """§5 expansion steps 1-5, loop by loop. Returns (gt_index list, expanded list)."""
    atss_idx, _, q, _, ranked = eligibility(priors, sizes, gts, labels, pred_boxes, pred_scores, topk=topk)
    chosen_by = {}
    for j, order in ranked.items():
        for i in order[:max_extra]:  # step 4: at most l per GT
            chosen_by.setdefault(i, []).append(j)
    gt_index, expanded = atss_idx.tolist(), [False] * priors.shape[0]
    for i, js in chosen_by.items():  # step 5: highest q, equal -> lower GT index; no refill
        best = js[0]
        for j in js[1:]:
            if float(q[i, j]) > float(q[i, best]):
                best = j
        gt_index[i], expanded[i] = best, True
    return gt_index, expanded


def predictions(rng, priors, gts, num_classes, *, far=False, quantize=False):
    """Detached predictions: each prior's box pulled toward a random GT (q spread over [0, 1]),
    scores uniform; ``quantize`` makes ties in Q (boxes equal to GTs, scores on a 3-value grid);
    ``far`` moves every box 10^4 px away (q = 0)."""
    n, m = priors.shape[0], gts.shape[0]
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    if m:
        target = gts[torch.randint(0, m, (n,), generator=gen)]
        t = torch.rand(n, 1, generator=gen)
        if quantize:
            t = (t > 0.3).float()
        boxes = priors + t * (target - priors) + (0 if quantize else torch.randn(n, 4, generator=gen))
    else:
        boxes = priors.clone()
    scores = torch.rand(n, num_classes, generator=gen)
    if quantize:
        scores = (scores * 3).floor() / 4 + 0.25
    if far:
        boxes = boxes + 1e4
    return boxes, scores


# ---------------------------------------------------------------------------------------------
# Reductions and a hand-built case
# ---------------------------------------------------------------------------------------------


def _same(a, b):
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("gt_index", "labels", "max_iou", "expanded"))


def test_no_predictions_or_zero_extra_is_atss():
    rng = random.Random(0)
    for seed in range(20):
        priors, sizes, gts, topk = make_scene(seed)
        labels = torch.arange(gts.shape[0]) % 3
        boxes, scores = predictions(rng, priors, gts, 3)
        atss = atss_assign(priors, sizes, gts, labels, topk=topk)
        assert _same(eatss_assign(priors, sizes, gts, labels, topk=topk), atss)
        assert _same(eatss_assign(priors, sizes, gts, labels, pred_boxes=boxes, pred_scores=scores,
                                  topk=topk, max_extra=0), atss)
    with pytest.raises(ValueError, match="both pred_boxes and pred_scores"):
        eatss_assign(priors, sizes, gts, labels, pred_boxes=boxes)


def _hand_scene():
    # 6x6 grid of 10x10 priors, centres (5 + 10x, 5 + 10y), index 6y + x; GT [0, 0, 40, 40]
    # centred at (20, 20). ATSS (topk 9): the 4 priors at d² = 50 and the 5 lowest-index priors of
    # the 8 at d² = 250 (1, 2, 6, 9, 12) are candidates, all inside the GT with IoU 100/1600, so
    # std = 0, thr = 1/16 and all 9 are positive; Dis_f² = 250. E = the 3 other priors at d² = 250:
    # 15, 19, 20 (all inside the GT).
    priors, sizes = grid_layout(60, 60, [10], sides=(1.0,), offset=0.5)
    gts = torch.tensor([[0.0, 0.0, 40.0, 40.0]])
    boxes = priors + 1000.0  # q = 0 everywhere ...
    scores = torch.zeros(36, 2)
    for i, s in [(15, 0.9), (19, 0.5), (20, 0.5), (21, 1.0), (7, 1.0)]:
        boxes[i] = gts[0]  # ... except these, with q = 1
        scores[i, 1] = s
    return priors, sizes, gts, torch.tensor([1]), boxes, scores


def test_hand_built_expansion():
    priors, sizes, gts, labels, boxes, scores = _hand_scene()
    atss = atss_assign(priors, sizes, gts, labels)
    assert atss.pos_mask.nonzero().squeeze(1).tolist() == [1, 2, 6, 7, 8, 9, 12, 13, 14]

    def extras(l):
        a = eatss_assign(priors, sizes, gts, labels, pred_boxes=boxes, pred_scores=scores, max_extra=l)
        return a, a.expanded.nonzero().squeeze(1).tolist()

    # Q = 0.9 (15) > 0.5 (19) = 0.5 (20): equal Q and equal d -> lower index 19 first.
    # 21 (q = 1, score 1) is farther than Dis_f; 7 is already an ATSS positive.
    assert extras(1)[1] == [15]
    assert extras(2)[1] == [15, 19]
    a, got = extras(4)
    assert got == [15, 19, 20]
    assert a.gt_index[[15, 19, 20]].tolist() == [0, 0, 0] and a.labels[[15, 19, 20]].tolist() == [1, 1, 1]
    assert torch.allclose(a.max_iou[[15, 19, 20]], torch.full((3,), 1 / 16))  # the prior box's IoU
    assert torch.equal(a.gt_index[atss.pos_mask], atss.gt_index[atss.pos_mask])
    # The IoU gate: q just below thr = 1/16 keeps a prior out.
    boxes2 = boxes.clone()
    boxes2[15] = torch.tensor([0.0, 0.0, 10.0, 9.9])  # IoU with the GT 99/1600 < 1/16
    a2 = eatss_assign(priors, sizes, gts, labels, pred_boxes=boxes2, pred_scores=scores, max_extra=4)
    assert a2.expanded.nonzero().squeeze(1).tolist() == [19, 20]


def test_conflict_goes_to_highest_predicted_iou_and_is_not_refilled():
    priors, sizes, _, _, _, _ = _hand_scene()
    # GT 0 = [0, 0, 40, 40] as above (E = 19, 20 after ATSS with this second GT), GT 1 =
    # [10, 0, 50, 40] (E = 16, 20, 21). Prior 20 (centre (25, 35)) is eligible for both.
    gts = torch.tensor([[0.0, 0.0, 40.0, 40.0], [10.0, 0.0, 50.0, 40.0]])
    labels = torch.tensor([1, 1])
    boxes, scores = priors + 1000.0, torch.zeros(36, 2)
    boxes[20], scores[20, 1] = torch.tensor([9.0, 0.0, 49.0, 40.0]), 1.0  # q: 1240/1960 (GT 0), 39/41 (GT 1)
    boxes[19], scores[19, 1] = gts[0], 0.5  # q = 1 with GT 0 but Q = 0.5 < 0.63
    boxes[[16, 21]], scores[[16, 21], 1] = gts[1], 0.5  # q = 1 with GT 1 but Q = 0.5 < 0.95
    _, _, q, _, ranked = eligibility(priors, sizes, gts, labels, boxes, scores)
    assert ranked == {0: [20, 19], 1: [20, 16, 21]}
    a = eatss_assign(priors, sizes, gts, labels, pred_boxes=boxes, pred_scores=scores, max_extra=1)
    # Both GTs pick prior 20 first; it goes to GT 1 (higher q); GT 0 is not refilled with 19.
    assert a.expanded.nonzero().squeeze(1).tolist() == [20] and a.gt_index[20].item() == 1
    assert (a.gt_index.tolist(), a.expanded.tolist()) == reference_eatss(priors, sizes, gts, labels, boxes, scores,
                                                                          max_extra=1)
    # Equal q for both GTs -> the lower GT index.
    boxes[20] = torch.tensor([5.0, 0.0, 45.0, 40.0])  # q = 35/45 with each GT
    b = eatss_assign(priors, sizes, gts, labels, pred_boxes=boxes, pred_scores=scores, max_extra=1)
    assert q.dtype == torch.float32 and b.gt_index[20].item() == 0 and b.expanded.sum().item() == 1


# ---------------------------------------------------------------------------------------------
# Random scenes: the reference and the properties
# ---------------------------------------------------------------------------------------------


def _random_cases(count, offset=0):
    rng = random.Random(1234 + offset)
    for seed in range(offset, offset + count):
        priors, sizes, gts, topk = make_scene(seed)
        m = gts.shape[0]
        labels = torch.tensor([rng.randrange(4) for _ in range(m)], dtype=torch.long)
        boxes, scores = predictions(rng, priors, gts, 4, quantize=seed % 3 == 0)
        yield seed, priors, sizes, gts, labels, boxes, scores, topk, rng.choice([1, 2, 4, 9])


@pytest.mark.parametrize("block", range(3))
def test_matches_reference_on_random_scenes(block):
    extras = 0
    for seed, priors, sizes, gts, labels, boxes, scores, topk, l in _random_cases(40, offset=block * 40):
        a = eatss_assign(priors, sizes, gts, labels, pred_boxes=boxes, pred_scores=scores, topk=topk, max_extra=l)
        ref = reference_eatss(priors, sizes, gts, labels, boxes, scores, topk=topk, max_extra=l)
        assert (a.gt_index.tolist(), a.expanded.tolist()) == ref, f"seed {seed}"
        extras += int(a.expanded.sum())
    assert extras > 20  # the scenes do exercise the expansion


def test_properties_of_every_extra():
    checked_conflicts = 0
    for seed, priors, sizes, gts, labels, boxes, scores, topk, l in _random_cases(40, offset=500):
        a = eatss_assign(priors, sizes, gts, labels, pred_boxes=boxes, pred_scores=scores, topk=topk, max_extra=l)
        atss = atss_assign(priors, sizes, gts, labels, topk=topk)
        # superset, ATSS positives unchanged, expanded marks exactly the additions
        assert torch.equal(a.gt_index[atss.pos_mask], atss.gt_index[atss.pos_mask])
        assert torch.equal(a.expanded, a.pos_mask & ~atss.pos_mask)
        assert a.ignore_mask.sum() == 0 and torch.equal(a.labels[a.pos_mask], labels[a.gt_index[a.pos_mask]])
        _, thrs, q, d2, ranked = eligibility(priors, sizes, gts, labels, boxes, scores, topk=topk)
        for i in a.expanded.nonzero().squeeze(1).tolist():
            j = a.gt_index[i].item()
            mine = atss.gt_index == j
            assert mine.any()  # only GTs with ATSS positives expand
            assert d2[i, j] <= d2[mine, j].max()  # distance
            assert _inside(priors[i : i + 1], gts[j]).item()  # centre
            assert float(q[i, j]) >= thrs[j]  # IoU gate
        for j, order in ranked.items():
            got = (a.expanded & (a.gt_index == j)).sum().item()
            assert got <= l
            for rank, i in enumerate(order):
                if a.expanded[i] and a.gt_index[i] == j:
                    continue
                # Not given to j: ranked beyond l, or lost a conflict to a GT with a higher q
                # (equal q: lower index), and then j was not refilled.
                k = a.gt_index[i].item()
                if rank < l:
                    assert a.expanded[i] and k != j
                    assert q[i, k] > q[i, j] or (q[i, k] == q[i, j] and k < j)
                    checked_conflicts += 1
    assert checked_conflicts > 0


def test_far_predictions_add_nothing_and_near_ones_do():
    rng = random.Random(7)
    near_extras = 0
    for seed in range(30):
        priors, sizes, gts, topk = make_scene(seed)
        labels = torch.zeros(gts.shape[0], dtype=torch.long)
        atss = atss_assign(priors, sizes, gts, labels, topk=topk)
        boxes, scores = predictions(rng, priors, gts, 1, far=True)
        far = eatss_assign(priors, sizes, gts, labels, pred_boxes=boxes, pred_scores=scores, topk=topk)
        assert not far.expanded.any() and torch.equal(far.gt_index, atss.gt_index)
        near = eatss_assign(priors, sizes, gts, labels, pred_boxes=boxes - 1e4, pred_scores=scores, topk=topk)
        near_extras += int(near.expanded.sum())
    assert near_extras > 0


# ---------------------------------------------------------------------------------------------
# Batched form, chunking, edge cases
# ---------------------------------------------------------------------------------------------


def test_batched_equals_per_image():
    rng = random.Random(21)
    priors, sizes = grid_layout(96, 96, [8, 16, 32, 64], sides=(8.0,))
    gt_list = [random_gts(rng, m, 96, 96, snap=rng.choice([None, 4])) for m in (5, 0, 23, 1, 40)]
    label_list = [torch.tensor([rng.randrange(3) for _ in range(g.shape[0])], dtype=torch.long) for g in gt_list]
    preds = [predictions(rng, priors, g, 3, quantize=i % 2 == 0) for i, g in enumerate(gt_list)]
    boxes, labels, mask = padded(gt_list, label_list)
    pred_boxes = torch.stack([p[0] for p in preds])
    pred_scores = torch.stack([p[1] for p in preds])
    batched = eatss_assign_batched(priors, sizes, boxes, labels, mask, pred_boxes=pred_boxes, pred_scores=pred_scores)
    assert batched.expanded.any()
    none = eatss_assign_batched(priors, sizes, boxes, labels, torch.zeros_like(mask), pred_boxes=pred_boxes,
                                pred_scores=pred_scores)
    assert none.gt_index.eq(-1).all() and not none.expanded.any()  # only ignored (masked) GTs
    for i, one in enumerate(batched.unbind()):
        single = eatss_assign(priors, sizes, gt_list[i], label_list[i], pred_boxes=preds[i][0], pred_scores=preds[i][1])
        assert _same(one, single), i


def test_chunking_bounds_pairs_and_keeps_results(monkeypatch):
    rng = random.Random(4)
    priors, sizes = grid_layout(256, 256, [8, 16, 32, 64, 128], sides=(8.0,))
    gts = random_gts(rng, 200, 256, 256)
    labels = torch.arange(200) % 5
    boxes, scores = predictions(rng, priors, gts, 5)
    full = eatss_assign(priors, sizes, gts, labels, pred_boxes=boxes, pred_scores=scores, max_pairs=1 << 30)
    seen = []
    real = eatss_mod.sq_center_dist

    def recording(*args):
        out = real(*args)
        seen.append(out.numel())
        return out

    monkeypatch.setattr(eatss_mod, "sq_center_dist", recording)
    budget = 4 * priors.shape[0]
    chunked = eatss_assign(priors, sizes, gts, labels, pred_boxes=boxes, pred_scores=scores, max_pairs=budget)
    assert _same(chunked, full) and full.expanded.any()
    pairwise = seen[1:]  # seen[0] is the aligned distance of the ATSS positives, (P,)
    assert len(pairwise) > 10 and max(pairwise) <= budget


def test_edge_cases_and_errors():
    priors, sizes = grid_layout(32, 32, [8, 16])
    n = priors.shape[0]
    boxes, scores = priors.clone(), torch.rand(n, 2)
    empty = eatss_assign(priors, sizes, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long),
                         pred_boxes=boxes, pred_scores=scores)
    assert empty.gt_index.eq(-1).all() and not empty.expanded.any()
    none = eatss_assign(torch.zeros(0, 4), [0, 0], torch.tensor([[0.0, 0, 5, 5]]), torch.tensor([0]),
                        pred_boxes=torch.zeros(0, 4), pred_scores=torch.zeros(0, 2))
    assert none.gt_index.shape == (0,)
    gts = torch.tensor([[1.0, 1.0, 20.0, 20.0]])
    with pytest.raises(ValueError, match=r"gt_labels must lie in \[0, 2\)"):
        eatss_assign(priors, sizes, gts, torch.tensor([2]), pred_boxes=boxes, pred_scores=scores)
    with pytest.raises(ValueError, match="pred_boxes"):
        eatss_assign(priors, sizes, gts, torch.tensor([0]), pred_boxes=boxes[:-1], pred_scores=scores)
    with pytest.raises(ValueError, match="max_extra"):
        eatss_assign(priors, sizes, gts, torch.tensor([0]), pred_boxes=boxes, pred_scores=scores, max_extra=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    for seed, priors, sizes, gts, labels, boxes, scores, topk, l in _random_cases(30, offset=900):
        cpu = eatss_assign(priors, sizes, gts, labels, pred_boxes=boxes, pred_scores=scores, topk=topk, max_extra=l)
        gpu = eatss_assign(priors.cuda(), sizes, gts.cuda(), labels.cuda(), pred_boxes=boxes.cuda(),
                           pred_scores=scores.cuda(), topk=topk, max_extra=l)
        for f in ("gt_index", "labels", "max_iou", "expanded"):
            assert torch.equal(getattr(gpu, f).cpu(), getattr(cpu, f)), (seed, f)
